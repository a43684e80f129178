"""Every level's decode, the perturbation and the parent-child loss as one autograd node.

The HSAE's training forward (§3.1-3.2) decodes each level on its support, decodes the children
that replace swapped parents into the level above (METHOD §1), and computes the PC loss of
every level pair; all three read and write the same decoder weights.

Two implementations of the same math:

- **merged** (all supports sparse): the decoders are read as one stacked table
  ``[sum n_l, d]`` (a view when :meth:`HSAE.pack_decoders_` put them in one buffer, else a
  copy). The forward is one bag sum whose bags are (level, token): a level's own entries and
  the swapped-in children of the level below it. The backward is one sampled product for every
  activation gradient and one bag sum for every decoder gradient, whose bags are decoder rows
  and whose entries are the decode terms (rows of the output gradient), the PC loss's diagonal
  terms (the row itself) and its cross terms (the partner row) together. The output gradient
  sits in spare rows after the decoders in the same buffer (``slot``), so one table holds
  both; every decoder-gradient row is written once.
- **per level** (some support dense, as early in training): each level decodes on its own,
  switching to dense matmuls, and the PC and swap terms are added to its gradients in place.

The math of each part is that of :func:`~hsae_core.model.sparse_ops.sparse_decode` and
:func:`~hsae_core.model.coupling.forest_pc_loss`; both paths are tested against the dense float64
reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hsae_core.model.coupling import _PairPC, apply_decoder_terms_, pc_backward_terms_, pc_forward
from hsae_core.model.sparse_ops import (
    SupportPattern,
    _csr,
    _offsets,
    arange,
    sddmm,
    sorted_offsets,
    spmm_cols,
    spmm_rows,
)


@dataclass
class DecodePlan:
    """What one batch's coupled decode does, per level l (index lists, no gradients)."""

    patterns: list[SupportPattern]  # level l's support
    keep: list[torch.Tensor | None]  # bool over l's entries: False for swapped parents
    take: list[torch.Tensor | None]  # positions of l's entries decoded into level l-1 instead
    pairs: list[_PairPC]  # the level pairs whose PC loss is computed (may be empty)
    _extra: dict = field(default_factory=dict, repr=False)

    def extra(self, l: int) -> SupportPattern | None:
        """Level l's taken entries as a support (built once: forward and backward read it)."""
        if self.take[l] is None:
            return None
        if l not in self._extra:
            self._extra[l] = self.patterns[l].take(self.take[l])
        return self._extra[l]


def stacked_decoders(ws: list[torch.Tensor], slot_rows: int = 0) -> torch.Tensor | None:
    """``[sum n_l + slot_rows, d]``: a view over the decoders when they are consecutive row
    blocks of one buffer with at least ``slot_rows`` spare rows after them, else None."""
    w0 = ws[0]
    d = w0.shape[1]
    storage = w0.untyped_storage()
    start, rows = w0.storage_offset(), 0
    for w in ws:
        if (not w.is_contiguous() or w.dtype != w0.dtype or w.device != w0.device
                or w.shape[1] != d or w.untyped_storage().data_ptr() != storage.data_ptr()
                or w.storage_offset() != start + rows * d):
            return None
        rows += w.shape[0]
    spare = storage.nbytes() // w0.element_size() - start - rows * d
    if spare < slot_rows * d:
        return None
    # .data: writing the spare rows must not bump the parameters' autograd version counter
    return torch.as_strided(w0.data, (rows + slot_rows, d), (d, 1), start)


def _row_offsets(ws) -> list[int]:
    out = [0]
    for w in ws:
        out.append(out[-1] + w.shape[0])
    return out


def _merge_grouped(sources: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor,
                                       torch.Tensor | None]],
                   n_bags: int):
    """Merge entry lists that are each grouped by bag (bag ascending) into one list grouped by
    bag, the sources in the given order within each bag. A source is (bag per entry or None,
    table index, weight, entries per bag or None); it gives its bags or its counts or both.
    Returns (index, weight, ptr). Sizes are known on the host: no device value is read back."""
    offsets = [sorted_offsets(dest, n_bags) if c is None else _offsets(c)
               for dest, _, _, c in sources]
    ptr = offsets[0].clone()
    for o in offsets[1:]:
        ptr += o
    n = sum(idx.numel() for _, idx, _, _ in sources)
    index = sources[0][1].new_empty(n)
    weight = sources[0][2].new_empty(n)
    before = ptr[:-1].clone()  # where the next source's entries start in each bag
    for (dest, idx, w, _), o in zip(sources, offsets):
        c = o[1:] - o[:-1]
        shift = before - o[:-1]  # per bag: merged start minus this source's start
        shift = (torch.repeat_interleave(shift, c, output_size=idx.numel()) if dest is None
                 else shift.index_select(0, dest))
        pos = arange(idx.numel(), device=idx.device) + shift
        index.index_copy_(0, pos, idx)
        weight.index_copy_(0, pos, w)
        before += c
    return index, weight, ptr


#: Use the merged path whenever every support is sparse (False: always level by level; for A/B
#: measurements and tests).
MERGED = True


class _CoupledDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: DecodePlan, *tensors):
        n = len(plan.patterns)
        vals, ws = list(tensors[:n]), list(tensors[n:])
        merged = MERGED and all(not p.is_dense for p in plan.patterns)
        ctx.merged = merged
        if merged:
            outs, swaps = _merged_forward(ctx, plan, vals, ws)
        else:
            outs, swaps = _per_level_forward(ctx, plan, vals, ws)
        if plan.pairs:
            pc, ctx.pc_state = pc_forward(plan.pairs, vals, ws)
        else:
            pc = vals[0].new_zeros(n - 1)
        ctx.save_for_backward(*tensors)
        ctx.plan = plan
        return (*outs, *swaps, pc)

    @staticmethod
    def backward(ctx, *grads):
        plan: DecodePlan = ctx.plan
        n = len(plan.patterns)
        tensors = ctx.saved_tensors
        vals, ws = list(tensors[:n]), list(tensors[n:])
        if ctx.merged:
            g_vals, g_w = _merged_backward(ctx, plan, vals, ws, grads)
        else:
            g_vals, g_w = _per_level_backward(ctx, plan, vals, ws, grads)
        return (None, *g_vals, *g_w)


# ------------------------------------------------------------------ merged (sparse supports)

def _merged_forward(ctx, plan: DecodePlan, vals, ws):
    """One bag sum over the stacked decoders; bag (l, b) holds level l's kept entries of token
    b, then the children decoded into level l in place of their swapped parents."""
    n = len(plan.patterns)
    B = plan.patterns[0].n_rows
    off = _row_offsets(ws)
    wall = stacked_decoders(ws)
    if wall is None:  # not packed (HSAE.pack_decoders_): a copy
        wall = torch.cat([w.detach() for w in ws])
    idx_parts, w_parts, ptr_parts, own_pos, take_pos, bases = [], [], [], [], [], []
    kept: list[torch.Tensor] = []  # per level, its values with swapped parents' zeroed
    taken: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # level: (stacked rows, values)
    base = 0
    for l in range(n):
        p, keep = plan.patterns[l], plan.keep[l]
        v = vals[l] if keep is None else vals[l] * keep
        kept.append(v)
        crow = p.crow()
        e = plan.extra(l + 1) if l + 1 < n else None
        bases.append(base)
        if e is None or e.nnz == 0:
            idx_parts.append(p.cols + off[l])
            w_parts.append(v)
            ptr_parts.append(crow[:-1] + base)
            own_pos.append(None)
            take_pos.append(None)
            base += p.nnz
            continue
        t_ptr = sorted_offsets(e.rows, B)
        pos_own = arange(p.nnz, device=crow.device) + t_ptr.index_select(0, p.rows)
        pos_take = arange(e.nnz, device=crow.device) + crow.index_select(0, e.rows + 1)
        idx = p.cols.new_empty(p.nnz + e.nnz)
        e_cols = e.cols + off[l + 1]
        taken_vals = vals[l + 1].index_select(0, plan.take[l + 1])
        idx.index_copy_(0, pos_own, p.cols + off[l]).index_copy_(0, pos_take, e_cols)
        w = v.new_empty(p.nnz + e.nnz)
        w.index_copy_(0, pos_own, v).index_copy_(0, pos_take, taken_vals)
        taken[l + 1] = (e_cols, taken_vals)
        idx_parts.append(idx)
        w_parts.append(w)
        ptr_parts.append(crow[:-1] + t_ptr[:-1] + base)
        own_pos.append(pos_own + base)
        take_pos.append(pos_take + base)
        base += p.nnz + e.nnz
    index, weight = torch.cat(idx_parts), torch.cat(w_parts)
    # the last offset by a fill kernel: new_tensor([base]) would be a blocking host-to-device copy
    ptr = torch.cat(ptr_parts + [torch.full((1,), base, dtype=ptr_parts[0].dtype,
                                            device=ptr_parts[0].device)])
    with torch.no_grad():
        out = F.embedding_bag(index, wall, ptr, mode="sum",
                              per_sample_weights=weight.detach().to(wall.dtype),
                              include_last_offset=True)
    ctx.fwd = (index, ptr, own_pos, take_pos, off, wall, bases, kept, taken)
    outs = list(out.view(n, B, -1).unbind(0))
    return outs, []  # swapped-in children are inside the levels' outputs


def _merged_backward(ctx, plan: DecodePlan, vals, ws, grads):
    n = len(plan.patterns)
    index, ptr, own_pos, take_pos, off, wall, bases, kept, taken = ctx.fwd
    B = plan.patterns[0].n_rows
    d = ws[0].shape[1]
    extras = bool(plan.pairs) or any(t is not None for t in take_pos)
    # the decoder-gradient bag sum reads rows of g (decode terms) and, with PC or swap terms,
    # rows of the decoders: then g goes into the spare rows after the decoders (one table)
    table = stacked_decoders(ws, slot_rows=n * B) if extras else None
    if table is not None:
        g = torch.stack([gr.to(table.dtype) for gr in grads[:n]],
                        out=table[off[-1]:off[-1] + n * B].view(n, B, d))
    else:
        g = torch.stack([gr.to(wall.dtype) for gr in grads[:n]])
        if extras:
            table = torch.cat([wall, g.view(n * B, d)])
    g = g.view(n * B, d)
    # activation gradients of every entry of every bag at once
    s = torch.sparse.sampled_addmm(_csr(ptr, index, g.new_zeros(index.numel()), (n * B, off[-1])),
                                   g, wall.t(), beta=0.0).values()
    g_vals = []
    for l in range(n):
        if own_pos[l] is None:  # level l's entries are one run starting at bases[l]
            gv = s[bases[l]:bases[l] + plan.patterns[l].nnz].clone()
        else:
            gv = s.index_select(0, own_pos[l])
        if plan.keep[l] is not None:
            gv.mul_(plan.keep[l])
        g_vals.append(gv)
    for l in range(n - 1):  # children decoded into level l in place of their swapped parents
        if take_pos[l] is not None:
            g_vals[l + 1].index_add_(0, plan.take[l + 1], s.index_select(0, take_pos[l]))
    row_coef, cross = (pc_backward_terms_(plan.pairs, ctx.pc_state, grads[-1], vals, g_vals)
                       if plan.pairs else ([None] * n, []))
    # decoder gradients: one bag per decoder row (all levels); entries are the decode terms
    # (rows of g), then the PC loss's diagonal term (the row itself), then the swapped-in and
    # cross terms (rows of g and partner rows)
    g_base = off[-1] if extras else 0
    src, wts, counts = [], [], []
    for l in range(n):
        p = plan.patterns[l]
        perm, col_ptr, rows_by_col = p.by_col()
        src.append(rows_by_col + (g_base + l * B))
        wts.append(kept[l].index_select(0, perm))
        counts.append(col_ptr[1:] - col_ptr[:-1])
    sources = [(None, torch.cat(src), torch.cat(wts), torch.cat(counts))]
    if any(c is not None for c in row_coef):
        coef = torch.cat([c if c is not None else ws[l].new_zeros(ws[l].shape[0])
                          for l, c in enumerate(row_coef)])
        rows = arange(off[-1], device=coef.device)
        sources.append((rows, rows, coef, None))
    ext_d, ext_s, ext_w = [], [], []
    for l in range(n - 1):
        if take_pos[l] is not None:
            e_cols, taken_vals = taken[l + 1]
            ext_d.append(e_cols)
            ext_s.append(plan.extra(l + 1).rows + (g_base + l * B))
            ext_w.append(taken_vals)
    for t in cross:
        ext_d.append(t.rows + off[t.dst])
        ext_s.append(t.partners + off[t.src])
        ext_w.append(t.coef)
    if ext_d:
        ext_dest, order = torch.sort(torch.cat(ext_d), stable=True)
        sources.append((ext_dest, torch.cat(ext_s).index_select(0, order),
                        torch.cat(ext_w).index_select(0, order), None))
    if len(sources) == 1:
        idx, w, bag_ptr = sources[0][1], sources[0][2], _offsets(sources[0][3])
    else:
        idx, w, bag_ptr = _merge_grouped(sources, off[-1])
    with torch.no_grad():
        gw_all = F.embedding_bag(idx, table if extras else g, bag_ptr, mode="sum",
                                 per_sample_weights=w.detach().to(g.dtype),
                                 include_last_offset=True)
    return g_vals, [gw_all[off[l]:off[l + 1]] for l in range(n)]


# ------------------------------------------------------------------ per level (dense supports)

def _per_level_forward(ctx, plan: DecodePlan, vals, ws):
    n = len(plan.patterns)
    outs, swaps, extras = [], [], []
    for l in range(n):
        v = vals[l] if plan.keep[l] is None else vals[l] * plan.keep[l]
        outs.append(spmm_rows(plan.patterns[l], v, ws[l]))
        e = plan.extra(l)
        extras.append(e)
        if e is not None:
            swaps.append(spmm_rows(e, vals[l].index_select(0, plan.take[l]), ws[l]))
    ctx.extras = extras
    return outs, swaps


def _per_level_backward(ctx, plan: DecodePlan, vals, ws, grads):
    n = len(plan.patterns)
    g_swaps = iter(grads[n:-1])
    g_vals: list[torch.Tensor | None] = []
    g_w: list[torch.Tensor | None] = []
    for l in range(n):
        p, keep, e = plan.patterns[l], plan.keep[l], ctx.extras[l]
        g_out = grads[l].contiguous()
        v = vals[l] if keep is None else vals[l] * keep
        gv = sddmm(p, g_out, ws[l])
        if keep is not None:
            gv = gv * keep
        gw = spmm_cols(p, v, g_out)
        if e is not None:
            g_swap = next(g_swaps).contiguous()
            gv.index_add_(0, plan.take[l], sddmm(e, g_swap, ws[l]))
            if e.nnz:  # few entries: a direct scatter into the decode's own buffer
                rows = g_swap.index_select(0, e.rows).mul_(
                    vals[l].index_select(0, plan.take[l])[:, None])
                gw.index_add_(0, e.cols, rows)
        g_vals.append(gv)
        g_w.append(gw)
    if plan.pairs:
        row_coef, cross = pc_backward_terms_(plan.pairs, ctx.pc_state, grads[-1], vals, g_vals)
        apply_decoder_terms_(g_w, ws, row_coef, cross)
    return g_vals, g_w


def coupled_decode(plan: DecodePlan, vals: list[torch.Tensor], w_decs: list[torch.Tensor]
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], torch.Tensor]:
    """(per level ``[B, d]`` decode without bias, per level pair l the swapped-in children's
    ``[B, d]`` decode into level l or None when it is already inside level l's decode, the PC
    loss ``[L-1]``)."""
    n = len(vals)
    out = _CoupledDecode.apply(plan, *vals, *w_decs)
    recons, rest = list(out[:n]), iter(out[n:-1])
    merged = len(out) == n + 1
    swap_in = [next(rest) if plan.take[l + 1] is not None and not merged else None
               for l in range(n - 1)]
    return recons, swap_in, out[-1]
