"""The ``report:`` section of params.yaml: the feature-forest browser and the figures."""

from __future__ import annotations

from dataclasses import dataclass

from hsae_core.common.device import resolve_device_field
from hsae_core.common.errors import check_field, coerce_fields


@dataclass(frozen=True)
class ReportConfig:
    contexts_per_feature: int = 8
    """Top-activating contexts shown per feature in the browser (from the collected evidence)."""
    eval_tokens: int | None = None
    """Eval-split tokens over which firing frequencies and P(parent|child) are counted
    (None = all)."""
    batch_size: int = 2048
    """Eval tokens per encoded batch."""
    umap_points: int = 300
    """Activations per feature in the UMAP projections (Figures 5 and 10): tokens where it
    fires."""
    umap_panels: int = 4
    """Sibling groups drawn in Figure 10 (Figure 5 is the first of them)."""
    umap_min_fires: int = 20
    """A feature enters a UMAP panel only if it fires on at least this many eval tokens."""
    seed: int = 0
    """Seed of UMAP and of the sampling of activations."""
    device: str = "cpu"
    """Torch device of the encoding pass: cpu, cuda, cuda:N, mps or auto (cuda if
    torch sees one, else cpu)."""

    def __post_init__(self) -> None:
        coerce_fields(self)
        for name, low in (("contexts_per_feature", 1), ("batch_size", 2), ("umap_points", 5),
                          ("umap_panels", 1), ("umap_min_fires", 1)):
            check_field(self, name, getattr(self, name) >= low, f"an integer >= {low}")
        check_field(self, "eval_tokens", self.eval_tokens is None or self.eval_tokens >= 2,
                    "null or an integer >= 2")
        resolve_device_field(self)
