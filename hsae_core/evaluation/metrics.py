"""Hierarchy consistency metrics (§4.2, METHOD §4), streaming over batches of activity.

Every function takes per-level boolean activity ``[tokens, n_l]`` of one batch and a forest
and returns sums, so callers accumulate over any number of batches and divide at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hsae_core.model.forest import Forest


def child_or(parent_of: torch.Tensor, child_active: torch.Tensor, n_parents: int) -> torch.Tensor:
    """``[tokens, n_parents]``: whether any assigned child of each parent is active."""
    assigned = parent_of >= 0
    out = torch.zeros(child_active.shape[0], n_parents, dtype=torch.int32, device=child_active.device)
    out.index_add_(1, parent_of[assigned], child_active[:, assigned].to(torch.int32))
    return out > 0


@dataclass
class HierarchyStats:
    """Accumulates Hamming distance and conditional co-activation per level pair."""

    forest: Forest
    tokens: int = 0
    hamming_sum: list[float] = field(default_factory=list)
    joint: list[torch.Tensor] = field(default_factory=list)  # per assigned child: #(parent & child)
    child_count: list[torch.Tensor] = field(default_factory=list)
    parent_count: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        for l, p in enumerate(self.forest.parent_of):
            self.hamming_sum.append(0.0)
            self.joint.append(torch.zeros(p.numel(), dtype=torch.int64))
            self.child_count.append(torch.zeros(p.numel(), dtype=torch.int64))
            self.parent_count.append(torch.zeros(self.forest.level_sizes[l], dtype=torch.int64))

    @torch.no_grad()
    def update(self, active: list[torch.Tensor]) -> None:
        self.tokens += active[0].shape[0]
        for l, parent_of in enumerate(self.forest.parent_of):
            par, kid = active[l].cpu(), active[l + 1].cpu()
            parent_of = parent_of.cpu()
            has = self.forest.has_children(l).cpu()
            pred = child_or(parent_of, kid, par.shape[1])
            self.hamming_sum[l] += float((pred[:, has] != par[:, has]).sum())
            assigned = parent_of >= 0
            both = torch.zeros_like(kid)
            both[:, assigned] = kid[:, assigned] & par[:, parent_of[assigned]]
            self.joint[l] += both.sum(0)
            self.child_count[l] += kid.sum(0)
            self.parent_count[l] += par.sum(0)

    def hamming(self) -> list[float]:
        """Mean per-token count of parents whose activity disagrees with the OR of children."""
        return [h / max(1, self.tokens) for h in self.hamming_sum]

    def p_parent_given_child(self) -> list[tuple[float, int]]:
        """Macro-average of P(parent | child) over assigned children that fired; and how many
        assigned children were skipped for never firing."""
        out = []
        for l, parent_of in enumerate(self.forest.parent_of):
            ok = (parent_of.cpu() >= 0) & (self.child_count[l] > 0)
            p = self.joint[l][ok].double() / self.child_count[l][ok]
            skipped = int(((parent_of.cpu() >= 0) & (self.child_count[l] == 0)).sum())
            out.append((float(p.mean()) if p.numel() else float("nan"), skipped))
        return out

    def p_child_given_parent(self) -> list[tuple[float, int]]:
        out = []
        for l, parent_of in enumerate(self.forest.parent_of):
            po = parent_of.cpu()
            pc = self.parent_count[l][po.clamp(min=0)]
            ok = (po >= 0) & (pc > 0)
            p = self.joint[l][ok].double() / pc[ok]
            skipped = int(((po >= 0) & (pc == 0)).sum())
            out.append((float(p.mean()) if p.numel() else float("nan"), skipped))
        return out


def branching_stats(forest: Forest) -> list[dict[str, float]]:
    """Branching statistics of the forest per level pair: parents with children,
    assigned children and their fraction, children per parent (mean over parents that have
    any, median, max), and the fraction of parents with exactly one child."""
    out = []
    for l, parent_of in enumerate(forest.parent_of):
        counts = forest.n_children(l).cpu()
        used = counts[counts > 0]
        n_assigned = int((parent_of >= 0).sum())
        out.append({
            "parents_with_children": int(used.numel()),
            "children_assigned": n_assigned,
            "assigned_frac": n_assigned / max(1, parent_of.numel()),
            "children_mean": float(used.double().mean()) if used.numel() else 0.0,
            "children_median": float(used.double().median()) if used.numel() else 0.0,
            "children_max": int(used.max()) if used.numel() else 0,
            "single_child_frac": float((used == 1).double().mean()) if used.numel() else 0.0,
        })
    return out
