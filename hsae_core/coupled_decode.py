"""Every level's decode, the perturbation and the parent-child loss as one autograd node.

The HSAE's training forward (§3.1-3.2) decodes each level on its support, decodes the children
that replace swapped parents into the level above (METHOD §1), and computes the PC loss of
every level pair; all three read and write the same decoder weights. Done as separate autograd
nodes, each decoder would receive up to three gradient tensors that autograd then adds: at
d = 576 these ``[n, d]`` temporaries and additions were a sizeable part of the HSAE's overhead
over independent levels. Here the backward writes one gradient buffer per decoder: the
decode's own (a bag sum over the support), into which the swap and PC terms are added in place.
The math of each part is that of :func:`~hsae_core.sparse_ops.sparse_decode` and
:func:`~hsae_core.coupling.forest_pc_loss` (tested against the dense float64 reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .coupling import _PairPC, pc_backward_, pc_forward
from .sparse_ops import SupportPattern, sddmm, spmm_cols, spmm_rows


@dataclass
class DecodePlan:
    """What one batch's coupled decode does, per level l (index lists, no gradients)."""

    patterns: list[SupportPattern]  # level l's support
    keep: list[torch.Tensor | None]  # bool over l's entries: False for swapped parents
    take: list[torch.Tensor | None]  # positions of l's entries decoded into level l-1 instead
    pairs: list[_PairPC]  # the level pairs whose PC loss is computed (may be empty)

    def extra(self, l: int) -> SupportPattern | None:
        return None if self.take[l] is None else self.patterns[l].take(self.take[l])


class _CoupledDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: DecodePlan, *tensors):
        n = len(plan.patterns)
        vals, ws = list(tensors[:n]), list(tensors[n:])
        outs, swaps, extras = [], [], []
        for l in range(n):
            v = vals[l] if plan.keep[l] is None else vals[l] * plan.keep[l]
            outs.append(spmm_rows(plan.patterns[l], v, ws[l]))
            e = plan.extra(l)
            extras.append(e)
            if e is not None:
                swaps.append(spmm_rows(e, vals[l].index_select(0, plan.take[l]), ws[l]))
        if plan.pairs:
            pc, ctx.pc_state = pc_forward(plan.pairs, vals, ws)
        else:
            pc = vals[0].new_zeros(n - 1)
        ctx.save_for_backward(*tensors)
        ctx.plan, ctx.extras = plan, extras
        return (*outs, *swaps, pc)

    @staticmethod
    def backward(ctx, *grads):
        plan: DecodePlan = ctx.plan
        n = len(plan.patterns)
        tensors = ctx.saved_tensors
        vals, ws = list(tensors[:n]), list(tensors[n:])
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
                    rows = g_swap.index_select(0, e.rows).mul_(vals[l].index_select(0, plan.take[l])[:, None])
                    gw.index_add_(0, e.cols, rows)
            g_vals.append(gv)
            g_w.append(gw)
        if plan.pairs:
            pc_backward_(plan.pairs, ctx.pc_state, grads[-1], vals, ws, g_vals, g_w)
        return (None, *g_vals, *g_w)


def coupled_decode(plan: DecodePlan, vals: list[torch.Tensor], w_decs: list[torch.Tensor]
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], torch.Tensor]:
    """(per level ``[B, d]`` decode without bias, per level pair l the swapped-in children's
    ``[B, d]`` decode into level l or None, the PC loss ``[L-1]``)."""
    n = len(vals)
    out = _CoupledDecode.apply(plan, *vals, *w_decs)
    recons, rest = list(out[:n]), iter(out[n:-1])
    swap_in = [next(rest) if plan.take[l + 1] is not None else None for l in range(n - 1)]
    return recons, swap_in, out[-1]
