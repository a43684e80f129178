"""Dead-feature bookkeeping (§3.3, Appendix A): tokens since each feature last fired.

A feature that has not fired for ``window`` training tokens is dead; ghost grads
(:func:`~hsae_core.model.jumprelu.ghost_grad_loss`) act on dead features. Under ``torchrun`` a
feature fired in the global batch if it fired on any rank, so every rank holds the same counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hsae_core.common.distributed import SINGLE, DistContext, all_reduce_max_
from hsae_core.model.jumprelu import SparseCode


class FiringTracker:
    """Per level, ``since_fired[l][i]``: training tokens since feature i of level l last fired."""

    def __init__(self, level_sizes: Sequence[int], device: torch.device | str = "cpu"):
        self.since_fired = [torch.zeros(n, dtype=torch.int64, device=device) for n in level_sizes]

    @torch.no_grad()
    def update(self, codes: Sequence[SparseCode], dist: DistContext = SINGLE,
               global_batch: int | None = None) -> None:
        """Count one batch: ``global_batch`` tokens (the rank's rows when None) pass, and the
        features active in ``codes`` (on any rank) restart at 0."""
        for s, code in zip(self.since_fired, codes):
            # fixed-size scatter, no boolean indexing: no host synchronisation on CUDA
            fired = torch.zeros(s.numel(), dtype=torch.int32, device=s.device)
            fired.index_add_(0, code.pattern.cols, code.active.to(torch.int32))
            if dist.active:
                fired.clamp_(max=1)
                all_reduce_max_(dist, fired)
            s += global_batch if dist.active else code.pattern.n_rows
            s.masked_fill_(fired > 0, 0)

    def dead(self, window: int) -> list[torch.Tensor]:
        """Boolean masks of the features that have not fired for ``window`` tokens."""
        return [s >= window for s in self.since_fired]

    def state(self) -> list[torch.Tensor]:
        return [s.cpu() for s in self.since_fired]

    def load_state(self, counts: Sequence[torch.Tensor], device: torch.device | str) -> None:
        self.since_fired = [s.to(device) for s in counts]


__all__ = ["FiringTracker"]
