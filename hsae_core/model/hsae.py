"""The HSAE (§3): L JumpReLU levels of increasing size tied by a partial forest.

``forward`` returns the named loss terms; the trainer composes them as
``sum_l [MSE_l(perturbed) + lambda_l L0_l] + rho * sum_l PC_l (+ ghost grads)`` (§3.1).
With rho = 0 and no swaps the levels never interact: that is the independent baseline.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from hsae_core.model import pair_index
from hsae_core.model.config import HSAEConfig
from hsae_core.model.coupled_decode import DecodePlan, coupled_decode, stacked_decoders
from hsae_core.model.coupling import PairEntries, _PCIndex, pair_entries_and_swaps, pc_pairs
from hsae_core.model.forest import Forest
from hsae_core.model.jumprelu import JumpReLULevel, SparseCode, ghost_grad_loss
from hsae_core.model.sparse_ops import SupportPattern


class HSAEOutput(NamedTuple):
    mse: torch.Tensor  # [L] mean over tokens of ||x - perturbed recon_l||^2 (the training term)
    l0: torch.Tensor  # [L] mean active features per token (STE-differentiable in thresholds)
    pc: torch.Tensor  # [L-1] parent-child constraint per level pair (0 where not computed)
    ghost: torch.Tensor  # scalar: ghost-grad loss summed over levels
    sq_error: torch.Tensor  # [L] detached sum over tokens of ||x - recon_l||^2, unperturbed
                            # (NaN for perturbed levels unless clean_error=True)
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
        self.pack_decoders_()

    def set_matmul_dtype_(self, name: str | None) -> None:
        """Run every level's encoder matmul under autocast to ``name`` (``bfloat16``,
        ``float16``) or, with None, in the parameters' dtype. The :class:`Trainer` sets
        ``cfg.autocast_dtype``; a model built or loaded for evaluation stays fp32 whatever it
        was trained with, so every arm is measured in one precision (issue 23)."""
        for lv in self.levels:
            lv.matmul_dtype = getattr(torch, name) if name else None

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    def to(self, *args, **kwargs):  # keep the forest beside the weights
        out = super().to(*args, **kwargs)
        self.forest = self.forest.to(self.levels[0].W_dec.device)
        return out

    @torch.no_grad()
    def pack_decoders_(self, slot_rows: int = 0) -> None:
        """Put every level's decoder in one buffer: consecutive row blocks, then ``slot_rows``
        spare rows. The training forward then reads all decoders as one table and keeps its
        output gradient in the spare rows (coupled_decode.py). Only the storage moves: the
        parameters stay the same objects, so an optimizer's state stays valid. ``.to()`` and
        friends give each parameter its own storage again; the forward re-packs."""
        ws = [lv.W_dec for lv in self.levels]
        buf = ws[0].new_empty(sum(w.shape[0] for w in ws) + slot_rows, ws[0].shape[1])
        row = 0
        for w in ws:
            block = buf[row:row + w.shape[0]]
            block.copy_(w)
            w.data = block
            row += w.shape[0]

    def _ensure_packed(self, batch: int) -> None:
        ws = [lv.W_dec for lv in self.levels]
        slot = self.n_levels * batch if torch.is_grad_enabled() and ws[0].requires_grad else 0
        if stacked_decoders(ws, slot) is None:
            self.pack_decoders_(slot)

    def encode(self, x: torch.Tensor) -> list[SparseCode]:
        return self._encode_all(x)[0]

    def _encode_all(self, x: torch.Tensor, also: list[torch.Tensor] = ()
                    ) -> tuple[list[SparseCode], list]:
        """Every level's code, their supports built at once, and the 0-dim tensors ``also``
        read back in the same host sync (one on CUDA for all of it)."""
        pres = [lv.preacts(x) for lv in self.levels]
        patterns, values = SupportPattern.from_masks_reading(
            [lv.support_mask(pre) for lv, pre in zip(self.levels, pres)], also)
        return [lv.encode_on(x, pre, p)
                for lv, pre, p in zip(self.levels, pres, patterns)], values

    def forward(self, x: torch.Tensor, swapped: Sequence[torch.Tensor] | None = None,
                dead: Sequence[torch.Tensor] | None = None, with_pc: bool = True,
                clean_error: bool = False) -> HSAEOutput:
        """Loss terms for a batch ``x [B, d]``.

        ``swapped[l]`` (bool ``[n_l]``) marks the parents of level l whose contribution is
        replaced by their children's in level l's reconstruction (§3.2; METHOD §1).
        ``dead[l]`` (bool ``[n_l]``) marks features that get ghost grads. ``clean_error`` also
        measures the unperturbed reconstruction error of perturbed levels (for logging).

        Host syncs on CUDA: one for the supports and every level's "any dead feature?", one
        for the level pairs' entries, swaps and PC index lists (pair_index.py).
        """
        x = x.to(self.levels[0].W_dec.dtype)
        self._ensure_packed(x.shape[0])
        codes, any_dead = self._encode_all(x, [d.any() for d in dead] if dead is not None
                                           else [])
        zero = x.new_zeros(())
        entries, keep, take, indexes, sibs = self._pair_entries(codes, swapped, with_pc)
        recons, swap_in, pc = self._decode_all(codes, keep, take, entries, indexes, sibs,
                                               with_pc)
        mse, sq_err, ghost = [], [], zero
        for l, (lv, code, recon) in enumerate(zip(self.levels, codes, recons)):
            if swap_in[l] is not None:
                recon = recon.add_(swap_in[l])  # recon is this forward's own tensor
            if keep[l] is not None:  # perturbed: the merged decode holds its swaps in recon
                with torch.no_grad():
                    sq_err.append((x - lv.decode(code)).pow(2).sum() if clean_error
                                  else torch.full((), float("nan"), dtype=x.dtype,
                                                  device=x.device))
            else:
                sq_err.append((x - recon.detach()).pow(2).sum())
            residual = x - recon
            level_mse = residual.pow(2).sum(1).mean()
            mse.append(level_mse)
            if dead is not None and any_dead[l]:
                ghost = ghost + ghost_grad_loss(lv, x, residual, dead[l], level_mse)
        return HSAEOutput(torch.stack(mse), torch.stack([c.l0 for c in codes]), pc, ghost,
                          torch.stack(sq_err), codes)

    def _pair_entries(self, codes: list[SparseCode], swapped, with_pc: bool):
        """Per level pair, the child entries with a parent (shared by swap and PC; None when
        built all pairs at once) and the PC index and co-firing sibling pairs, where used, and
        per level the swap's keep mask and taken child entries (else None): one host sync for
        all (pair_index.build_pair_indexes on training supports, which carry their masks, else
        coupling.pair_entries_and_swaps)."""
        n = self.n_levels
        keep: list[torch.Tensor | None] = [None] * n
        take: list[torch.Tensor | None] = [None] * n
        entries: list[PairEntries | None] = [None] * (n - 1)
        indexes: list[_PCIndex | None] = [None] * (n - 1)
        sibs: list | None = None
        pc = [with_pc and self.forest.links(l).kids.numel() > 0 for l in range(n - 1)]
        used = [l for l in range(n - 1) if swapped is not None or pc[l]]
        if used and pair_index.BATCHED and all(c.pattern.mask is not None for c in codes):
            built = pair_index.build_pair_indexes([c.pattern for c in codes], self.forest,
                                                  swapped, with_pc)
            sibs = [None] * (n - 1)
            for l, (k, t, i, sp) in enumerate(built):
                keep[l], take[l + 1], indexes[l], sibs[l] = k, t, i, sp
            return entries, keep, take, indexes, sibs
        built = pair_entries_and_swaps([
            (codes[l + 1].pattern, self.forest.parent_of[l], codes[l].pattern,
             swapped[l] if swapped is not None else None,
             self.forest.links(l) if pc[l] else None) for l in used])
        for l, (e, k, t, i) in zip(used, built):
            entries[l], keep[l], take[l + 1], indexes[l] = e, k, t, i
        return entries, keep, take, indexes, sibs

    def _decode_all(self, codes: list[SparseCode], keep, take,
                    entries: list[PairEntries | None], indexes, sibs, with_pc: bool):
        """Every level's reconstruction with its swapped parents' entries masked out, the
        children's contributions that replace them in the level above (§3.2), and the PC loss
        of every level pair with links (§3.1), as one autograd node (coupled_decode.py)."""
        pairs = (pc_pairs(codes, self.forest, entries, indexes, sibs)
                 if with_pc and not self.forest.is_empty() else [])
        plan = DecodePlan([c.pattern for c in codes], keep, take, pairs)
        outs, swap_in, pc = coupled_decode(plan, [c.vals for c in codes],
                                           [lv.W_dec for lv in self.levels])
        recons = [out + lv.b_dec for out, lv in zip(outs, self.levels)]
        return recons, swap_in + [None], pc

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
