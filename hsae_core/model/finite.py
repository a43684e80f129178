"""The loss's finiteness, watched on the device and read back only when it matters (issue 23).

``if not torch.isfinite(loss)`` every step makes a CUDA host wait for the device once per step.
:class:`FiniteWatch` instead records, on the device, the first step whose loss was not finite
and that loss; :meth:`FiniteWatch.check` reads both back (one host sync) and raises the same
:class:`FloatingPointError` the per-step test raised, naming that step. The trainers check at
their logging cadence, before every hierarchy update, resampling and checkpoint, at the end,
and whenever a step fails (the failure of a diverged run is reported as the divergence), so no
checkpoint is written from a diverged state and a diverged run stops within ``log_every``
steps.
"""

from __future__ import annotations

import torch


class FiniteWatch:
    """The first step (and loss) at which the loss stopped being finite, on the loss's device."""

    def __init__(self, hint: str):
        self.hint = hint  # what to do about it, ends the error
        self._first: torch.Tensor | None = None  # float64 [2]: (step or -1, loss)

    def record(self, loss: torch.Tensor, step: int) -> None:
        """Device-side only: no value is read back."""
        loss = loss.detach().to(torch.float64).reshape(())
        if self._first is None:
            self._first = torch.tensor([-1.0, 0.0], dtype=torch.float64).to(
                loss.device, non_blocking=True)
        new = ~torch.isfinite(loss) & (self._first[0] < 0)
        self._first = torch.where(new, torch.stack([loss.new_full((), float(step)), loss]),
                                  self._first)

    def check(self) -> None:
        """Raise if a recorded loss was not finite (one host sync)."""
        if self._first is None:
            return
        step, loss = self._first.tolist()
        if step >= 0:
            raise FloatingPointError(f"loss became {loss} at step {int(step)}; {self.hint}")

    def check_from(self, err: BaseException) -> None:
        """:meth:`check` while ``err`` is being handled: a recorded divergence is raised from it
        (a diverged run's later failure is its consequence); nothing happens otherwise."""
        try:
            self.check()
        except FloatingPointError as diverged:
            raise diverged from err
        except Exception:  # the device itself failed: ``err`` says more
            return
