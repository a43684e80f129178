"""The two couplings between adjacent levels, in exact sparse form (METHOD §3).

Never builds a ``[batch, parents, d]`` tensor. With ``S_i = sum_{j in C_i} a_j d_j``:

  ||a_i d_i - S_i||^2 = a_i^2 ||d_i||^2  -  2 a_i sum_j a_j <d_i, d_j>  +  ||S_i||^2

summed over tokens b and parents i with children (§3.1), averaged over the batch.

Support entries with value 0 (inside the JumpReLU window) are kept: they add nothing to the
loss but carry its gradient to the threshold, exactly as the dense formula does.

- term A runs over the parent entries;
- term B pairs each active child entry with its parent's entry at the same token (a sorted
  key lookup) and uses one Gram value <d_{parent(j)}, d_j> per child feature;
- term C groups active child entries by (token, parent): a group of one contributes
  a_j^2 ||d_j||^2, larger groups (co-firing siblings, rare) are summed exactly in d-space.

Cost: O(nnz + n_children * d + (co-firing sibling entries) * d) per step. The perturbation
(§3.2, METHOD §1) is a delta on level l's reconstruction over the swapped parents only.
"""

from __future__ import annotations

import torch

from .jumprelu import SparseCode
from .sparse_ops import sparse_decode

#: Co-firing sibling entries are summed in chunks of this many rows to bound memory.
SIBLING_CHUNK = 16384


def pc_loss(parent: SparseCode, child: SparseCode, w_dec_parent: torch.Tensor,
            w_dec_child: torch.Tensor, parent_of: torch.Tensor, has_children: torch.Tensor
            ) -> torch.Tensor:
    """sum_i ||f_i - sum_{j in C_i} f_j||^2 averaged over the batch, for one level pair."""
    n_rows, n_parents = parent.pattern.n_rows, w_dec_parent.shape[0]
    vals_p, vals_c = parent.vals, child.vals

    keep_p = has_children[parent.pattern.cols]
    p_rows, p_cols, p_vals = parent.pattern.rows[keep_p], parent.pattern.cols[keep_p], vals_p[keep_p]
    c_par_all = parent_of[child.pattern.cols]
    keep_c = c_par_all >= 0
    c_rows, c_cols, c_vals = child.pattern.rows[keep_c], child.pattern.cols[keep_c], vals_c[keep_c]
    c_par = c_par_all[keep_c]

    norm2_p = w_dec_parent.pow(2).sum(1)
    norm2_c = w_dec_child.pow(2).sum(1)
    term_a = (p_vals.pow(2) * norm2_p[p_cols]).sum()

    # Term B: child entry (b, j) meets parent entry (b, parent(j)) if that one is active.
    p_keys = p_rows * n_parents + p_cols  # sorted: entries are row-major
    c_keys = c_rows * n_parents + c_par
    if p_keys.numel() and c_keys.numel():
        pos = torch.searchsorted(p_keys, c_keys).clamp_(max=p_keys.numel() - 1)
        hit = p_keys[pos] == c_keys
        assigned = (parent_of >= 0).nonzero(as_tuple=True)[0]
        gram = torch.zeros(w_dec_child.shape[0], dtype=w_dec_child.dtype, device=w_dec_child.device)
        gram = gram.index_put((assigned,), (w_dec_parent[parent_of[assigned]] * w_dec_child[assigned]).sum(1))
        term_b = -2 * (p_vals[pos[hit]] * c_vals[hit] * gram[c_cols[hit]]).sum()
    else:
        term_b = w_dec_child.new_zeros(())

    # Term C: ||S_{b,i}||^2 over (token, parent) groups of child entries.
    term_c = w_dec_child.new_zeros(())
    if c_keys.numel():
        sorted_keys, order = torch.sort(c_keys, stable=True)
        _, group, counts = torch.unique_consecutive(sorted_keys, return_inverse=True, return_counts=True)
        single = counts[group] == 1
        o1 = order[single]
        term_c = term_c + (c_vals[o1].pow(2) * norm2_c[c_cols[o1]]).sum()
        multi = order[~single]
        if multi.numel():
            _, mgroup = torch.unique_consecutive(sorted_keys[~single], return_inverse=True)
            for s, e in _chunks_by_group(multi.numel(), mgroup, SIBLING_CHUNK):
                idx, g = multi[s:e], mgroup[s:e] - mgroup[s]
                sums = w_dec_child.new_zeros(int(g[-1]) + 1, w_dec_child.shape[1])
                sums = sums.index_add(0, g, c_vals[idx, None] * w_dec_child[c_cols[idx]])
                term_c = term_c + sums.pow(2).sum()
    return (term_a + term_b + term_c) / n_rows


def _chunks_by_group(n: int, group: torch.Tensor, chunk: int):
    start = 0
    while start < n:
        end = min(n, start + chunk)
        while end < n and group[end] == group[end - 1]:
            end += 1
        yield start, end
        start = end


def swap_delta(parent: SparseCode, child: SparseCode, w_dec_parent: torch.Tensor,
               w_dec_child: torch.Tensor, parent_of: torch.Tensor, swapped: torch.Tensor
               ) -> torch.Tensor:
    """Change of level l's reconstruction when the ``swapped`` parents ([n_l] bool, only
    parents with children) are replaced by their children's contributions (§3.2)."""
    take_p = swapped[parent.pattern.cols]
    c_par = parent_of[child.pattern.cols]
    take_c = (c_par >= 0) & swapped[c_par.clamp(min=0)]
    added = sparse_decode(child.pattern.subset(take_c), child.vals[take_c], w_dec_child)
    removed = sparse_decode(parent.pattern.subset(take_p), parent.vals[take_p], w_dec_parent)
    return added - removed
