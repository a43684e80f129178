"""Level and hierarchy-consistency metrics (§4.2, Appendix D, METHOD §4), with intervals over eval
documents (:mod:`hsae_core.evaluation.bootstrap`).

:class:`EvalCounts` streams batches of per-level boolean activity ``[tokens, n_l]`` with each
token's document id and keeps per-document sums; :func:`level_metrics` and :func:`pair_metrics`
turn reweighted sums (one row per replicate; row 0 the full eval sample, unit weights) into
metrics.

The paper's forms (METHOD §4):

- ``hamming``: per token, over the parents that have at least one child, the number whose
  activity differs from the OR of their children's; mean over tokens.
- ``p_parent_given_child`` / ``p_child_given_parent``: per assigned link the conditional firing
  frequency, macro-averaged over links whose conditioning feature fired (``pc_skipped`` /
  ``cp_skipped`` count the others).

Beside them, robust forms, clearly named:

- ``hamming_per_parent``: ``hamming`` divided by the parents with children (a rate: the count
  rewards a forest that piles children onto few parents).
- ``*_pooled``: conditional probabilities pooled over tokens, ``sum_links joint / sum_links
  count`` (a link weighs by how often it fires).
- ``*_min<k>``: the macro averages over links both of whose endpoints fire at least ``k`` times
  (``links_min<k>`` counts them): a child firing once no longer weighs as much as one firing
  500 times.

Eligibility (issue 22): which links enter a macro average ("fired", "fire at least k times")
is decided on row 0, the full eval sample, and every resampling row averages over that same set.
A link whose ratio is undefined in a row (its conditioning feature fires in none of the row's
documents) keeps its full-sample ratio there (:func:`~.bootstrap.keep_point`): it adds no
variance, as no resampling of these documents can show how a ratio resting on one document
would vary. ``pc_imputed`` / ``cp_imputed`` count such (link, row) cases over the rows; with
the delete-one jackknife, the eligible links whose conditioning feature fires in a single
document. Dropping them instead, as before, re-decided eligibility per resample and biased the
bootstrap. Hamming and the pooled forms are ratios of sums over a fixed structure (the forest's
links and parents) and need no rule.
"""

from __future__ import annotations

import torch

from hsae_core.evaluation.bootstrap import DocSums, keep_point, totals
from hsae_core.model.forest import Forest


def child_or(parent_of: torch.Tensor, child_active: torch.Tensor, n_parents: int) -> torch.Tensor:
    """``[tokens, n_parents]``: whether any assigned child of each parent is active."""
    assigned = parent_of >= 0
    out = torch.zeros(child_active.shape[0], n_parents, dtype=torch.int32,
                      device=child_active.device)
    out.index_add_(1, parent_of[assigned], child_active[:, assigned].to(torch.int32))
    return out > 0


class EvalCounts:
    """Per-document sums over eval tokens: per level, tokens each feature fired on, active
    entries, token FVE, squared error; per level pair, tokens each assigned child fired with its
    parent and the Hamming mismatches; tokens and centred squared norm per document."""

    def __init__(self, forest: Forest):
        self.forest = forest.to("cpu")
        sizes = self.forest.level_sizes
        self.n_levels = len(sizes)
        self.fired = [DocSums(n) for n in sizes]
        self.joint = [DocSums(n) for n in sizes[1:]]
        # per document: tokens | sst | per level: active, fve token sum, sse | per pair: mismatch
        self.scalars = DocSums(2 + 3 * self.n_levels + self.forest.n_pairs)
        self.tokens = 0

    def col(self, name: str, index: int = 0) -> int:
        L = self.n_levels
        base = {"tokens": 0, "sst": 1, "active": 2, "fve": 2 + L, "sse": 2 + 2 * L,
                "mismatch": 2 + 3 * L}[name]
        return base + index

    @torch.no_grad()
    def update(self, docs: torch.Tensor, x: torch.Tensor, recons: list[torch.Tensor] | None,
               active: list[torch.Tensor]) -> None:
        """One batch: document ids ``[b]``, inputs ``[b, d]`` and reconstructions per level
        (None: no reconstruction sums), boolean activity ``[b, n_l]`` per level."""
        docs = docs.to(torch.int64).cpu()
        b = docs.numel()
        self.tokens += b
        scal = self.scalars
        scal.add(docs, torch.full((b,), self.col("tokens"), dtype=torch.int64))
        if recons is not None:
            centred = (x - x.mean(0)).double().pow(2).sum(1).cpu()
            scal.add(docs, torch.full((b,), self.col("sst"), dtype=torch.int64), centred)
        for l, act in enumerate(active):
            act = act.cpu()
            r, c = act.nonzero(as_tuple=True)
            self.fired[l].add(docs[r], c)
            scal.add(docs, torch.full((b,), self.col("active", l), dtype=torch.int64),
                     act.sum(1).double())
            if recons is not None:
                err = (x - recons[l]).double().pow(2).sum(1).cpu()
                scal.add(docs, torch.full((b,), self.col("fve", l), dtype=torch.int64),
                         1 - err / centred.clamp_min(1e-12))
                scal.add(docs, torch.full((b,), self.col("sse", l), dtype=torch.int64), err)
        for l, parent_of in enumerate(self.forest.parent_of):
            par, kid = active[l].cpu(), active[l + 1].cpu()
            assigned = (parent_of >= 0).nonzero(as_tuple=True)[0]
            both = kid[:, assigned] & par[:, parent_of[assigned]]
            r, j = both.nonzero(as_tuple=True)
            self.joint[l].add(docs[r], assigned[j])
            has = self.forest.has_children(l).cpu()
            pred = child_or(parent_of, kid, par.shape[1])
            mismatch = (pred[:, has] != par[:, has]).sum(1).double()
            scal.add(docs, torch.full((b,), self.col("mismatch", l), dtype=torch.int64), mismatch)

    def documents(self) -> torch.Tensor:
        """The sorted ids of the documents seen (the resampling weights' columns)."""
        return self.scalars.doc_ids()

    def totals(self, weights: torch.Tensor) -> "Totals":
        """Reweighted sums, one row per row of ``weights [R, n_docs]`` (columns in
        :meth:`documents` order)."""
        docs = self.documents()
        return Totals(self, totals(weights, self.scalars.matrix(docs)),
                      [totals(weights, f.matrix(docs)) for f in self.fired],
                      [totals(weights, j.matrix(docs)) for j in self.joint])


class Totals:
    """Reweighted sums ``[R, ...]`` of an :class:`EvalCounts`."""

    def __init__(self, counts: EvalCounts, scalars: torch.Tensor, fired: list[torch.Tensor],
                 joint: list[torch.Tensor]):
        self.counts, self.scalars, self.fired, self.joint = counts, scalars, fired, joint

    def scalar(self, name: str, index: int = 0) -> torch.Tensor:
        return self.scalars[:, self.counts.col(name, index)]


def level_metrics(t: Totals, level: int) -> dict[str, torch.Tensor]:
    """Per replicate: ``l0``, ``fve`` (SAEBench legacy: mean over tokens of
    ``1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2``), ``fve_pooled`` (``1 - SSE / SST``) and
    ``dead_frac`` (features that never fire)."""
    n = t.scalar("tokens").clamp_min(1)
    return {
        "l0": t.scalar("active", level) / n,
        "fve": t.scalar("fve", level) / n,
        "fve_pooled": 1 - t.scalar("sse", level) / t.scalar("sst"),
        "dead_frac": (t.fired[level] == 0).double().mean(1),
    }


def pair_metrics(t: Totals, pair: int, min_fires: int) -> dict[str, torch.Tensor]:
    """Per replicate, the hierarchy metrics of level pair ``pair`` (module docstring; row 0 of
    ``t`` must be the full eval sample, on which eligibility is decided)."""
    forest = t.counts.forest
    parent_of = forest.parent_of[pair]
    assigned = (parent_of >= 0).nonzero(as_tuple=True)[0]
    kid = t.fired[pair + 1][:, assigned]
    par = t.fired[pair][:, parent_of[assigned]]
    joint = t.joint[pair][:, assigned]
    n_parents = int(forest.has_children(pair).sum())
    hamming = t.scalar("mismatch", pair) / t.scalar("tokens").clamp_min(1)
    k = f"min{min_fires}"
    strong = (kid[0] >= min_fires) & (par[0] >= min_fires)
    pc, cp = _ratio(joint, kid), _ratio(joint, par)
    return {
        "hamming": hamming,
        "hamming_per_parent": hamming / max(1, n_parents),
        "p_parent_given_child": _macro(pc, kid[0] > 0),
        "p_child_given_parent": _macro(cp, par[0] > 0),
        "p_parent_given_child_pooled": joint.sum(1) / kid.sum(1),
        "p_child_given_parent_pooled": joint.sum(1) / par.sum(1),
        f"p_parent_given_child_{k}": _macro(pc, strong),
        f"p_child_given_parent_{k}": _macro(cp, strong),
        "pc_skipped": (kid == 0).sum(1).double(),
        "cp_skipped": (par == 0).sum(1).double(),
        "pc_imputed": ((kid == 0) & (kid[0] > 0)).sum(1).double(),
        "cp_imputed": ((par == 0) & (par[0] > 0)).sum(1).double(),
        f"links_{k}": torch.full_like(hamming, float(strong.sum())),
    }


def _ratio(joint: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per replicate and link ``joint / count``; where ``count`` is 0 in a replicate, the full
    sample's ratio (row 0; NaN where it is 0 there too)."""
    ratio = torch.where(count > 0, joint / count.clamp_min(1), torch.nan)
    return keep_point(ratio, count > 0)


def _macro(ratio: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Per replicate, the mean of ``ratio [R, links]`` over the ``eligible`` links (decided on
    the full sample; NaN if none)."""
    n = int(eligible.sum())
    if n == 0:
        return torch.full(ratio.shape[:1], float("nan"), dtype=torch.float64)
    return ratio[:, eligible].sum(1) / n


def branching_stats(forest: Forest) -> list[dict[str, float]]:
    """Branching statistics of the forest per level pair: parents with children,
    assigned children and their fraction, children per parent (mean over parents that have
    any, median, max), and the fraction of parents with exactly one child."""
    out = []
    for l, parent_of in enumerate(forest.parent_of):
        counts = forest.n_children(l).cpu()
        used = counts[counts > 0]
        n_assigned = int((parent_of >= 0).sum())
        out.append({
            "parents_with_children": int(used.numel()),
            "children_assigned": n_assigned,
            "assigned_frac": n_assigned / max(1, parent_of.numel()),
            "children_mean": float(used.double().mean()) if used.numel() else 0.0,
            "children_median": float(used.double().median()) if used.numel() else 0.0,
            "children_max": int(used.max()) if used.numel() else 0,
            "single_child_frac": float((used == 1).double().mean()) if used.numel() else 0.0,
        })
    return out


__all__ = ["EvalCounts", "Totals", "branching_stats", "child_or", "level_metrics",
           "pair_metrics"]
