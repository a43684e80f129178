"""Does a link mean something? Two judge-free semantic scores of parent-child links, each
against a frequency-matched random control, with intervals over eval documents.

Both read which eval documents each feature fires in (at least once), so they rest on document
identity, not on the token-level co-firing the consistency metrics (§4.2) already reward.

- **Topic coherence** (corpora with a document label, e.g. the wiki corpus's 12 topics): per
  feature, the distribution over labels of the documents it fires in, smoothed toward the eval
  split's label distribution ``base`` by ``alpha`` pseudo-documents; its *lift* is that
  distribution over ``base``. A link's score is the Pearson correlation, over labels, of its
  parent's and child's lift: about 1 when both concentrate on the same topics, negative when on
  different ones, and noise around 0 for features that fire in every topic (flat lift), so
  ubiquitous features cannot win it the way raw overlap would.
- **Document co-occurrence** (any corpus): per link, P(parent fires somewhere in a document |
  the child fires in it).

A link is scored when both its features fire in at least ``min_docs`` eval documents. The
control keeps each scored link's child and replaces its parent by a random other feature of the
same level from the same decile of document frequency (firing frequency matched), so a forest's
score is read against what its features' frequencies alone would give. A score is the mean over
a forest's scored links; its 95% interval resamples documents (:mod:`.bootstrap`).

Eligibility is decided once, on the full eval sample (issue 22): the scored links, their control
pairs, and for topic coherence the links whose coherence is defined there (neither lift flat)
stay the same in every replicate. A link whose score is undefined in a replicate (its child in
none of the drawn documents, or a lift gone flat) keeps its full-sample score there
(:func:`~.bootstrap.keep_point`) rather than leaving that replicate's mean, which would
re-decide eligibility and bias the interval.

Topic coherence's point estimate is biased towards 0 where links rest on few documents: a lift
estimated from a handful of documents is noisy, and noise attenuates a correlation. Its interval
is shifted by the jackknife's bias estimate, which catches part of that bias; the coverage
measured at ``min_docs`` 5 and 20 is in docs/intervals.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hsae_core.evaluation.bootstrap import interval, keep_point
from hsae_core.evaluation.metrics import EvalCounts

#: Replicates whose per-feature label counts are held at once (memory: chunk x n x labels).
CHUNK = 64


@dataclass(frozen=True)
class SemanticConfig:
    """``min_docs``: documents each endpoint must fire in for a link to be scored; ``alpha``:
    pseudo-documents of the label prior in each feature's label distribution; ``seed``: the
    control's draw."""

    min_docs: int = 5
    alpha: float = 1.0
    seed: int = 0


def label_onehot(labels: torch.Tensor, n_labels: int) -> torch.Tensor:
    """``[n_docs, n_labels]`` float64 one-hot of each document's label (a row of zeros for -1,
    no label)."""
    onehot = torch.zeros(labels.numel(), n_labels, dtype=torch.float64)
    has = labels >= 0
    onehot[has, labels[has]] = 1.0
    return onehot


def doc_indicator(counts: EvalCounts, level: int) -> torch.Tensor:
    """``[n_l, n_docs]`` bool: feature i fires in document k (:meth:`EvalCounts.documents`)."""
    m = counts.fired[level].matrix(counts.documents())
    return m.to_dense() > 0


def lift_correlation(parent: torch.Tensor, child: torch.Tensor, base: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """Per row, the Pearson correlation over labels of the smoothed lift of two label-count
    arrays ``[..., T]`` (the last axis is the label); NaN where either lift is flat."""
    def lift(n):
        q = (n + alpha * base) / (n.sum(-1, keepdim=True) + alpha)
        return q / base
    a, b = lift(parent), lift(child)
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 1e-12, (a * b).sum(-1) / den.clamp_min(1e-12),
                       torch.full_like(den, float("nan")))


def control_parents(parent: torch.Tensor, doc_freq: torch.Tensor, live: torch.Tensor,
                    gen: torch.Generator) -> torch.Tensor:
    """For each parent id, a random other live feature of its level from the same decile of
    document frequency (the whole live set when its decile holds no other)."""
    ids = torch.nonzero(live).flatten()
    freq = doc_freq[ids].double()
    edges = torch.quantile(freq, torch.linspace(0, 1, 11, dtype=torch.float64))
    decile = torch.bucketize(freq, edges[1:-1], right=True)
    by_decile = {int(k): ids[decile == k] for k in decile.unique()}
    out = torch.empty_like(parent)
    for i, p in enumerate(parent.tolist()):
        k = int(torch.bucketize(doc_freq[p].double().reshape(1), edges[1:-1], right=True))
        pool = by_decile.get(k, ids)
        pool = pool[pool != p] if (pool != p).any() else ids[ids != p]
        out[i] = pool[torch.randint(len(pool), (1,), generator=gen)]
    return out


def pair_semantics(counts: EvalCounts, pair: int, weights: torch.Tensor,
                   labels: torch.Tensor | None, n_labels: int, cfg: SemanticConfig,
                   gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """Replicate values ``[R]`` of one level pair's scores and of their controls, and per-link
    point scores (for the browser)."""
    parent_of = counts.forest.parent_of[pair]
    kid_ind, par_ind = doc_indicator(counts, pair + 1), doc_indicator(counts, pair)
    kid_docs, par_docs = kid_ind.sum(1), par_ind.sum(1)
    kids = torch.nonzero(parent_of >= 0).flatten()
    parents = parent_of[kids]
    scored = (kid_docs[kids] >= cfg.min_docs) & (par_docs[parents] >= cfg.min_docs)
    kids, parents = kids[scored], parents[scored]
    control = control_parents(parents, par_docs, par_docs >= cfg.min_docs, gen)
    w = weights.t().contiguous()  # [n_docs, R]
    out: dict[str, torch.Tensor] = {"links_scored": torch.full((weights.shape[0],),
                                                                float(kids.numel()))}
    per_link: dict = {"children": kids.tolist(), "parents": parents.tolist()}
    nan = torch.full((weights.shape[0],), float("nan"), dtype=torch.float64)
    for name, ps in (("", parents), ("_random", control)):
        both = (par_ind[ps] & kid_ind[kids]).double() @ w  # [links, R]
        kid_w = kid_ind[kids].double() @ w  # a row may hold none of a child's documents
        ratio = torch.where(kid_w > 0, both / kid_w.clamp_min(1e-12), torch.nan)
        ratio = keep_point(ratio.t(), (kid_w > 0).t())  # [R, links]
        out[f"doc_cooccurrence{name}"] = ratio.mean(1) if kids.numel() else nan
        if name == "":
            per_link["doc_cooccurrence"] = ratio[0].tolist()
        if labels is None:
            continue
        # label counts per feature and replicate, one matmul per label over its documents
        # (each document has one label, so this is the one-hot product without its zeros)
        by_label = [torch.nonzero(labels == t).flatten() for t in range(n_labels)]
        p_ind = [par_ind[ps][:, d].double() for d in by_label]
        c_ind = [kid_ind[kids][:, d].double() for d in by_label]
        coh, point = [], None
        for s in range(0, weights.shape[0], CHUNK):
            wc = w[:, s:s + CHUNK]  # [n_docs, r]
            per_label = torch.stack([wc[d].sum(0) for d in by_label], 1)  # [r, T]
            base = per_label / per_label.sum(1, keepdim=True)
            np_ = torch.stack([m @ wc[d] for m, d in zip(p_ind, by_label)], 2)  # [links, r, T]
            nc = torch.stack([m @ wc[d] for m, d in zip(c_ind, by_label)], 2)
            corr = lift_correlation(np_.transpose(0, 1), nc.transpose(0, 1), base[:, None, :],
                                    cfg.alpha)  # [r, links]
            point = corr[0] if point is None else point  # the first chunk holds row 0
            corr = torch.where(torch.isnan(corr), point.expand_as(corr), corr)
            coherent = ~torch.isnan(point)
            coh.append(corr[:, coherent].mean(1) if bool(coherent.any())
                       else nan[: corr.shape[0]])
            if s == 0 and name == "":
                per_link["topic_coherence"] = corr[0].tolist()
        out[f"topic_coherence{name}"] = torch.cat(coh)
    return out, per_link


def semantic_replicates(counts: EvalCounts, weights: torch.Tensor,
                        doc_labels: torch.Tensor | None, n_labels: int,
                        cfg: SemanticConfig = SemanticConfig()) -> tuple[dict, list]:
    """Every level pair's scores and controls and their mean over pairs as replicate values
    ``[R]`` keyed ``pair<l>/<name>`` and ``mean/<name>``; plus per-pair per-link point scores.
    ``doc_labels``: the label of each document of :meth:`EvalCounts.documents` (-1: none), or
    None when the corpus has no label column (topic coherence is then absent)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    reps, links = {}, []
    for l in range(counts.forest.n_pairs):
        r, per_link = pair_semantics(counts, l, weights, doc_labels, n_labels, cfg, gen)
        reps.update({f"pair{l}/{k}": v for k, v in r.items()})
        links.append(per_link)
    for key in sorted({k.split("/")[1] for k in reps}):
        vals = torch.stack([reps[f"pair{l}/{key}"] for l in range(counts.forest.n_pairs)])
        reps[f"mean/{key}"] = torch.nanmean(vals, 0) if key != "links_scored" else vals.sum(0)
    return reps, links


def link_semantics(counts: EvalCounts, weights: torch.Tensor, doc_labels: torch.Tensor | None,
                   n_labels: int, cfg: SemanticConfig = SemanticConfig()) -> tuple[dict, list]:
    """:func:`semantic_replicates` summarised: each score as ``value``, ``value_lo``,
    ``value_hi`` (the 95% interval of :func:`~.bootstrap.interval`; ``weights``: the rows of
    :func:`~.bootstrap.replicate_weights`) per pair and on average; plus the per-link point
    scores."""
    reps, links = semantic_replicates(counts, weights, doc_labels, n_labels, cfg)
    out: dict = {}
    for key, values in reps.items():
        group, name = key.split("/")
        point, lo, hi = interval(values)
        dest = out.setdefault(group, {})
        if name == "links_scored":
            dest[name] = int(point)
        else:
            dest[name], dest[f"{name}_lo"], dest[f"{name}_hi"] = point, lo, hi
    return out, links


def document_labels(doc_ids: torch.Tensor, label_of: np.ndarray) -> torch.Tensor:
    """The label index of each document id (``label_of``: the store's ``documents/label``)."""
    return torch.from_numpy(label_of[doc_ids.numpy()].astype(np.int64))


__all__ = ["SemanticConfig", "control_parents", "doc_indicator", "document_labels", "label_onehot",
           "lift_correlation", "link_semantics", "pair_semantics", "semantic_replicates"]
