"""One HSAE level: a JumpReLU SAE (Rajamanoharan et al. 2024b) computed on its support.

``f_i(x) = d_i * a_i`` with ``a_i = JumpReLU_theta_i(e_i . x + b_i)`` (paper §3). The encoder
matmul is dense; everything after it runs on the *support*: the entries with
``pre > theta - eps/2``, i.e. the active ones plus the inactive ones inside the
straight-through window, which are exactly the entries that receive a gradient:

- d a / d pre   = H(pre - theta)                       (zero off the active set)
- d a / d theta = -(theta / eps) K((pre - theta) / eps)  (rectangle kernel K, window only)
- d H / d theta = -(1 / eps) K((pre - theta) / eps)      (the L0 penalty)

The threshold is a plain fp32 parameter clamped positive (METHOD §1: a log-parametrised
threshold barely moves under Adam).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from hsae_core.model.sparse_ops import SupportPattern, sparse_decode, spmm_cols

MIN_THRESHOLD = 1e-6


class SparseCode(NamedTuple):
    """A level's activations on its support: ``a[pattern.rows, pattern.cols] = vals``."""

    pattern: SupportPattern
    vals: torch.Tensor  # [nnz], differentiable; 0 on inactive window entries
    l0: torch.Tensor  # scalar: mean number of active features per row, differentiable in theta

    @property
    def active(self) -> torch.Tensor:
        return self.vals > 0

    def dense(self) -> torch.Tensor:
        return self.pattern.to_dense(self.vals)


class _JumpReLUOnSupport(torch.autograd.Function):
    """vals and L0 from precomputed pre-activations; gradients for W_enc, b_enc, theta."""

    @staticmethod
    def forward(ctx, w_enc, b_enc, threshold, x, pre_s, pattern: SupportPattern, bandwidth: float):
        theta_s = threshold[pattern.cols]
        active = pre_s > theta_s
        window = (pre_s - theta_s).abs() < bandwidth / 2
        ctx.save_for_backward(x, active, window, theta_s)
        ctx.pattern, ctx.bandwidth, ctx.n_features = pattern, bandwidth, threshold.numel()
        vals = torch.where(active, pre_s, torch.zeros_like(pre_s))
        l0 = active.sum().to(pre_s.dtype) / pattern.n_rows
        return vals, l0

    @staticmethod
    def backward(ctx, grad_vals, grad_l0):
        x, active, window, theta_s = ctx.saved_tensors
        p: SupportPattern = ctx.pattern
        eps, n = ctx.bandwidth, ctx.n_features
        grad_pre = torch.where(active, grad_vals, torch.zeros_like(grad_vals))
        grad_w = spmm_cols(p, grad_pre, x.to(grad_pre.dtype))
        grad_b = grad_pre.new_zeros(n).index_add_(0, p.cols, grad_pre)
        g_theta = grad_vals * (-theta_s / eps)
        if grad_l0 is not None:
            g_theta = g_theta - grad_l0 / (eps * p.n_rows)
        g_theta = torch.where(window, g_theta, torch.zeros_like(g_theta))
        grad_theta = g_theta.new_zeros(n).index_add_(0, p.cols, g_theta)
        return grad_w, grad_b, grad_theta, None, None, None, None


class JumpReLULevel(nn.Module):
    """A JumpReLU SAE with unit-norm decoder rows.

    Parameters use feature-major layout: ``W_enc[i]`` is e_i, ``W_dec[i]`` is d_i (both
    ``[n, d]``); export to SAELens' ``W_enc [d, n]`` is a transpose.
    """

    def __init__(self, d_model: int, n_features: int, bandwidth: float,
                 generator: torch.Generator | None = None, threshold_init: float = 0.0):
        super().__init__()
        self.d_model, self.n_features, self.bandwidth = d_model, n_features, bandwidth
        self.matmul_dtype: torch.dtype | None = None  # autocast dtype of the encoder matmul
        w_dec = torch.randn(n_features, d_model, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.clone())  # tied init (Conerly et al. 2024)
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.threshold = nn.Parameter(torch.full((n_features,),
                                                 max(threshold_init, MIN_THRESHOLD)))

    def preacts(self, x: torch.Tensor) -> torch.Tensor:
        """Dense pre-activations ``x @ W_enc^T + b_enc`` (no autograd), in the parameters'
        dtype. With ``matmul_dtype`` set, the matmul (the dominant cost) runs under autocast;
        everything after it, thresholds included, stays in the parameters' dtype."""
        with torch.no_grad(), torch.autocast(x.device.type, dtype=self.matmul_dtype,
                                             enabled=self.matmul_dtype is not None):
            pre = torch.addmm(self.b_enc, x.to(self.W_enc.dtype), self.W_enc.t())
        return pre.to(self.W_enc.dtype)

    def encode(self, x: torch.Tensor, pre: torch.Tensor | None = None) -> SparseCode:
        if pre is None:
            pre = self.preacts(x)
        return self.encode_on(x, pre, SupportPattern.from_mask(self.support_mask(pre)))

    def support_mask(self, pre: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, n]``: the support, ``pre > theta - eps/2`` (active or in the window)."""
        return pre > (self.threshold.detach() - self.bandwidth / 2)

    def encode_on(self, x: torch.Tensor, pre: torch.Tensor, pattern: SupportPattern
                  ) -> SparseCode:
        """:meth:`encode` on a support built from :meth:`support_mask` (the HSAE builds every
        level's at once: one host sync)."""
        pre_s = pre.reshape(-1).index_select(0, pattern.rows * pre.shape[1] + pattern.cols)
        vals, l0 = _JumpReLUOnSupport.apply(
            self.W_enc, self.b_enc, self.threshold, x.to(pre.dtype), pre_s, pattern,
            self.bandwidth)
        return SparseCode(pattern, vals, l0)

    def decode(self, code: SparseCode) -> torch.Tensor:
        return sparse_decode(code.pattern, code.vals, self.W_dec) + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseCode]:
        code = self.encode(x)
        return self.decode(code), code

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (after every optimiser step, §3.3)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def clamp_threshold_(self) -> None:
        self.threshold.clamp_(min=MIN_THRESHOLD)

    @torch.no_grad()
    def init_thresholds_(self, x: torch.Tensor, target_l0: float) -> None:
        """Each threshold at its feature's (1 - target_l0 / n) quantile of pre-activations on x,
        so the first steps start near the target L0 instead of half the features firing."""
        pre = self.preacts(x)
        q = 1.0 - target_l0 / self.n_features
        k = min(pre.shape[0] - 1, max(0, int(round(q * (pre.shape[0] - 1)))))
        theta = pre.kthvalue(k + 1, dim=0).values
        self.threshold.copy_(theta.clamp_min(MIN_THRESHOLD))

    @torch.no_grad()
    def init_b_dec_(self, x: torch.Tensor) -> None:
        """Decoder bias at the data mean (geometric-median-free, cheap and standard)."""
        self.b_dec.copy_(x.to(self.b_dec.dtype).mean(0))


def ghost_grad_loss(level: JumpReLULevel, x: torch.Tensor, residual: torch.Tensor,
                    dead: torch.Tensor, mse: torch.Tensor) -> torch.Tensor:
    """Ghost grads (Jermyn & Templeton 2024) for the dead features of one level.

    The dead features' ``exp(pre)`` outputs, decoded and scaled to half the residual's norm,
    regress the (detached) residual; the loss is rescaled to the size of the main MSE so the
    dead features get gradients of a useful magnitude. Cost: one matmul over dead columns.
    Ghost grads move a dead feature's direction, never its threshold, so on their own they
    revive few JumpReLU features: see :func:`resample_dead_`.
    """
    idx = dead.nonzero(as_tuple=True)[0]
    if idx.numel() == 0:
        return x.new_zeros(())
    pre = x.to(level.W_enc.dtype) @ level.W_enc[idx].t() + level.b_enc[idx]
    ghost = torch.exp(pre.clamp(max=30.0)) @ level.W_dec[idx]
    residual = residual.detach()
    scale = residual.norm(dim=1, keepdim=True) / (2 * ghost.norm(dim=1, keepdim=True) + 1e-6)
    ghost = ghost * scale.detach()
    ghost_mse = (ghost - residual).pow(2).sum(1).mean()
    return ghost_mse * (mse.detach() / (ghost_mse.detach() + 1e-6))


@torch.no_grad()
def resample_dead_(level: JumpReLULevel, x: torch.Tensor, dead: torch.Tensor, target_l0: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Resample the ``dead`` features of ``level`` on the batch ``x`` (config
    ``resample_interval``); returns their ids (the caller restarts their optimiser state)."""
    idx = dead.nonzero(as_tuple=True)[0]
    if idx.numel() == 0:
        return idx
    x = x.to(level.W_enc.dtype)
    err = (x - level.decode(level.encode(x))).pow(2).sum(1)
    probs = err.pow(2).cpu().double()
    rows = torch.multinomial(probs / probs.sum(), idx.numel(), replacement=True,
                             generator=generator).to(x.device)
    direction = torch.nn.functional.normalize(x[rows] - level.b_dec, dim=1)
    live = ~dead
    norm = level.W_enc[live].norm(dim=1).mean() if bool(live.any()) else x.new_tensor(1.0)
    level.W_dec[idx] = direction
    level.W_enc[idx] = direction * (0.2 * norm)
    level.b_enc[idx] = 0.0
    pre = x @ level.W_enc[idx].t()
    q = 1.0 - target_l0 / level.n_features
    k = min(pre.shape[0] - 1, max(0, int(round(q * (pre.shape[0] - 1)))))
    level.threshold[idx] = pre.kthvalue(k + 1, dim=0).values.clamp_min(MIN_THRESHOLD)
    return idx
