"""The post-hoc baseline's forest (METHOD §4): independently trained levels, then the same
similarity-based assignment the HSAE uses during training (§3.3), applied once.

Encoder and decoder cosine need only the weights. Co-activation similarity needs firing
statistics: the train split is streamed through the levels into the same EMA the trainer keeps.
As in the HSAE's updates, only live features take part: those that fire on a stretch of train
tokens as long as the HSAE's update interval (:func:`live_features`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from hsae_core.common.errors import check_field, coerce_fields, is_int
from hsae_core.model.forest import Forest
from hsae_core.model.hierarchy import CoactivationEMA, assign_forest
from hsae_core.model.hsae import HSAE


@dataclass(frozen=True)
class PosthocConfig:
    coactivation_tokens: int = 262_144
    """Train tokens streamed through the baseline to estimate co-activation frequencies when
    ``hierarchy.similarity`` is ``coactivation`` (unused for encoder/decoder cosine)."""

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_field(self, "coactivation_tokens",
                    is_int(self.coactivation_tokens) and self.coactivation_tokens >= 1,
                    "an integer >= 1")


@torch.no_grad()
def coactivation_stats(model: HSAE, batches: Iterable[torch.Tensor], momentum: float,
                       tokens_per_batch: int) -> CoactivationEMA:
    """Co-activation EMA of ``model``'s levels over ``batches`` (as in training, §3.3)."""
    device = model.levels[0].W_dec.device
    ema = CoactivationEMA([lv.n_features for lv in model.levels], momentum, tokens_per_batch,
                          device)
    for x in batches:
        ema.update(model.encode(x.to(device).float()))
    return ema


@torch.no_grad()
def live_features(model: HSAE, batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Per level, the features that fire at least once on ``batches``."""
    device = model.levels[0].W_dec.device
    fired = [torch.zeros(lv.n_features, dtype=torch.bool, device=device) for lv in model.levels]
    for x in batches:
        for f, code in zip(fired, model.encode(x.to(device).float())):
            f[code.pattern.cols[code.active]] = True
    return fired


def posthoc_forest(model: HSAE, similarity: str, exclude_quantile: float, tree: str,
                   coactivation: CoactivationEMA | None = None,
                   live: list[torch.Tensor] | None = None) -> Forest:
    """Assign every live child of the trained levels to its most similar live parent, once."""
    return assign_forest(model.levels, similarity, exclude_quantile, tree, coactivation, live)


__all__ = ["PosthocConfig", "coactivation_stats", "live_features", "posthoc_forest"]
