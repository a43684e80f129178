"""Per-feature and per-link statistics of a forest on the eval split, for the browser (§4.2):
firing frequency of every feature and P(parent|child), P(child|parent) of every assigned link,
counted with :func:`~hsae_core.evaluation.evaluate.count_model` (the same counts as
compute-metrics, whose per-document sums are kept for the semantic scores of
:mod:`.semantic_view`); and, for the UMAP figures (§4.6, Appendix G.1), the input activations
where chosen features fire.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from hsae_core.evaluation.bootstrap import doc_weights
from hsae_core.evaluation.evaluate import active_mask, count_model
from hsae_core.evaluation.metrics import EvalCounts
from hsae_core.model.forest import Forest
from hsae_core.model.hsae import HSAE


@dataclass
class ForestStats:
    """``fired[l][i]``: eval tokens on which feature i of level l fired; ``joint[l][j]``: tokens
    on which child j of level l+1 fired together with its parent (0 when unassigned);
    ``counts``: the per-document counts they come from (None when built from totals alone)."""

    forest: Forest
    tokens: int
    fired: list[np.ndarray]
    joint: list[np.ndarray]
    counts: EvalCounts | None = None

    def freq(self, level: int) -> np.ndarray:
        return self.fired[level] / max(1, self.tokens)

    def p_parent_given_child(self, pair: int) -> np.ndarray:
        """Per feature of level ``pair + 1``: P(parent fires | it fires); NaN if unassigned or
        silent."""
        parent_of = self.forest.parent_of[pair].cpu().numpy()
        kid = self.fired[pair + 1].astype(np.float64)
        out = np.divide(self.joint[pair], kid, out=np.full(kid.shape, np.nan), where=kid > 0)
        out[parent_of < 0] = np.nan
        return out

    def p_child_given_parent(self, pair: int) -> np.ndarray:
        parent_of = self.forest.parent_of[pair].cpu().numpy()
        par = self.fired[pair][np.clip(parent_of, 0, None)].astype(np.float64)
        out = np.divide(self.joint[pair], par, out=np.full(par.shape, np.nan), where=par > 0)
        out[parent_of < 0] = np.nan
        return out


@torch.no_grad()
def forest_stats(model: HSAE, batches: Iterable) -> ForestStats:
    """Count firings and parent-child co-firings of ``model``'s forest over ``batches``
    (:class:`~hsae_core.data.reader.EvalBatch`es, whose document ids the semantic scores need,
    or plain ``[b, d]`` tensors)."""
    if model.n_levels < 2:
        raise ValueError("the forest browser needs at least two levels, "
                         f"the model has {model.n_levels}")
    counts = count_model(model, batches)
    if counts.tokens == 0:
        raise ValueError("forest_stats: no eval tokens (the eval split is empty)")
    t = counts.totals(doc_weights(int(counts.documents().numel()), 0, 0))
    fired = [f[0].numpy().astype(np.int64) for f in t.fired]
    joint = [j[0].numpy().astype(np.int64) for j in t.joint]
    return ForestStats(counts.forest, counts.tokens, fired, joint, counts)


@torch.no_grad()
def feature_inputs(model: HSAE, batches: Iterable, features: list[tuple[int, int]],
                   per_feature: int) -> dict[tuple[int, int], np.ndarray]:
    """The first ``per_feature`` input activations ``[n, d]`` on which each (level, id) fires
    (``batches``: EvalBatches or tensors)."""
    device = model.levels[0].W_dec.device
    got: dict[tuple[int, int], list[np.ndarray]] = {f: [] for f in features}
    need = {f: per_feature for f in features}
    for x in batches:
        x = getattr(x, "activations", x).to(device).float()
        _, actives = active_mask(model, x)
        for f in features:
            if need[f] <= 0:
                continue
            rows = actives[f[0]][:, f[1]].nonzero(as_tuple=True)[0][:need[f]]
            if rows.numel():
                got[f].append(x[rows].cpu().numpy())
                need[f] -= rows.numel()
        if all(n <= 0 for n in need.values()):
            break
    return {f: (np.concatenate(v) if v else np.zeros((0, model.cfg.d_model), np.float32))
            for f, v in got.items()}


__all__ = ["ForestStats", "feature_inputs", "forest_stats"]
