"""Per-document sums and the document bootstrap behind every interval in ``metrics/`` (METHOD §4).

Evaluation tokens are not independent: a document's tokens share a topic, and so share the
features that fire. Every metric is therefore a function of sums over documents, and its 95%
interval comes from resampling documents with replacement: replicate ``r`` weights document
``d`` by ``w[r, d]`` (multinomial counts summing to the number of documents), every sum becomes
``sum_d w[r, d] * s_d`` and the metric is recomputed from the reweighted sums. Replicate 0 has
unit weights (the point estimate). The interval is the 2.5% and 97.5% percentiles of the other
replicates (percentile bootstrap).

Sums are kept sparse, ``(document, index) -> value``, so memory grows with the active entries,
never with documents x features.
"""

from __future__ import annotations

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
    """``[1 + n_boot, n_docs]`` float64: unit weights, then ``n_boot`` multinomial resamples of
    the documents (each row sums to ``n_docs``)."""
    rng = np.random.default_rng(seed)
    boot = rng.multinomial(n_docs, np.full(n_docs, 1.0 / n_docs), size=n_boot) if n_boot else \
        np.zeros((0, n_docs))
    return torch.from_numpy(np.vstack([np.ones((1, n_docs)), boot]).astype(np.float64))


def totals(weights: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Reweighted totals ``[R, size]`` of a ``[size, n_docs]`` sparse (or dense) sum matrix."""
    if sums.layout == torch.strided:
        return weights @ sums.t()
    return torch.sparse.mm(sums, weights.t().contiguous()).t()


def interval(values: torch.Tensor) -> tuple[float, float, float]:
    """``(point, lo, hi)`` from replicate values ``[R]`` (replicate 0 is the point estimate;
    NaN replicates are ignored; bounds are NaN without replicates)."""
    point = float(values[0])
    boot = values[1:]
    boot = boot[~torch.isnan(boot)]
    if boot.numel() == 0:
        return point, float("nan"), float("nan")
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype)).tolist()
    return point, lo, hi


__all__ = ["DocSums", "doc_weights", "interval", "totals"]
