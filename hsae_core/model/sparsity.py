"""Adaptive per-level sparsity weights (Appendix A.2): a velocity-based controller.

The desired L0 trajectory is a first-order decay toward the target,
``dL0* = -eta (L0_ema - target)``, with ``L0_ema`` an EMA (momentum 0.999) of the batch L0.
Each step the observed change of the EMA is compared with ``dL0*``: if L0 falls faster than
desired, lambda_l is lowered, otherwise raised (multiplicatively, by ``exp(rate)``).
"""

from __future__ import annotations

import torch


class SparsityController:
    """State lives on the training device so a step never waits for the host."""

    def __init__(self, n_levels: int, target_l0: float, eta: float, momentum: float,
                 lambda_init: float, rate: float, device: torch.device | str = "cpu"):
        self.target, self.eta, self.momentum, self.rate = target_l0, eta, momentum, rate
        self.lambdas = torch.full((n_levels,), lambda_init, dtype=torch.float32, device=device)
        self.l0_ema = torch.zeros(n_levels, dtype=torch.float32, device=device)
        self.started = False

    def update(self, l0_batch: torch.Tensor) -> None:
        """Feed one step's per-level batch L0 (``[n_levels]``) and adjust the lambdas."""
        l0 = l0_batch.detach().to(self.lambdas)
        if not self.started:
            self.l0_ema, self.started = l0.clone(), True
            return
        new_ema = self.momentum * self.l0_ema + (1 - self.momentum) * l0
        observed = new_ema - self.l0_ema
        desired = -self.eta * (self.l0_ema - self.target)
        step = torch.where(observed < desired, -self.rate, self.rate)
        self.lambdas = self.lambdas * torch.exp(step.to(self.lambdas))
        self.l0_ema = new_ema

    def state_dict(self) -> dict:
        return {"lambdas": self.lambdas.clone(), "l0_ema": self.l0_ema.clone(),
                "started": self.started}

    def load_state_dict(self, state: dict) -> None:
        self.lambdas = state["lambdas"].clone().to(self.lambdas.device)
        self.l0_ema = state["l0_ema"].clone().to(self.lambdas.device)
        self.started = bool(state["started"])

    def __repr__(self) -> str:
        lam = ", ".join(f"{v:.3g}" for v in self.lambdas.tolist())
        return f"SparsityController(target={self.target}, lambdas=[{lam}])"


__all__ = ["SparsityController"]
