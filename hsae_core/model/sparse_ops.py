"""Sparse kernels for JumpReLU SAEs: the activation support as CSR, and the three products.

A JumpReLU level fires on about L0 of n features per token, so everything after the dense
encoder matmul is cheap when done on the support (row, col) pairs only:

- ``spmm_rows``:  out[b]   = sum_{(b,i) in S} v_bi W[i]       (decoder forward)
- ``spmm_cols``:  out[i]   = sum_{(b,i) in S} v_bi X[b]       (dW_dec, dW_enc)
- ``sddmm``:      out_bi   = <G[b], W[i]>  for (b,i) in S     (dL/da on the support)

Each switches to a dense matmul when the support is dense (early in training), so cost is
min(dense, sparse). The dense twin of every op is the obvious formula and lives in the tests.
On CUDA only building a support (``nonzero``, once per level and step) makes the host wait for
the device; offsets come from binary searches, not ``bincount`` (tests/test_sync_count.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

#: Above this fraction of nonzeros a dense matmul beats the sparse kernels. CPU: measured with
#: benchmarks/dense_cutoff.py (a training step of one level, d = 576, 1024 latents, 2 threads:
#: the sparse path is 2.4x faster at 5%, 1.15x at 20%, 1.09x slower at 30%). CUDA: measured by
#: benchmarks/gpu_check.py on one H200 (a training step of one level, d = 2304, 16384 latents,
#: batch 1024, fp32): sparse 1.19x faster at 0.6%, 1.13x at 1.1%, 1.15x slower at 2.0%, 2.5x
#: slower at 8%; crossover 1.4%. Yet with 0.014 the whole HSAE step at the paper's sizes was
#: no faster (32.5 ms fp32, against 29.8 and 33.2 ms in two runs with 0.08) and made 34 host
#: syncs per step instead of 22, so CUDA keeps 0.08 until the dense path is as sync-free as the
#: sparse one. A float here applies to every device (the tests force either path).
DENSE_CUTOFF: float | dict[str, float] = {"cpu": 0.25, "default": 0.08}


def dense_cutoff(device: torch.device) -> float:
    if isinstance(DENSE_CUTOFF, dict):
        return DENSE_CUTOFF.get(device.type, DENSE_CUTOFF["default"])
    return DENSE_CUTOFF

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")


@dataclass
class SupportPattern:
    """The (row, col) pairs of a ``[batch, n]`` activation support, in row-major order.

    Built once per level and step; column-major views are derived lazily (backward only).
    """

    rows: torch.Tensor  # [nnz] int64, sorted
    cols: torch.Tensor  # [nnz] int64
    n_rows: int
    n_cols: int
    _crow: torch.Tensor | None = field(default=None, repr=False)
    mask: torch.Tensor | None = field(default=None, repr=False)  # the dense bool it came from
    _by_col: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(
        default=None, repr=False)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "SupportPattern":
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(rows, cols, mask.shape[0], mask.shape[1], mask=mask)

    @classmethod
    def from_masks(cls, masks: list[torch.Tensor]) -> list["SupportPattern"]:
        """:meth:`from_mask` of every mask, their sizes read back at once: one host sync on
        CUDA for all levels instead of one per level."""
        return cls.from_masks_reading(masks)[0]

    @classmethod
    def from_masks_reading(cls, masks: list[torch.Tensor], also: list[torch.Tensor] = ()
                           ) -> tuple[list["SupportPattern"], list]:
        """:meth:`from_masks`, and the 0-dim tensors ``also`` read back in the same host sync
        (their Python values)."""
        # count_nonzero: a bool sum casts every element to int64 first (13-18x slower on the
        # CPU at d 576's ladders, a tenth of a training step: benchmarks/support_count.py)
        counts = [torch.count_nonzero(m) for m in masks] + [a.to(torch.int64) for a in also]
        sizes = torch.stack(counts).tolist() if counts else []
        out = []
        for mask, n in zip(masks, sizes):
            rows, cols = torch.nonzero_static(mask, size=n).t().contiguous().unbind(0)
            out.append(cls(rows, cols, mask.shape[0], mask.shape[1], mask=mask))
        return out, sizes[len(masks):]

    @property
    def nnz(self) -> int:
        return self.rows.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.n_rows * self.n_cols)

    @property
    def is_dense(self) -> bool:
        return self.density > dense_cutoff(self.rows.device)

    def crow(self) -> torch.Tensor:
        if self._crow is None:
            self._crow = sorted_offsets(self.rows, self.n_rows)
        return self._crow

    def by_col(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(perm, col_ptr, rows_by_col): entries reordered column-major, rows sorted within."""
        if self._by_col is None:
            perm = torch.argsort(self.cols, stable=True)
            col_ptr = sorted_offsets(self.cols.index_select(0, perm), self.n_cols)
            self._by_col = (perm, col_ptr, self.rows.index_select(0, perm))
        return self._by_col

    def to_dense(self, vals: torch.Tensor) -> torch.Tensor:
        out = vals.new_zeros(self.n_rows, self.n_cols)
        return out.index_put((self.rows, self.cols), vals)

    def take(self, index: torch.Tensor) -> "SupportPattern":
        """The entries at positions ``index`` (ascending, so row order is preserved)."""
        return SupportPattern(self.rows.index_select(0, index), self.cols.index_select(0, index),
                              self.n_rows, self.n_cols)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=out[1:])
    return out


_ARANGE: dict[tuple, torch.Tensor] = {}


def arange(n: int, dtype: torch.dtype = torch.int64, device=None) -> torch.Tensor:
    """``torch.arange(n)`` as a view of a kept buffer that grows as needed: no kernel per call
    (issue 23: the training step asks for a dozen each step). Read-only: never write into it."""
    key = (dtype, torch.device(device) if device is not None else torch.device("cpu"))
    buf = _ARANGE.get(key)
    if buf is None or buf.numel() < n:
        size = max(n, 2 * buf.numel() if buf is not None else 0, 1024)
        buf = _ARANGE[key] = torch.arange(size, dtype=dtype, device=key[1])
    return buf[:n]


def sorted_offsets(index: torch.Tensor, n: int) -> torch.Tensor:
    """``[n + 1]`` CSR offsets of ascending ``index`` in [0, n): ``out[k]`` = number of entries
    below k, by binary search. (``bincount`` would read the maximum back to size its output: two
    host synchronisations on CUDA.)"""
    return torch.searchsorted(index, arange(n + 1, index.dtype, index.device))


def _csr(crow: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, cols, vals, size=shape, check_invariants=False)


def spmm_rows(p: SupportPattern, vals: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``[n_rows, d]``: each row b sums vals * w[col] over its entries (no autograd)."""
    if p.is_dense:
        return p.to_dense(vals) @ w
    return bag_sum(p.cols, p.crow(), vals, w)


def spmm_cols(p: SupportPattern, vals: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[n_cols, d]``: each column i sums vals * x[row] over its entries (no autograd)."""
    if p.is_dense:
        return p.to_dense(vals).t() @ x
    perm, col_ptr, rows_by_col = p.by_col()
    return bag_sum(rows_by_col, col_ptr, vals[perm], x)


def bag_sum(index: torch.Tensor, ptr: torch.Tensor, weights: torch.Tensor, table: torch.Tensor
             ) -> torch.Tensor:
    """out[k] = sum_{e in ptr[k]:ptr[k+1]} weights[e] * table[index[e]]: an embedding-bag sum,
    which writes each output row once (CSR matmul kernels zero-fill and copy their output)."""
    if index.numel() == 0:
        return table.new_zeros(ptr.numel() - 1, table.shape[1])
    with torch.no_grad():
        # detached: with an input that requires grad, embedding_bag takes its slower
        # training path (bag bookkeeping for a backward we never run)
        return torch.nn.functional.embedding_bag(
            index, table.detach(), ptr[:-1], mode="sum",
            per_sample_weights=weights.detach().to(table.dtype))


def scatter_bag_sum_(out: torch.Tensor, dest: torch.Tensor, index: torch.Tensor,
                     weights: torch.Tensor, table: torch.Tensor, dest_sorted: bool = False
                     ) -> torch.Tensor:
    """``out[dest[k]] += weights[k] * table[index[k]]`` for all k, in place: one weighted bag
    sum per distinct destination row (no ``[k, d]`` gather, no ``[n, d]`` temporary).
    ``dest_sorted`` skips the sort when ``dest`` is already ascending."""
    if dest.numel() == 0:
        return out
    if not dest_sorted:
        dest, order = torch.sort(dest, stable=True)
        index, weights = index.index_select(0, order), weights.index_select(0, order)
    uniq, counts = torch.unique_consecutive(dest, return_counts=True)
    with torch.no_grad():
        sums = torch.nn.functional.embedding_bag(
            index, table.detach(), _offsets(counts), mode="sum",
            per_sample_weights=weights.detach().to(table.dtype), include_last_offset=True)
    return out.index_add_(0, uniq, sums)


def sddmm(p: SupportPattern, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``[nnz]``: <g[row], w[col]> for every entry (no autograd)."""
    if p.is_dense:
        return (g @ w.t())[p.rows, p.cols]
    if p.nnz == 0:
        return g.new_zeros(0)
    pattern = _csr(p.crow(), p.cols, g.new_zeros(p.nnz), (p.n_rows, p.n_cols))
    return torch.sparse.sampled_addmm(pattern, g, w.t(), beta=0.0).values()


class SparseDecode(torch.autograd.Function):
    """``out = A @ W`` for a sparse A given by (pattern, vals); gradients for vals and W.
    (The HSAE's training forward decodes all levels at once: coupled_decode.py.)"""

    @staticmethod
    def forward(ctx, vals, w, pattern: SupportPattern):
        ctx.save_for_backward(vals, w)
        ctx.pattern = pattern
        return spmm_rows(pattern, vals, w)

    @staticmethod
    def backward(ctx, grad_out):
        vals, w = ctx.saved_tensors
        p: SupportPattern = ctx.pattern
        grad_out = grad_out.contiguous()
        grad_vals = sddmm(p, grad_out, w) if ctx.needs_input_grad[0] else None
        grad_w = spmm_cols(p, vals, grad_out) if ctx.needs_input_grad[1] else None
        return grad_vals, grad_w, None


def sparse_decode(pattern: SupportPattern, vals: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over the support of ``vals * w[col]`` into ``[n_rows, d]``."""
    return SparseDecode.apply(vals, w, pattern)
