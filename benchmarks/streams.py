"""Synthetic hierarchical activation streams for the benchmarks and the GPU check.

Tokens are made on the device from a two-level forest of true features: each token draws
``paths`` leaves; each leaf adds its own direction and its root's, with log-normal magnitudes,
plus noise, scaled so E||x||^2 = d (App. A.1). A leaf's direction leans on its root's. A token
thus carries up to ``2 paths`` true features (fewer when two leaves share a root):
:meth:`SyntheticStream.true_l0` counts them. The stream's natural L0 must lie above a run's
target L0 for the sparsity controller to be what sets it (issue 21): with fewer true features
than the target, a non-negative L0 penalty falls to zero and L0 stays where reconstruction
puts it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: The GPU check's two sizes: the paper's (§4.1, App. A) and a toy one for the CPU.
PAPER = dict(d=2304, sizes=(2048, 4096, 8192, 16384), batch=1024, l0=50.0)
SMALL = dict(d=64, sizes=(64, 128, 256, 512), batch=128, l0=8.0)


class SyntheticStream:
    """An endless iterator of ``[batch_size, d]`` batches on ``device`` (seeded)."""

    def __init__(self, d: int, n_roots: int, branching: int, paths: int, device, seed=0):
        self.device, self.paths, self.branching, self.n_roots = device, paths, branching, n_roots
        self.batch_size = 1024  # what iterating yields
        self.gen = torch.Generator(device=device).manual_seed(seed)
        roots = F.normalize(self._randn(n_roots, d), dim=1)
        own = F.normalize(self._randn(n_roots * branching, d), dim=1)
        kids = F.normalize(0.6 * roots.repeat_interleave(branching, 0) + 0.8 * own, dim=1)
        self.table = torch.cat([roots, kids])
        self.scale = 1.0
        probe = self.batch(1024)
        self.scale = math.sqrt(d / float(probe.pow(2).sum(1).mean()))

    def _randn(self, *shape):
        return torch.randn(*shape, generator=self.gen, device=self.device)

    def _features(self, n: int) -> torch.Tensor:
        """``[n, 2 paths]`` true-feature ids of n tokens: their roots, then their leaves."""
        leaf = torch.randint(self.n_roots * self.branching, (n, self.paths), generator=self.gen,
                             device=self.device)
        return torch.cat([leaf // self.branching, self.n_roots + leaf], 1)

    def batch(self, n: int) -> torch.Tensor:
        idx = self._features(n)
        mag = torch.exp(0.7 * torch.randn(idx.shape, generator=self.gen, device=self.device))
        x = F.embedding_bag(idx, self.table, mode="sum", per_sample_weights=mag)
        return (x + 0.05 * self._randn(n, x.shape[1])) * self.scale

    def true_l0(self, n: int = 4096) -> float:
        """Mean number of distinct true features per token (a fresh generator: the stream's
        own draws are untouched)."""
        probe = SyntheticStream.__new__(SyntheticStream)
        probe.__dict__.update(self.__dict__)
        probe.gen = torch.Generator(device=self.device).manual_seed(12345)
        ids = probe._features(n).sort(1).values
        distinct = 1 + (ids[:, 1:] != ids[:, :-1]).sum(1)
        return float(distinct.float().mean())

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return self.batch(self.batch_size)


def stream(sz: dict, device, seed=0, paths: int | None = None) -> SyntheticStream:
    """As many true leaves as the largest level has latents (in ``n_leaf / 16`` roots of 16
    leaves), and by default ``paths = target L0`` leaves per token: about ``2 L0`` true features
    (each leaf and its root), so the data's natural L0 lies above the target
    (benchmarks/l0_control.py measures it: true features per token and the L0 of an
    unpenalised run)."""
    n_leaf = sz["sizes"][-1]
    s = SyntheticStream(sz["d"], max(8, n_leaf // 16), 16,
                        paths if paths is not None else max(2, int(sz["l0"])), device, seed)
    s.batch_size = sz["batch"]
    return s


__all__ = ["PAPER", "SMALL", "SyntheticStream", "stream"]
