"""The two couplings between adjacent levels, in exact sparse form (METHOD §3).

Never builds a ``[batch, parents, d]`` tensor. For a parent i with children C_i and
``S_i = sum_{j in C_i} a_j d_j``:

  ||a_i d_i - S_i||^2 = a_i^2 ||d_i||^2 - 2 a_i sum_j a_j <d_i, d_j>
                        + sum_j a_j^2 ||d_j||^2 + 2 sum_{j<k in C_i} a_j a_k <d_j, d_k>

summed over tokens b and parents i with children (§3.1), averaged over the batch:

- the diagonal terms are per-feature sums of a^2 times squared row norms;
- the parent-child term pairs each child entry with its parent's entry at the same token (a
  sorted-key lookup) and uses one Gram value <d_parent(j), d_j> per link, sampled from
  ``W_c W_p^T`` on the link pattern;
- the sibling term runs over pairs of children of one parent that fire on the same token
  (rare: the sparsity penalty discourages it), again with sampled Gram values.

Support entries with value 0 (inside the JumpReLU window) are kept: they add nothing to the
loss but carry its gradient to the threshold, exactly as the dense formula does.
The backward is written by hand: each decoder receives one gradient buffer, built with
embedding-bag sums (no ``[pairs, d]`` gathers). Cost per step: O(nnz + links + n * d).

The perturbation (§3.2, METHOD §1) is applied in :meth:`HSAE._decode_all` with
:func:`swap_masks`: swapped parents' entries are masked out of level l's decode and their
children's entries are decoded into level l's reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .forest import Links
from .jumprelu import SparseCode
from .sparse_ops import SupportPattern, bag_sum, sddmm


@dataclass
class _PCIndex:
    """Index lists of one level pair for one batch (no gradients flow through these)."""

    hit_p: torch.Tensor  # parent entry met by ...
    hit_c: torch.Tensor  # ... the child entry at the same token whose parent it is
    hit_link: torch.Tensor  # the link (child feature) of each hit
    sib_a: torch.Tensor  # child entries a < b of one parent firing on one token
    sib_b: torch.Tensor

    @classmethod
    def build(cls, parent: SupportPattern, child: SupportPattern, parent_of: torch.Tensor,
              links: Links) -> "_PCIndex":
        n_parents = links.by_parent_crow.numel() - 1
        c_par = parent_of[child.cols]
        assigned = c_par >= 0
        c_keys = child.rows * n_parents + c_par
        if parent.mask is not None:  # dense lookups: O(nnz), no search
            hit = assigned & parent.mask[child.rows, c_par.clamp(min=0)]
            hit_c = hit.nonzero(as_tuple=True)[0]
            hit_p = _entry_index(parent)[child.rows[hit_c], c_par[hit_c]].long()
        elif parent.nnz and child.nnz:
            p_keys = parent.rows * n_parents + parent.cols  # sorted: supports are row-major
            pos = torch.searchsorted(p_keys, c_keys).clamp_(max=p_keys.numel() - 1)
            hit_c = (assigned & (p_keys[pos] == c_keys)).nonzero(as_tuple=True)[0]
            hit_p = pos[hit_c]
        else:
            hit_c = hit_p = c_keys.new_zeros(0)
        hit_link = links.by_child_crow[child.cols[hit_c]]
        keys = torch.where(assigned, c_keys, -1)
        if parent.mask is not None:  # sort only the entries that share a (token, parent)
            sel = assigned.nonzero(as_tuple=True)[0]
            sel = sel[_cofiring(child.rows[sel], c_par[sel], child.n_rows, n_parents)]
            a, b = _sibling_pairs(keys[sel])
            sib_a, sib_b = sel[a], sel[b]
        else:
            sib_a, sib_b = _sibling_pairs(keys)
        return cls(hit_p, hit_c, hit_link, sib_a, sib_b)


_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(name: str, n_rows: int, n_cols: int, device) -> torch.Tensor:
    """A reusable int32 ``[n_rows, n_cols]`` buffer. Never cleared: callers write the cells
    they read in the same step, so stale cells are never seen."""
    key = (name, n_rows, n_cols, device)
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.empty(n_rows, n_cols, dtype=torch.int32, device=device)
    return _SCRATCH[key]


def _entry_index(pattern: SupportPattern) -> torch.Tensor:
    """``[n_rows, n_cols]`` map from (row, col) to the entry's position, valid on the support."""
    buf = _scratch("entry", pattern.n_rows, pattern.n_cols, pattern.rows.device)
    buf[pattern.rows, pattern.cols] = torch.arange(pattern.nnz, dtype=torch.int32,
                                                   device=pattern.rows.device)
    return buf


def _cofiring(rows: torch.Tensor, par: torch.Tensor, n_rows: int, n_parents: int) -> torch.Tensor:
    """Bool over entries: another entry has the same (row, parent). O(nnz), no sort."""
    buf = _scratch("count", n_rows, n_parents, rows.device)
    buf[rows, par] = 0
    buf.index_put_((rows, par), torch.ones_like(rows, dtype=torch.int32), accumulate=True)
    return buf[rows, par] > 1


def _sibling_pairs(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs (a, b), a before b in sorted order, of entries with equal keys >= 0."""
    sorted_keys, order = torch.sort(keys, stable=True)
    n = sorted_keys.numel()
    if n < 2:
        return keys.new_zeros(0), keys.new_zeros(0)
    same_as_next = (sorted_keys[1:] == sorted_keys[:-1]) & (sorted_keys[1:] >= 0)
    if not bool(same_as_next.any()):
        return keys.new_zeros(0), keys.new_zeros(0)
    # end (exclusive) of each position's run of equal keys
    boundary = torch.ones(n, dtype=torch.bool, device=keys.device)
    boundary[:-1] = ~same_as_next
    run_end = torch.flip(torch.cummin(torch.flip(
        torch.where(boundary, torch.arange(1, n + 1, device=keys.device), n + 1), [0]), 0).values, [0])
    count = run_end - 1 - torch.arange(n, device=keys.device)  # partners after each position
    left = torch.repeat_interleave(torch.arange(n, device=keys.device), count)
    offset = torch.arange(left.numel(), device=keys.device) - torch.repeat_interleave(
        torch.cumsum(count, 0) - count, count)
    return order[left], order[left + 1 + offset]


def _pair_pattern(a: torch.Tensor, b: torch.Tensor, n: int) -> SupportPattern:
    """The ``[n, n]`` pattern with entries (a[k], b[k]), row-sorted; also returns the order."""
    order = torch.argsort(a, stable=True)
    return SupportPattern(a[order], b[order], n, n), order


def _link_pattern(links: Links, n_parents: int) -> SupportPattern:
    """The links as a ``[n_child, n_parent]`` support with one entry per assigned child."""
    return SupportPattern(links.kids, links.par, links.by_child_crow.numel() - 1, n_parents,
                          _crow=links.by_child_crow)


class _PCLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals_p, vals_c, w_p, w_c, pats, idx: _PCIndex, links: Links, masks):
        pat_p, pat_c = pats
        has_children, assigned = masks
        n_c = w_c.shape[0]
        norm2_p = torch.linalg.vector_norm(w_p, dim=1).pow(2)
        norm2_c = torch.linalg.vector_norm(w_c, dim=1).pow(2)
        gram = sddmm(_link_pattern(links, w_p.shape[0]), w_c, w_p)  # <d_parent(j), d_j>
        diag_p = torch.where(has_children, norm2_p, 0.0)
        diag_c = torch.where(assigned, norm2_c, 0.0)
        sq_p = torch.zeros_like(norm2_p).index_add_(0, pat_p.cols, vals_p.pow(2))
        sq_c = torch.zeros_like(norm2_c).index_add_(0, pat_c.cols, vals_c.pow(2))
        total = (sq_p * diag_p).sum() + (sq_c * diag_c).sum()
        total = total - 2 * (vals_p[idx.hit_p] * vals_c[idx.hit_c] * gram[idx.hit_link]).sum()
        sib_pat, sib_order = _pair_pattern(pat_c.cols[idx.sib_a], pat_c.cols[idx.sib_b], n_c)
        sib_dot = (sddmm(sib_pat, w_c, w_c)[torch.argsort(sib_order)] if idx.sib_a.numel()
                   else vals_c.new_zeros(0))
        total = total + 2 * (vals_c[idx.sib_a] * vals_c[idx.sib_b] * sib_dot).sum()
        ctx.save_for_backward(vals_p, vals_c, w_p, w_c, diag_p, diag_c, sq_p, sq_c, gram, sib_dot)
        ctx.pats, ctx.idx, ctx.links = pats, idx, links
        return total / pat_p.n_rows

    @staticmethod
    def backward(ctx, grad):
        vals_p, vals_c, w_p, w_c, diag_p, diag_c, sq_p, sq_c, gram, sib_dot = ctx.saved_tensors
        pat_p, pat_c = ctx.pats
        idx: _PCIndex = ctx.idx
        links: Links = ctx.links
        s = grad / pat_p.n_rows
        vp_hit, vc_hit, gram_hit = vals_p[idx.hit_p], vals_c[idx.hit_c], gram[idx.hit_link]
        va, vb = vals_c[idx.sib_a], vals_c[idx.sib_b]

        g_vp = 2 * vals_p * diag_p[pat_p.cols]
        g_vp.index_add_(0, idx.hit_p, -2 * vc_hit * gram_hit)
        g_vc = 2 * vals_c * diag_c[pat_c.cols]
        g_vc.index_add_(0, idx.hit_c, -2 * vp_hit * gram_hit)
        g_vc.index_add_(0, idx.sib_a, 2 * vb * sib_dot)
        g_vc.index_add_(0, idx.sib_b, 2 * va * sib_dot)

        # decoder rows: each diagonal term scales its own row; each cross term adds the
        # partner's row with its coefficient summed over the batch (one bag sum per decoder)
        beta = torch.zeros_like(gram).index_add_(0, idx.hit_link, -2 * s * vp_hit * vc_hit)
        perm = links.by_parent_perm
        g_wp = bag_sum(links.kids[perm], links.by_parent_crow, beta[perm], w_c)
        g_wp.addcmul_((2 * s * sq_p * diag_p.ne(0))[:, None], w_p)
        g_wc = bag_sum(links.par, links.by_child_crow, beta, w_p)
        g_wc.addcmul_((2 * s * sq_c * diag_c.ne(0))[:, None], w_c)
        if idx.sib_a.numel():
            ca, cb = pat_c.cols[idx.sib_a], pat_c.cols[idx.sib_b]
            coef = 2 * s * va * vb
            sym, order = _pair_pattern(torch.cat([ca, cb]), torch.cat([cb, ca]), w_c.shape[0])
            g_wc += bag_sum(sym.cols, sym.crow(), torch.cat([coef, coef])[order], w_c)
        return g_vp * s, g_vc * s, g_wp, g_wc, None, None, None, None


def pc_loss(parent: SparseCode, child: SparseCode, w_dec_parent: torch.Tensor,
            w_dec_child: torch.Tensor, parent_of: torch.Tensor, has_children: torch.Tensor,
            links: Links | None = None) -> torch.Tensor:
    """sum_i ||f_i - sum_{j in C_i} f_j||^2 averaged over the batch, for one level pair."""
    links = Links.build(parent_of, w_dec_parent.shape[0]) if links is None else links
    idx = _PCIndex.build(parent.pattern, child.pattern, parent_of, links)
    return _PCLoss.apply(parent.vals, child.vals, w_dec_parent, w_dec_child,
                         (parent.pattern, child.pattern), idx, links, (has_children, parent_of >= 0))


def swap_masks(parent: SparseCode, child: SparseCode, parent_of: torch.Tensor,
               swapped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep mask over parent entries, take mask over child entries) for the ``swapped``
    parents ([n_l] bool, only parents with children): the parent entries leave level l's
    reconstruction and the taken child entries enter it in their place (§3.2)."""
    keep_p = ~swapped[parent.pattern.cols]
    c_par = parent_of[child.pattern.cols]
    take_c = (c_par >= 0) & swapped[c_par.clamp(min=0)]
    return keep_p, take_c
