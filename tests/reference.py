"""Slow, obviously-correct dense twins of the fast HSAE paths (float64, explicit loops)."""

from __future__ import annotations

import torch


class DenseJumpReLU(torch.autograd.Function):
    """a = z H(z - theta); da/dz = H; da/dtheta = -(theta/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        k = ((z - theta).abs() < eps / 2).to(g.dtype)
        return g * (z > theta), (g * (-theta / eps) * k).sum(0), None


class DenseStep(torch.autograd.Function):
    """H(z - theta); dH/dtheta = -(1/eps) K((z - theta)/eps); dH/dz = 0."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        k = ((z - theta).abs() < ctx.eps / 2).to(g.dtype)
        return None, (g * (-1.0 / ctx.eps) * k).sum(0), None


def dense_level(level, x):
    """Dense activations [B, n] and L0 of one level, through the dense reference STE."""
    z = x @ level.W_enc.t() + level.b_enc
    a = DenseJumpReLU.apply(z, level.threshold, level.bandwidth)
    l0 = DenseStep.apply(z, level.threshold, level.bandwidth).sum(1).mean()
    return a, l0


def dense_pc_loss(a_p, a_c, w_p, w_c, parent_of):
    """sum_i ||a_i d_i - sum_{j in C_i} a_j d_j||^2, averaged over the batch, via an explicit
    [B, n_parents, d] tensor (fine at test sizes)."""
    f_p = a_p[:, :, None] * w_p[None]  # [B, n_p, d]
    f_c = a_c[:, :, None] * w_c[None]  # [B, n_c, d]
    total = a_p.new_zeros(())
    for i in range(w_p.shape[0]):
        kids = (parent_of == i).nonzero(as_tuple=True)[0]
        if kids.numel() == 0:
            continue
        diff = f_p[:, i] - f_c[:, kids].sum(1)
        total = total + diff.pow(2).sum(1).mean()
    return total


def dense_perturbed_recon(a_p, a_c, w_p, w_c, b_p, parent_of, swapped):
    """b + sum_i f~_i with f~_i = sum_{j in C_i} f_j where swapped (only parents with
    children are ever swapped), else f_i (§3.2 as read by METHOD §1)."""
    out = b_p.expand(a_p.shape[0], -1).clone()
    for i in range(w_p.shape[0]):
        kids = (parent_of == i).nonzero(as_tuple=True)[0]
        if bool(swapped[i]) and kids.numel() > 0:
            out = out + (a_c[:, kids] @ w_c[kids])
        else:
            out = out + a_p[:, i:i + 1] * w_p[i]
    return out


def dense_hsae_loss(model, x, forest, swapped, lambdas, rho):
    """The full HSAE loss (§3.1) computed densely."""
    acts = [dense_level(lv, x) for lv in model.levels]
    loss = x.new_zeros(())
    for l, lv in enumerate(model.levels):
        a, l0 = acts[l]
        if l < len(model.levels) - 1 and swapped is not None:
            recon = dense_perturbed_recon(a, acts[l + 1][0], lv.W_dec, model.levels[l + 1].W_dec,
                                          lv.b_dec, forest.parent_of[l], swapped[l])
        else:
            recon = a @ lv.W_dec + lv.b_dec
        loss = loss + (x - recon).pow(2).sum(1).mean() + lambdas[l] * l0
    for l in range(len(model.levels) - 1):
        loss = loss + rho * dense_pc_loss(acts[l][0], acts[l + 1][0], model.levels[l].W_dec,
                                          model.levels[l + 1].W_dec, forest.parent_of[l])
    return loss
