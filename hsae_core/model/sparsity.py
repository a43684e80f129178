"""Adaptive per-level sparsity weights (Appendix A.2): a velocity-based controller.

The desired L0 trajectory is a first-order decay toward the target,
``dL0* = -eta (L0_ema - target)``, with ``L0_ema`` an EMA (momentum m) of the batch L0.
Each step the observed change of the EMA is compared with ``dL0*``: if L0 falls faster than
desired, lambda_l is lowered, otherwise raised (multiplicatively, by ``exp(rate)``).

With the paper's constants (m = 0.999, eta = 0.001 = 1 - m) the test degenerates: the observed
change is ``(1 - m)(L0_batch - L0_ema)`` and the desired one ``(1 - m)(target - L0_ema)``, so
"observed < desired" is exactly "L0_batch < target", a sign (bang-bang) controller on the batch
L0 whose lambda moves by ``exp(+-rate)`` every step and multiplies by ``exp(rate n)`` over any
run of n steps on one side of the target. With eta < 1 - m the velocity term survives: the test
compares the batch L0 with ``L0_ema + eta / (1 - m) (target - L0_ema)``, so lambda stops rising
once L0 already falls fast enough. The library's defaults (m = 0.95, eta = 0.03: a 20-step EMA,
a 33-step desired decay, steps of exp(+-0.05)) are that damped controller; configs/paper.yaml
names the paper's constants.

Two limits of any such controller (METHOD §1), and what this one does about them:

- **Wind-up.** Under Adam a threshold moves by at most about its learning rate per step, however
  large its gradient, so once the L0 term dominates a threshold's gradient, raising lambda
  further changes nothing. At the end of a cosine schedule the thresholds stop moving, L0 stays
  where it is and lambda grows exponentially (the reference run before issue 21: x10-60 over
  the last half, the last level 6-9% over target). The trainer gives the thresholds their own
  schedule (``HSAEConfig.threshold_lr_scale`` and ``threshold_lr_floor``): a larger peak rate,
  so they keep pace with the encoder early on, and a floor, so L0 stays controllable to the
  last step; lambda is also kept in ``[lambda_min, lambda_max]``.
- **A target the data cannot reach.** A non-negative L0 penalty can only lower L0: on data whose
  unpenalised L0 lies below the target, lambda falls to ``lambda_min`` and L0 stays under.
  :attr:`unreachable` flags each such level (lambda at its floor and L0_ema more than 2% under
  target), so the run says so instead of missing the target silently. A schedule too short for
  the thresholds to fall to the target raises the same flag (measured at the paper's sizes in
  250 steps, docs/l0-control.md): the flag says L0 is under target with nothing left to lower,
  not why.

benchmarks/l0_control.py measures where each level ends; docs/l0-control.md holds the numbers.
"""

from __future__ import annotations

import math

import torch

#: L0_ema this far under target with lambda at its floor marks a level unreachable.
UNREACHABLE_TOL = 0.02


class SparsityController:
    """State lives on the training device so a step never waits for the host."""

    def __init__(self, n_levels: int, target_l0: float, eta: float, momentum: float,
                 lambda_init: float, rate: float, device: torch.device | str = "cpu",
                 lambda_min: float = 0.0, lambda_max: float = math.inf):
        self.target, self.eta, self.momentum, self.rate = target_l0, eta, momentum, rate
        self.lambda_min, self.lambda_max = lambda_min, lambda_max
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
        self.lambdas = (self.lambdas * torch.exp(step.to(self.lambdas))).clamp_(
            self.lambda_min, self.lambda_max)
        self.l0_ema = new_ema

    @property
    def unreachable(self) -> torch.Tensor:
        """Per level: lambda at its floor and L0_ema still more than 2% under the target (the
        data's unpenalised L0 is below it; no sparsity weight can raise L0)."""
        floor = self.lambdas <= self.lambda_min * (1 + 1e-6)
        return floor & (self.l0_ema < self.target * (1 - UNREACHABLE_TOL))

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


__all__ = ["SparsityController", "UNREACHABLE_TOL"]
