"""The loss's finiteness, read back only when it matters (issue 23).

``if not torch.isfinite(loss)`` every step makes a CUDA host wait for the device once per step.
:class:`FiniteWatch` instead keeps each step's (detached, 0-dim) loss on the device and
:meth:`FiniteWatch.check` reads the pending ones back at once (one host sync) and raises the
:class:`FloatingPointError` the per-step test raised, naming the first step whose loss was not
finite. The trainer checks at its logging cadence, before every hierarchy update, resampling
and checkpoint, at the end, and whenever a step fails (the failure of a diverged run is
reported as the divergence): no checkpoint is written from a diverged state, and a diverged run
stops within ``log_every`` steps.
"""

from __future__ import annotations

import math

import torch


class FiniteWatch:
    """The losses of the steps since the last check, on the loss's device."""

    #: Pending losses that force a check whatever the caller's cadence (bounds the memory of a
    #: loop that never checks, e.g. a huge ``log_every``).
    MAX_PENDING = 1024

    def __init__(self, hint: str):
        self.hint = hint  # what to do about it, ends the error
        self._pending: list[tuple[int, torch.Tensor]] = []

    def record(self, loss: torch.Tensor, step: int) -> None:
        """Keeps ``loss`` (no value is read back, no kernel runs)."""
        self._pending.append((step, loss.detach()))
        if len(self._pending) >= self.MAX_PENDING:
            self.check()

    def check(self) -> None:
        """Raise if a pending loss was not finite (one host sync)."""
        if not self._pending:
            return
        steps, losses = zip(*self._pending)
        self._pending = []
        values = torch.stack(losses).tolist()
        for step, value in zip(steps, values):
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {step}; {self.hint}")

    def check_from(self, err: BaseException) -> None:
        """:meth:`check` while ``err`` is being handled: a recorded divergence is raised from it
        (a diverged run's later failure is its consequence); nothing happens otherwise."""
        try:
            self.check()
        except FloatingPointError as diverged:
            raise diverged from err
        except Exception:  # the device itself failed: ``err`` says more
            return
