"""The HSAE (§3): L JumpReLU levels of increasing size tied by a partial forest.

``forward`` returns the named loss terms; the trainer composes them as
``sum_l [MSE_l(perturbed) + lambda_l L0_l] + rho * sum_l PC_l (+ ghost grads)`` (§3.1).
With rho = 0 and no swaps the levels never interact: that is the independent baseline.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from .config import HSAEConfig
from .coupling import pc_loss, swap_delta
from .forest import Forest
from .jumprelu import JumpReLULevel, SparseCode, ghost_grad_loss


class HSAEOutput(NamedTuple):
    mse: torch.Tensor  # [L] mean over tokens of ||x - perturbed recon_l||^2 (the training term)
    l0: torch.Tensor  # [L] mean active features per token (STE-differentiable in thresholds)
    pc: torch.Tensor  # [L-1] parent-child constraint per level pair (0 where not computed)
    ghost: torch.Tensor  # scalar: ghost-grad loss summed over levels
    sq_error: torch.Tensor  # [L] detached sum over tokens of ||x - recon_l||^2, unperturbed
    codes: list[SparseCode]


class HSAE(nn.Module):
    def __init__(self, cfg: HSAEConfig):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        self.levels = nn.ModuleList(
            JumpReLULevel(cfg.d_model, n, cfg.bandwidth, gen, cfg.threshold_init)
            for n in cfg.level_sizes)
        self.forest = Forest.empty(cfg.level_sizes)
        if cfg.autocast_dtype:
            for lv in self.levels:
                lv.matmul_dtype = getattr(torch, cfg.autocast_dtype)

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    def to(self, *args, **kwargs):  # keep the forest beside the weights
        out = super().to(*args, **kwargs)
        self.forest = self.forest.to(self.levels[0].W_dec.device)
        return out

    def encode(self, x: torch.Tensor) -> list[SparseCode]:
        return [lv.encode(x) for lv in self.levels]

    def forward(self, x: torch.Tensor, swapped: Sequence[torch.Tensor] | None = None,
                dead: Sequence[torch.Tensor] | None = None, with_pc: bool = True) -> HSAEOutput:
        """Loss terms for a batch ``x [B, d]``.

        ``swapped[l]`` (bool ``[n_l]``) marks the parents of level l whose contribution is
        replaced by their children's in level l's reconstruction (§3.2; METHOD §1).
        ``dead[l]`` (bool ``[n_l]``) marks features that get ghost grads.
        """
        x = x.to(self.levels[0].W_dec.dtype)
        codes = [lv.encode(x) for lv in self.levels]
        recons = [lv.decode(c) for lv, c in zip(self.levels, codes)]
        zero = x.new_zeros(())
        mse, sq_err, pcs, ghost = [], [], [], zero
        for l, (lv, code, recon) in enumerate(zip(self.levels, codes, recons)):
            sq_err.append((x - recon.detach()).pow(2).sum())
            if swapped is not None and l < self.n_levels - 1 and bool(swapped[l].any()):
                recon = recon + swap_delta(code, codes[l + 1], lv.W_dec, self.levels[l + 1].W_dec,
                                           self.forest.parent_of[l], swapped[l])
            residual = x - recon
            level_mse = residual.pow(2).sum(1).mean()
            mse.append(level_mse)
            if dead is not None and bool(dead[l].any()):
                ghost = ghost + ghost_grad_loss(lv, x, residual, dead[l], level_mse)
        for l in range(self.n_levels - 1):
            if with_pc and bool((self.forest.parent_of[l] >= 0).any()):
                pcs.append(pc_loss(codes[l], codes[l + 1], self.levels[l].W_dec,
                                   self.levels[l + 1].W_dec, self.forest.parent_of[l],
                                   self.forest.has_children(l)))
            else:
                pcs.append(zero)
        return HSAEOutput(torch.stack(mse), torch.stack([c.l0 for c in codes]),
                          torch.stack(pcs) if pcs else x.new_zeros(0), ghost,
                          torch.stack(sq_err), codes)

    @staticmethod
    def total_loss(out: HSAEOutput, lambdas: torch.Tensor, rho: float) -> torch.Tensor:
        """sum_l [MSE_l + lambda_l L0_l] + rho sum PC + ghost (§3.1)."""
        loss = out.mse.sum() + (lambdas.to(out.l0) * out.l0).sum() + out.ghost
        if rho and out.pc.numel():
            loss = loss + rho * out.pc.sum()
        return loss

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, level: int) -> torch.Tensor:
        lv = self.levels[level]
        return lv.decode(lv.encode(x.to(lv.W_dec.dtype)))

    @torch.no_grad()
    def after_step_(self) -> None:
        """Unit-norm decoder rows and positive thresholds after every optimiser step."""
        for lv in self.levels:
            lv.normalize_decoder_()
            lv.clamp_threshold_()
