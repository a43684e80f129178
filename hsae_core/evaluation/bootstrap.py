"""Per-document sums and the document resampling behind every interval in ``metrics/`` (METHOD
§4: "give bootstrap intervals over documents"; the metrics are the paper's §4.2 and Appendix D
ones; issue 22).

What an interval covers. Evaluation tokens are not independent: a document's tokens share a
topic, and so share the features that fire. Every metric is therefore a function of sums over
documents, and its uncertainty comes from resampling the eval documents: a row of weights
``w[r, d]`` turns every sum into ``sum_d w[r, d] * s_d`` and the metric is recomputed from the
reweighted sums. Row 0 has unit weights: the point estimate. The interval covers the choice of
eval documents only, with the trained models held fixed (the seed study covers training).

Eligibility is decided once, on row 0. The links (or features) over which a metric averages
are those that qualify on the full eval sample, and every row averages over the same set
(:mod:`.metrics`, :mod:`.semantic` state each rule). A link whose ratio is undefined in a row
(its conditioning feature fires in none of that row's documents) keeps its full-sample value
there (:func:`keep_point`): leaving the row's mean instead re-decides eligibility, which is
what biased the earlier bootstrap (rarely firing children, typically with a low
P(parent|child), left about 37% of the resamples, so the resamples' mean sat above the point
and the percentile interval missed it).

The interval: the jackknife over documents, bias-corrected (Quenouille-Tukey; Efron &
Tibshirani 1993, ch. 10-11). Leaving group ``g`` of documents out is one more row of weights
(zero on its documents, one elsewhere), so it runs through the same reweighted sums. With
``G`` groups and leave-out values ``theta_(g)`` of mean ``theta_(.)``, the bias is
``b = (G - 1) (theta_(.) - theta)``, the standard error
``se = sqrt((G - 1) / G * sum_g (theta_(g) - theta_(.))^2)``, and the interval
``theta - b -/+ t_{G-1, 0.975} se``. :func:`replicate_weights` deals the documents into
``min(n_docs, rows)`` groups by a seeded permutation (one document per group, the plain
delete-one jackknife, whenever the documents are no more than the rows asked for: the
reference run's 929 documents with metrics.bootstrap = 1000).

Why this interval, as measured (``benchmarks/bootstrap_coverage.py``; docs/intervals.md has
the tables): on a synthetic forest whose population values are known exactly
(tests/test_bootstrap_coverage.py), with eligibility fixed, every interval method covers
Hamming and the pooled forms at about 95%. Two features of these statistics separate them:

- Topic coherence is a mean of per-link correlations whose point estimate is biased by more
  than its standard error (a lift estimated from few documents is noisy, and noise attenuates a
  correlation). Percentile-type intervals (percentile, BC, BCa) lie inside the range of the
  resampled values and cannot reach the truth: 0-51% coverage; BCa's bias correction
  saturates once most resamples fall on one side of the point. Intervals shifted by an
  estimated bias do: the basic bootstrap 72-88%, the jackknife 83-92% (links whose ends fire
  in >= 5 and >= 20 documents respectively).
- The macro averages hold links resting on a few documents. For a link whose child fires in
  ``m`` documents the bootstrap's variance is the plug-in one, short by ``(m - 1) / m``; the
  delete-one jackknife's is the small-sample one: BCa covers 88-91%, the jackknife 93-94%.

The jackknife was best or level for every statistic in every setting measured, is symmetric
(|BCa's acceleration| stayed below 0.03: the resampled values are near normal, averages over
many documents and links) and needs at most as many rows as documents. It does not contain its
point by construction: it misses it where the estimated bias exceeds 1.96 standard errors,
which the point then carries and the interval corrects (topic coherence).

Sums are kept sparse, ``(document, index) -> value``, so memory grows with the active entries,
never with documents x features.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class DocSums:
    """Sparse per-document sums of a vector of ``size`` quantities."""

    def __init__(self, size: int):
        self.size = size
        self._keys: list[torch.Tensor] = []
        self._vals: list[torch.Tensor] = []
        self._pending = 0

    def add(self, docs: torch.Tensor, index: torch.Tensor, values: torch.Tensor | None = None
            ) -> None:
        """Add ``values`` (1 each when None) at ``(docs[k], index[k])``; docs are raw document
        ids (non-negative int64)."""
        if docs.numel() == 0:
            return
        keys = docs.to(torch.int64).cpu() * self.size + index.to(torch.int64).cpu()
        vals = (torch.ones(keys.shape, dtype=torch.float64) if values is None
                else values.detach().to(torch.float64).cpu())
        self._keys.append(keys)
        self._vals.append(vals)
        self._pending += keys.numel()
        if self._pending > 4_000_000:  # merge now and then: memory stays ~ distinct entries
            self._merge()

    def _merge(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._keys:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
        keys, inverse = torch.cat(self._keys).unique(return_inverse=True)
        vals = torch.zeros(keys.numel(), dtype=torch.float64).index_add_(
            0, inverse, torch.cat(self._vals))
        self._keys, self._vals, self._pending = [keys], [vals], keys.numel()
        return keys, vals

    def matrix(self, docs: torch.Tensor) -> torch.Tensor:
        """``[size, n_docs]`` sparse CSR (float64); column k is document ``docs[k]`` (``docs``
        sorted, holding every document added)."""
        keys, vals = self._merge()
        cols = torch.searchsorted(docs, keys // self.size)
        coo = torch.sparse_coo_tensor(torch.stack([keys % self.size, cols]), vals,
                                      (self.size, docs.numel()))
        return coo.coalesce().to_sparse_csr()

    def doc_ids(self) -> torch.Tensor:
        """The sorted document ids seen."""
        keys, _ = self._merge()
        return (keys // self.size).unique()


def doc_weights(n_docs: int, n_boot: int, seed: int) -> torch.Tensor:
    """``[1 + n_boot, n_docs]`` float64: unit weights (the point), then ``n_boot`` multinomial
    bootstrap resamples of the documents (each row sums to ``n_docs``; the benchmark compares
    bootstrap intervals with it)."""
    rng = np.random.default_rng(seed)
    boot = rng.multinomial(n_docs, np.full(n_docs, 1.0 / n_docs), size=n_boot) if n_boot else \
        np.zeros((0, n_docs))
    return torch.from_numpy(np.vstack([np.ones((1, n_docs)), boot]).astype(np.float64))


def jackknife_weights(n_docs: int, groups: int, seed: int) -> torch.Tensor:
    """``[G, n_docs]`` float64, ``G = min(n_docs, groups)``: row g is zero on the documents of
    group g and one elsewhere; documents are dealt into the groups by a seeded permutation (one
    document per group when ``n_docs <= groups``: the delete-one jackknife)."""
    g = max(1, min(n_docs, groups))
    perm = np.random.default_rng([seed, 22]).permutation(n_docs)
    of = np.empty(n_docs, dtype=np.int64)
    of[perm] = np.arange(n_docs) % g
    w = np.ones((g, n_docs))
    w[of, np.arange(n_docs)] = 0.0
    return torch.from_numpy(w)


def replicate_weights(n_docs: int, rows: int, seed: int) -> torch.Tensor:
    """The rows every interval is computed from: unit weights (the point), then, when ``rows``
    is positive and there are at least two documents, the jackknife's ``min(n_docs, rows)``
    leave-a-group-out rows (:func:`jackknife_weights`). The same arguments give the same rows
    for every model, so a difference of two models' values is paired."""
    point = torch.ones(1, n_docs, dtype=torch.float64)
    if rows <= 0 or n_docs < 2:
        return point
    return torch.cat([point, jackknife_weights(n_docs, rows, seed)])


def totals(weights: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Reweighted totals ``[R, size]`` of a ``[size, n_docs]`` sparse (or dense) sum matrix."""
    if sums.layout == torch.strided:
        return weights @ sums.t()
    return torch.sparse.mm(sums, weights.t().contiguous()).t()


def keep_point(values: torch.Tensor, defined: torch.Tensor) -> torch.Tensor:
    """``values [R, ...]`` where ``defined``, else row 0's value (the full sample's): the rule
    for an eligible item whose statistic is undefined in a row (module docstring)."""
    return torch.where(defined, values, values[:1].expand_as(values))


Z975 = 1.959963984540054  # the normal 97.5% quantile


#: Student's t 97.5% quantiles for 1-10 degrees of freedom.
T975_SMALL = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
              2.262157, 2.228139)


def t975(df: int) -> float:
    """Student's t 97.5% quantile with ``df`` degrees of freedom (tabulated up to 10, a
    Cornish-Fisher expansion above: within 3e-4 of the exact value)."""
    if df <= len(T975_SMALL):
        return T975_SMALL[max(df, 1) - 1]
    z, v = Z975, float(df)
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3))


def jackknife(values: torch.Tensor) -> tuple[float, float, int]:
    """``(bias, se, G)`` of the jackknife rows ``values[1:]`` against the point ``values[0]``
    (NaN rows ignored; G counts the others)."""
    values = values.double()
    jack = values[1:]
    jack = jack[~torch.isnan(jack)]
    g = jack.numel()
    if g < 2:
        return float("nan"), float("nan"), g
    mean = jack.mean()
    bias = (g - 1) * float(mean - values[0])
    se = math.sqrt((g - 1) / g * float((jack - mean).pow(2).sum()))
    return bias, se, g


def interval(values: torch.Tensor) -> tuple[float, float, float]:
    """``(point, lo, hi)``: the 95% bias-corrected jackknife interval (module docstring) of
    replicate values laid out as :func:`replicate_weights` lays out rows (the point, then the
    jackknife's). Bounds are NaN with fewer than two jackknife values or a NaN point, and equal
    the point when no row differs from it."""
    point = float(values[0])
    bias, se, g = jackknife(values)
    if math.isnan(point) or g < 2:
        return point, float("nan"), float("nan")
    if se == 0.0 and bias == 0.0:
        return point, point, point
    centre, half = point - bias, t975(g - 1) * se
    return point, centre - half, centre + half


__all__ = ["DocSums", "doc_weights", "interval", "jackknife", "jackknife_weights", "keep_point",
           "replicate_weights", "t975", "totals"]
