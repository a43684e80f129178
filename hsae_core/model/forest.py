"""The partial feature forest (§3): each child (l+1, j) has at most one parent (l, i).

Stored as one ``parent_of`` vector per adjacent level pair: ``parent_of[l][j]`` is the parent
of feature j of level l+1 in level l, or -1 if j is unassigned. Child sets are disjoint by
construction. Index lists derived from it change only at hierarchy updates and are cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

UNASSIGNED = -1


@dataclass
class Links:
    """The links of one level pair: child ``kids[k]`` has parent ``par[k]`` (kids ascending).

    ``by_child_crow`` indexes them as a CSR ``[n_child, n_parent]`` matrix (one entry per
    assigned child), ``by_parent_*`` as its transpose ``[n_parent, n_child]``.
    """

    kids: torch.Tensor
    par: torch.Tensor
    by_child_crow: torch.Tensor
    by_parent_perm: torch.Tensor
    by_parent_crow: torch.Tensor

    @classmethod
    def build(cls, parent_of: torch.Tensor, n_parents: int) -> "Links":
        kids = (parent_of >= 0).nonzero(as_tuple=True)[0]
        par = parent_of[kids]
        has = torch.zeros(parent_of.numel() + 1, dtype=torch.int64, device=parent_of.device)
        torch.cumsum((parent_of >= 0).long(), 0, out=has[1:])
        perm = torch.argsort(par, stable=True)
        counts = torch.bincount(par, minlength=n_parents)
        crow = torch.zeros(n_parents + 1, dtype=torch.int64, device=parent_of.device)
        torch.cumsum(counts, 0, out=crow[1:])
        return cls(kids, par, has, perm, crow)


@dataclass
class Forest:
    level_sizes: tuple[int, ...]
    parent_of: list[torch.Tensor]  # [n_{l+1}] int64 per level pair
    _has_children: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _links: dict[int, "Links"] = field(default_factory=dict, repr=False)
    _pair_tables: dict = field(default_factory=dict, repr=False)  # pair_index.PairTables

    def __post_init__(self) -> None:
        sizes = tuple(int(n) for n in self.level_sizes)
        self.level_sizes = sizes
        if len(self.parent_of) != len(sizes) - 1:
            raise ValueError(f"Forest: {len(sizes)} levels need {len(sizes) - 1} parent_of "
                             f"vectors, got {len(self.parent_of)}")
        for l, p in enumerate(self.parent_of):
            if p.shape != (sizes[l + 1],):
                raise ValueError(f"Forest: parent_of[{l}] has shape {tuple(p.shape)}, "
                                 f"expected ({sizes[l + 1]},)")
            if p.numel() and (int(p.min()) < UNASSIGNED or int(p.max()) >= sizes[l]):
                raise ValueError(f"Forest: parent_of[{l}] holds ids outside [-1, {sizes[l]})")

    @classmethod
    def empty(cls, level_sizes, device: torch.device | str = "cpu") -> "Forest":
        sizes = tuple(level_sizes)
        return cls(sizes, [torch.full((n,), UNASSIGNED, dtype=torch.int64, device=device)
                           for n in sizes[1:]])

    @property
    def n_pairs(self) -> int:
        return len(self.parent_of)

    def has_children(self, level: int) -> torch.Tensor:
        """Bool ``[n_level]``: which features of ``level`` have at least one child."""
        if level not in self._has_children:
            p = self.parent_of[level]
            mask = torch.zeros(self.level_sizes[level], dtype=torch.bool, device=p.device)
            mask[p[p >= 0]] = True
            self._has_children[level] = mask
        return self._has_children[level]

    def links(self, level_pair: int) -> "Links":
        """The (parent, child) links of a level pair as CSR index lists (cached)."""
        if level_pair not in self._links:
            self._links[level_pair] = Links.build(self.parent_of[level_pair],
                                                  self.level_sizes[level_pair])
        return self._links[level_pair]

    def n_assigned(self, level_pair: int) -> int:
        return int((self.parent_of[level_pair] >= 0).sum())

    def churn(self, before: "Forest") -> list[dict[str, float]]:
        """How this forest differs from ``before``, per level pair: ``churn``, the fraction of
        the children assigned in both whose parent changed; ``gained`` / ``lost``, the children
        assigned here but not before / before but not here (§3.3: how fast the forest
        settles)."""
        out = []
        for new, old in zip(self.parent_of, before.parent_of):
            old = old.to(new.device)
            both = (new >= 0) & (old >= 0)
            kept = int(both.sum())
            out.append({"churn": float((both & (new != old)).sum()) / kept if kept else 0.0,
                        "gained": int(((new >= 0) & (old < 0)).sum()),
                        "lost": int(((new < 0) & (old >= 0)).sum())})
        return out

    def n_children(self, level: int) -> torch.Tensor:
        """Number of children of each feature of ``level`` (``[n_level]``)."""
        p = self.parent_of[level]
        return torch.bincount(p[p >= 0], minlength=self.level_sizes[level])

    def children(self, level: int, parent: int) -> list[int]:
        return (self.parent_of[level] == parent).nonzero(as_tuple=True)[0].tolist()

    def roots(self) -> torch.Tensor:
        """Features of level 0 that have children (the forest's trees)."""
        return self.has_children(0).nonzero(as_tuple=True)[0] if self.n_pairs else torch.empty(0)

    def to(self, device) -> "Forest":
        return Forest(self.level_sizes, [p.to(device) for p in self.parent_of])

    def is_empty(self) -> bool:
        """No links at all (read from the cached links: no host sync after their build)."""
        return all(self.links(l).kids.numel() == 0 for l in range(self.n_pairs))

    def to_dict(self) -> dict:
        return {"level_sizes": list(self.level_sizes),
                "parent_of": [p.cpu().tolist() for p in self.parent_of]}

    @classmethod
    def from_dict(cls, data: dict) -> "Forest":
        return cls(tuple(data["level_sizes"]),
                   [torch.tensor(p, dtype=torch.int64) for p in data["parent_of"]])

    def equals(self, other: "Forest") -> bool:
        return self.level_sizes == other.level_sizes and all(
            torch.equal(a.cpu(), b.cpu()) for a, b in zip(self.parent_of, other.parent_of))
