"""The floor to beat (issue 23): what a user would write instead of the HSAE.

L plain dense JumpReLU SAEs (Rajamanoharan et al. 2024b), one per level, in our own PyTorch and
independent of hsae_core: a dense encoder ``pre = x W_enc^T + b_enc`` and a dense decoder per
level, JumpReLU with the rectangle-kernel straight-through gradient of the threshold
(``d a / d theta = -(theta / eps) K((pre - theta) / eps)``, ``d H / d theta = -(1 / eps) K``,
``K(u) = 1 for |u| < 1/2``), loss ``sum_l MSE_l + lambda_l L0_l``, Adam. It does the work
our levels do, minus the sparsity: the same parameterisation (feature-major ``W_enc``/``W_dec``
``[n, d]``, tied init, unit-norm decoder rows, a plain threshold clamped positive, thresholds
at their target-L0 quantile and ``b_dec`` at the mean on the first batch, Adam betas (0, 0.995)
with the thresholds at 10x the learning rate, fused where torch has it) and our controller of
each lambda (``lambda *= exp(+-rate)`` by whether an EMA of L0 falls as fast as a decay toward
the target asks; hsae_core/model/sparsity.py's defaults), kept on the device: no host sync in a
step. ``autocast``: None / "fp32", or "bf16" (the whole forward and loss under autocast, the
parameters fp32). Used by step_time.py and gpu_check.py, side by side with ours.
"""

from __future__ import annotations

import torch
from torch import nn


class _JumpReLU(torch.autograd.Function):
    """``pre * H(pre - theta)``; gradient H to pre, the rectangle kernel to theta."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        window = (pre.to(theta.dtype) - theta).abs() < ctx.eps / 2
        g_theta = (g.to(theta.dtype) * window).sum(0) * (-theta / ctx.eps)
        return g * (pre > theta), g_theta, None


class _Step(torch.autograd.Function):
    """``H(pre - theta)`` in theta's dtype (fp32: the L0 stays exact under autocast); no
    gradient to pre, ``-K / eps`` to theta."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(theta.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        window = (pre.to(theta.dtype) - theta).abs() < ctx.eps / 2
        return None, (g * window).sum(0) / -ctx.eps, None


jumprelu, heaviside = _JumpReLU.apply, _Step.apply
DTYPES = {None: None, "fp32": None, "bf16": torch.bfloat16, torch.bfloat16: torch.bfloat16}


class DenseFloor(nn.Module):
    def __init__(self, d, sizes, target_l0=50.0, bandwidth=0.01, lr=5e-4, lambda_init=0.1,
                 lambda_rate=0.05, autocast=None, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w = [nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1) for n in sizes]
        self.W_dec = nn.ParameterList(w)
        self.W_enc = nn.ParameterList(x.clone() for x in w)  # tied init
        self.b_enc = nn.ParameterList(torch.zeros(n) for n in sizes)
        self.theta = nn.ParameterList(torch.full((n,), 1e-6) for n in sizes)
        self.b_dec = nn.ParameterList(torch.zeros(d) for _ in sizes)
        self.register_buffer("lambdas", torch.full((len(sizes),), lambda_init))
        self.register_buffer("l0_ema", torch.zeros(len(sizes)))
        self.target, self.eps, self.rate, self.lr = target_l0, bandwidth, lambda_rate, lr
        self.dtype, self.steps = DTYPES[autocast], 0

    def make_optimizer(self) -> None:
        theta = list(self.theta)
        rest = [p for p in self.parameters() if all(p is not t for t in theta)]
        fused = {"fused": True} if self.lambdas.device.type in ("cpu", "cuda") else {}
        self.opt = torch.optim.Adam([{"params": rest}, {"params": theta, "lr": 10 * self.lr}],
                                    lr=self.lr, betas=(0.0, 0.995), **fused)

    def forward(self, x):
        """Per level: reconstruction, MSE (mean over tokens of the squared error) and L0."""
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            out = []
            for we, be, th, wd, bd in zip(self.W_enc, self.b_enc, self.theta, self.W_dec,
                                          self.b_dec):
                pre = torch.addmm(be, x, we.t())
                recon = torch.addmm(bd, jumprelu(pre, th, self.eps), wd)
                mse = (x - recon.to(x.dtype)).pow(2).sum(1).mean()
                out.append((recon, mse, heaviside(pre, th, self.eps).sum(1).mean()))
            return out

    @torch.no_grad()
    def init_(self, x) -> None:
        """b_dec at the batch mean; each threshold at its feature's (1 - L0 / n) quantile."""
        for we, be, th, bd in zip(self.W_enc, self.b_enc, self.theta, self.b_dec):
            pre = torch.addmm(be, x, we.t())
            k = int(round((1 - self.target / pre.shape[1]) * (pre.shape[0] - 1)))
            th.copy_(pre.kthvalue(k + 1, dim=0).values.clamp_min(1e-6))
            bd.copy_(x.mean(0))
        self.l0_ema.copy_(torch.stack([o[2] for o in self(x)]))

    def step(self, x):
        """One training step (forward every level, loss, backward, Adam, decoder norms,
        lambdas); returns the detached loss and per-level L0 (no host sync)."""
        if self.steps == 0:
            self.init_(x)
        out = self(x)
        l0 = torch.stack([o[2] for o in out])
        loss = torch.stack([o[1] for o in out]).sum() + (self.lambdas * l0).sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for wd, th in zip(self.W_dec, self.theta):
                wd /= wd.norm(dim=1, keepdim=True).clamp_min(1e-8)
                th.clamp_(min=1e-6)
            ema = 0.95 * self.l0_ema + 0.05 * l0  # our controller's defaults (m 0.95, eta 0.03)
            falls = ema - self.l0_ema < -0.03 * (self.l0_ema - self.target)
            self.lambdas *= torch.exp(torch.where(falls, -self.rate, self.rate))
            self.l0_ema.copy_(ema)
        self.steps += 1
        return loss.detach(), l0.detach()


def build(d, sizes, batch, device, target_l0=50.0, autocast=None, **kw) -> DenseFloor:
    """The floor at sizes (d, level sizes, batch) on ``device``; ``floor.step(x)`` with ``x``
    a ``[batch, d]`` fp32 batch on that device."""
    floor = DenseFloor(d, tuple(sizes), target_l0, autocast=autocast, **kw).to(device)
    floor.batch = batch
    floor.make_optimizer()
    return floor
