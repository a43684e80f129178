"""Streaming evaluation of a trained HSAE (or post-hoc baseline) on the eval split (§4.2,
Appendix D, METHOD §4): per level L0, FVE and dead fraction; per level pair the hierarchy
metrics of :mod:`hsae_core.evaluation.metrics` and the forest's branching statistics; every
metric with a 95% interval over eval documents (:mod:`hsae_core.evaluation.bootstrap`: the
bias-corrected jackknife over documents, the links and features that enter each average decided
once on the full eval sample; issue 22).

Batches are encoded one at a time and only per-document sums are kept, so memory is one batch
plus the sums whatever the split's size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from hsae_core.evaluation.bootstrap import interval, replicate_weights
from hsae_core.evaluation.metrics import (
    EvalCounts,
    branching_stats,
    level_metrics,
    pair_metrics,
)
from hsae_core.model.hsae import HSAE

#: Headline metrics averaged over level pairs (hierarchy) or levels (L0, FVE, dead).
PAIR_MEANS = ("hamming", "hamming_per_parent", "p_parent_given_child", "p_child_given_parent",
              "p_parent_given_child_pooled", "p_child_given_parent_pooled")
LEVEL_MEANS = ("l0", "fve", "dead_frac")


@dataclass(frozen=True)
class Bootstrap:
    """Interval settings: ``n_boot`` resampling rows (0: point estimates only; otherwise the
    jackknife's ``min(documents, n_boot)`` leave-a-group-out rows, :mod:`.bootstrap`), ``seed``
    (how documents are grouped when they outnumber the rows; the same seed resamples the same
    documents for every model, so differences are paired), and the firing count ``min_fires``
    of the restricted macro averages."""

    n_boot: int = 1000
    seed: int = 0
    min_fires: int = 20


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
def count_model(model: HSAE, batches: Iterable) -> EvalCounts:
    """Stream ``batches`` through every level. A batch is an
    :class:`~hsae_core.data.reader.EvalBatch` (activations and document ids) or a plain
    ``[b, d]`` tensor (then every token is its own resampling unit); ``b >= 2``: FVE centres on
    the batch mean."""
    device = model.levels[0].W_dec.device
    counts = EvalCounts(model.forest)
    for batch in batches:
        if isinstance(batch, torch.Tensor):
            x = batch
            docs = torch.arange(counts.tokens, counts.tokens + x.shape[0])
        else:
            x, docs = batch.activations, batch.doc_ids
        x = x.to(device).float()
        recons, actives = active_mask(model, x)
        counts.update(docs, x, recons, actives)
    return counts


def replicate_metrics(counts: EvalCounts, boot: Bootstrap) -> dict[str, torch.Tensor]:
    """Every metric as a tensor of replicate values keyed ``level<l>/<name>``, ``pair<l>/<name>``
    and ``mean/<name>``: the point estimate, then one value per jackknife row
    (:func:`~hsae_core.evaluation.bootstrap.replicate_weights`). The same seed gives the same
    rows for every model, so a difference of two models' values is paired."""
    docs = counts.documents()
    totals = counts.totals(replicate_weights(len(docs), boot.n_boot, boot.seed))
    out: dict[str, torch.Tensor] = {}
    L = counts.n_levels
    for l in range(L):
        out.update({f"level{l}/{k}": v for k, v in level_metrics(totals, l).items()})
    for l in range(L - 1):
        out.update({f"pair{l}/{k}": v for k, v in pair_metrics(totals, l, boot.min_fires).items()})
    for key in LEVEL_MEANS:
        out[f"mean/{key}"] = torch.stack([out[f"level{l}/{key}"] for l in range(L)]).mean(0)
    restricted = (f"p_parent_given_child_min{boot.min_fires}",
                  f"p_child_given_parent_min{boot.min_fires}")
    for key in (*PAIR_MEANS, *restricted) if L > 1 else ():
        out[f"mean/{key}"] = torch.stack([out[f"pair{l}/{key}"] for l in range(L - 1)]).mean(0)
    return out


#: Metrics that are counts or fractions of the forest's own structure: no interval.
NO_INTERVAL = ("pc_skipped", "cp_skipped", "pc_imputed", "cp_imputed", "links_", "dead_frac")
#: Counts over the resampling rows (summed over them; :func:`~.metrics.pair_metrics`).
ROW_SUMS = ("pc_imputed", "cp_imputed")


def summarize(reps: dict[str, torch.Tensor], with_intervals: bool) -> dict:
    """Nested ``{"level0": {"l0": v, "l0_lo": lo, "l0_hi": hi, ...}, ...}`` from replicate
    metrics (``_lo``/``_hi``: the 95% interval of
    :func:`~hsae_core.evaluation.bootstrap.interval`)."""
    out: dict = {}
    for key, values in reps.items():
        group, name = key.split("/")
        point, lo, hi = interval(values)
        dest = out.setdefault(group, {})
        if name in ROW_SUMS:
            dest[name] = int(values[1:].sum())
        elif name.startswith(("pc_", "cp_", "links_")):
            dest[name] = int(point)
        else:
            dest[name] = point
        if with_intervals and not name.startswith(NO_INTERVAL):
            dest[f"{name}_lo"], dest[f"{name}_hi"] = lo, hi
    return out


@torch.no_grad()
def evaluate_hsae(model: HSAE, batches: Iterable, boot: Bootstrap = Bootstrap()) -> dict:
    """Level and level-pair metrics of ``model`` over ``batches`` (see :func:`count_model`).

    Returns ``{"level<l>": {l0, fve, fve_pooled, dead_frac, ...}, "pair<l>": {hamming,
    hamming_per_parent, p_parent_given_child, ..., <branching>}, "mean": {...}, "tokens": n,
    "documents": m}``, each metric with ``_lo`` / ``_hi`` bounds when ``boot.n_boot > 0``
    (pairs only for two or more levels).
    """
    counts = count_model(model, batches)
    out = summarize(replicate_metrics(counts, boot), boot.n_boot > 0)
    for l, branch in enumerate(branching_stats(counts.forest)):
        out[f"pair{l}"].update(branch)
    out["tokens"] = counts.tokens
    out["documents"] = int(counts.documents().numel())
    return out


__all__ = ["Bootstrap", "active_mask", "count_model", "evaluate_hsae", "replicate_metrics",
           "summarize"]
