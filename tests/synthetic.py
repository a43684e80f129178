"""Synthetic hierarchical activations with a known ground-truth forest.

Concepts form a forest over three levels (roots -> mids -> leaves). Each token draws a few
root-to-leaf paths; every node on a path is active, so a child's activity always implies its
parent's. A node's direction is its parent's direction plus an independent component. With
``leaf_only`` a path contributes magnitude * its leaf's direction (feature splitting: a coarse
SAE level can only learn cluster centroids, a finer one splits them); otherwise every node on
the path adds its own direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SyntheticForest:
    d: int
    sizes: tuple[int, ...]
    directions: list[torch.Tensor]  # per level [n_l, d], unit norm
    parent_of: list[torch.Tensor]  # per level pair [n_{l+1}]
    paths_per_token: int
    gen: torch.Generator
    leaf_only: bool = True

    @classmethod
    def make(cls, d=32, branching=(3, 3), n_roots=8, paths_per_token=2, parent_weight=0.6,
             seed=0, leaf_only=True) -> "SyntheticForest":
        gen = torch.Generator().manual_seed(seed)
        sizes = [n_roots]
        for b in branching:
            sizes.append(sizes[-1] * b)
        dirs = [_unit(torch.randn(n_roots, d, generator=gen))]
        parent_of = []
        for l, b in enumerate(branching):
            par = torch.arange(sizes[l]).repeat_interleave(b)
            own = _unit(torch.randn(sizes[l + 1], d, generator=gen))
            dirs.append(_unit(parent_weight * dirs[l][par]
                              + (1 - parent_weight ** 2) ** 0.5 * own))
            parent_of.append(par)
        return cls(d, tuple(sizes), dirs, parent_of, paths_per_token, gen, leaf_only)

    def sample(self, n: int, gen: torch.Generator | None = None
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Activations ``[n, d]`` and the true activity ``[n, n_l]`` (bool) of every level."""
        gen = gen or self.gen
        n_leaf = self.sizes[-1]
        leaves = torch.rand(n, n_leaf, generator=gen).argsort(dim=1)[:, :self.paths_per_token]
        active = [torch.zeros(n, s, dtype=torch.bool) for s in self.sizes]
        rows = torch.arange(n).repeat_interleave(self.paths_per_token)
        node = leaves.reshape(-1)
        x = 0.05 * torch.randn(n, self.d, generator=gen)
        for l in range(len(self.sizes) - 1, -1, -1):
            active[l][rows, node] = True
            if l == len(self.sizes) - 1 or not self.leaf_only:
                mag = 1.0 + 0.5 * torch.rand(node.numel(), generator=gen)
                x.index_add_(0, rows, mag[:, None] * self.directions[l][node])
            if l:
                node = self.parent_of[l - 1][node]
        return x, active

    def batches(self, batch_size: int, seed: int = 0):
        """An endless, seeded stream of activation batches (re-iterable: same seed, same data)."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch_size, gen)[0]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True)


def match_features(levels, x: torch.Tensor, truth: list[torch.Tensor]) -> list[torch.Tensor]:
    """Map each learned feature of each level to the true node of that depth whose activity it
    matches best (F1 over the tokens of ``x``); -1 for a feature that never fires on ``x`` (its
    F1 row is all zero: there is nothing to match)."""
    out = []
    with torch.no_grad():
        for lv, t in zip(levels, truth):
            a = (lv.encode(x).dense() > 0).float()
            t = t.float()
            inter = a.t() @ t
            f1 = 2 * inter / (a.sum(0)[:, None] + t.sum(0)[None, :]).clamp_min(1)
            out.append(torch.where(a.sum(0) > 0, f1.argmax(1), -1))
    return out


def link_precision(forest, matched: list[torch.Tensor],
                   true_parent_of: list[torch.Tensor]) -> float:
    """Fraction of learned links (i -> j) whose matched true nodes are parent and child, over
    the links whose two features fire (a link to a silent feature says nothing either way)."""
    correct = total = 0
    for l, parent_of in enumerate(forest.parent_of):
        kids = (parent_of >= 0).nonzero(as_tuple=True)[0]
        child, parent = matched[l + 1][kids], matched[l][parent_of[kids]]
        live = (child >= 0) & (parent >= 0)
        ok = true_parent_of[l][child[live]] == parent[live]
        correct += int(ok.sum())
        total += int(live.sum())
    return correct / max(1, total)
