"""The ``report:`` section of params.yaml: the feature-forest browser and the figures."""

from __future__ import annotations

from dataclasses import dataclass

from hsae_core.common.errors import ConfigError


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
    """Torch device of the encoding pass."""

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"report.{name} = {getattr(self, name)!r}: expected {allowed}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        check("contexts_per_feature",
              is_int(self.contexts_per_feature) and self.contexts_per_feature >= 1,
              "an integer >= 1")
        check("eval_tokens",
              self.eval_tokens is None or (is_int(self.eval_tokens) and self.eval_tokens >= 2),
              "None or an integer >= 2")
        check("batch_size", is_int(self.batch_size) and self.batch_size >= 2, "an integer >= 2")
        check("umap_points", is_int(self.umap_points) and self.umap_points >= 5, "an integer >= 5")
        check("umap_panels", is_int(self.umap_panels) and self.umap_panels >= 1, "an integer >= 1")
        check("umap_min_fires", is_int(self.umap_min_fires) and self.umap_min_fires >= 1,
              "an integer >= 1")
        check("seed", is_int(self.seed), "an integer")
        check("device",
              isinstance(self.device, str) and self.device.split(":")[0] in ("cpu", "cuda", "mps"),
              "cpu, cuda, cuda:N or mps")
