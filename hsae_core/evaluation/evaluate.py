"""Streaming evaluation of a trained HSAE (or post-hoc baseline) on the eval split (§4.2,
Appendix D, METHOD §4): per level L0, FVE and dead fraction; per level pair the hierarchy
metrics of :class:`~hsae_core.evaluation.metrics.HierarchyStats` and the forest's branching statistics.

Batches are encoded one at a time and only sums are kept, so memory is one batch whatever the
split's size. FVE is SAEBench's ``explained_variance_legacy`` (METHOD §4): the mean over tokens
of ``1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2``; ``fve_pooled`` is ``1 - SSE / SST`` over
the batch sums, the quantity the trainer logs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from hsae_core.evaluation.metrics import HierarchyStats, branching_stats
from hsae_core.model.hsae import HSAE


@dataclass
class LevelSums:
    """Running sums of one level over eval tokens."""

    n_features: int
    tokens: int = 0
    active: float = 0.0
    fve_token_sum: float = 0.0
    sse: float = 0.0
    sst: float = 0.0
    fired: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.fired is None:
            self.fired = torch.zeros(self.n_features, dtype=torch.int64)

    def update(self, x: torch.Tensor, recon: torch.Tensor, active: torch.Tensor) -> None:
        err = (x - recon).double().pow(2).sum(1)
        centred = (x - x.mean(0)).double().pow(2).sum(1)
        self.tokens += x.shape[0]
        self.active += float(active.sum())
        self.fve_token_sum += float((1 - err / centred.clamp_min(1e-12)).sum())
        self.sse += float(err.sum())
        self.sst += float(centred.sum())
        self.fired += active.sum(0).cpu()

    def summary(self) -> dict[str, float]:
        n = max(1, self.tokens)
        return {"l0": self.active / n, "fve": self.fve_token_sum / n,
                "fve_pooled": 1 - self.sse / self.sst if self.sst else float("nan"),
                "dead_frac": float((self.fired == 0).double().mean())}


@torch.no_grad()
def active_mask(model: HSAE, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per level: the reconstruction ``[b, d]`` and the boolean activity ``[b, n_l]`` of ``x``."""
    recons, actives = [], []
    for lv in model.levels:
        code = lv.encode(x)
        recons.append(lv.decode(code))
        mask = torch.zeros(x.shape[0], lv.n_features, dtype=torch.bool, device=x.device)
        on = code.active
        mask[code.pattern.rows[on], code.pattern.cols[on]] = True
        actives.append(mask)
    return recons, actives


@torch.no_grad()
def evaluate_hsae(model: HSAE, batches: Iterable[torch.Tensor]) -> dict:
    """Level and level-pair metrics of ``model`` over ``batches`` of ``[b, d]`` normalised
    activations (``b >= 2``: FVE centres on the batch mean).

    Returns ``{"level<l>": {l0, fve, fve_pooled, dead_frac}, "pair<l>": {hamming,
    p_parent_given_child, p_child_given_parent, pc_skipped, cp_skipped, <branching>},
    "mean": {...}, "tokens": n}`` (pairs only for two or more levels).
    """
    device = model.levels[0].W_dec.device
    levels = [LevelSums(lv.n_features) for lv in model.levels]
    hier = HierarchyStats(model.forest.to("cpu"))
    for x in batches:
        x = x.to(device).float()
        recons, actives = active_mask(model, x)
        for sums, recon, act in zip(levels, recons, actives):
            sums.update(x, recon, act)
        hier.update(actives)
    out: dict = {f"level{l}": s.summary() for l, s in enumerate(levels)}
    pcs, cps = hier.p_parent_given_child(), hier.p_child_given_parent()
    for l, (ham, (pc, pc_skip), (cp, cp_skip), branch) in enumerate(
            zip(hier.hamming(), pcs, cps, branching_stats(hier.forest))):
        out[f"pair{l}"] = {"hamming": ham, "p_parent_given_child": pc, "p_child_given_parent": cp,
                           "pc_skipped": pc_skip, "cp_skipped": cp_skip, **branch}
    out["mean"] = _means(out, model.n_levels)
    out["tokens"] = levels[0].tokens
    return out


def _means(out: dict, n_levels: int) -> dict[str, float]:
    """Means over levels (L0, FVE) and over level pairs (the hierarchy metrics, §4.2)."""
    def mean(prefix: str, key: str, n: int) -> float:
        vals = [out[f"{prefix}{i}"][key] for i in range(n)]
        return sum(vals) / len(vals) if vals else float("nan")

    res = {"l0": mean("level", "l0", n_levels), "fve": mean("level", "fve", n_levels)}
    for key in ("hamming", "p_parent_given_child", "p_child_given_parent"):
        res[key] = mean("pair", key, n_levels - 1)
    return res


__all__ = ["LevelSums", "active_mask", "evaluate_hsae"]
