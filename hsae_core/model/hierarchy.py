"""Hierarchy updates (§3.3, Appendix F): each child picks the parent of maximal similarity.

Similarities: cosine of encoder vectors (default), cosine of decoder vectors, or the EMA of
co-activation frequency. Partial tree: children whose best similarity falls in the bottom
``exclude_quantile`` of all children's best similarities stay unassigned. Binary tree: at most
two children per parent, most similar children first. The same ``assign_forest`` builds the
post-hoc forest of the independent-SAE baseline (§4.2 Baselines).

Dead features take part in no assignment (METHOD §4): given ``live`` masks, a feature that has
not fired since the previous update is neither a parent nor a child, and the exclusion quantile
is taken over the live children. Left in, dead features have high mutual cosines, gather under
dead parents and push live children into the excluded quantile.
"""

from __future__ import annotations

from typing import Sequence

import torch

from hsae_core.model.forest import UNASSIGNED, Forest
from hsae_core.model.jumprelu import JumpReLULevel, SparseCode

#: Children scored per block when computing similarities (bounds memory to chunk x n_parents).
SIM_CHUNK = 2048
#: Candidate parents per child considered by the binary tree.
BINARY_CANDIDATES = 16


def top_parents(child_vecs: torch.Tensor, parent_vecs: torch.Tensor, k: int = 1,
                parent_ok: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities ``[n_child, k]`` and parent ids, in row blocks; parents not
    ``parent_ok`` score -inf."""
    c = torch.nn.functional.normalize(child_vecs.float(), dim=1)
    p = torch.nn.functional.normalize(parent_vecs.float(), dim=1)
    sims, ids = [], []
    for s in range(0, c.shape[0], SIM_CHUNK):
        block = c[s:s + SIM_CHUNK] @ p.t()
        if parent_ok is not None:
            block.masked_fill_(~parent_ok, float("-inf"))
        v, i = block.topk(k, dim=1)
        sims.append(v)
        ids.append(i)
    return torch.cat(sims), torch.cat(ids)


def top_parents_from_scores(scores: torch.Tensor, k: int = 1,
                            parent_ok: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of a precomputed ``[n_parent, n_child]`` score matrix, per child; parents not
    ``parent_ok`` score -inf."""
    scores = scores.t()
    if parent_ok is not None:
        scores = scores.masked_fill(~parent_ok, float("-inf"))
    v, i = scores.topk(k, dim=1)
    return v, i


def assign_children(sims: torch.Tensor, cands: torch.Tensor, n_parents: int,
                    exclude_quantile: float, max_children: int | None = None,
                    child_ok: torch.Tensor | None = None) -> torch.Tensor:
    """``parent_of`` for one level pair from each child's ranked candidate parents.

    ``sims``/``cands`` are ``[n_child, k]`` (best first; -inf: no candidate). Only children
    ``child_ok`` (default all) with a finite best similarity take part; those below the
    ``exclude_quantile`` of their best similarities stay unassigned; with ``max_children``,
    parents accept children in order of similarity until full, and a refused child tries its
    next candidate.
    """
    best = sims[:, 0]
    parent_of = torch.full((sims.shape[0],), UNASSIGNED, dtype=torch.int64, device=sims.device)
    eligible = torch.isfinite(best)
    if child_ok is not None:
        eligible &= child_ok
    if exclude_quantile > 0 and bool(eligible.any()):
        cut = torch.quantile(best[eligible].double(), exclude_quantile).to(best.dtype)
        eligible &= best >= cut
    if max_children is None:
        parent_of[eligible] = cands[eligible, 0]
        return parent_of
    capacity = torch.full((n_parents,), max_children, dtype=torch.int64, device=sims.device)
    for r in range(cands.shape[1]):
        todo = (eligible & (parent_of == UNASSIGNED)).nonzero(as_tuple=True)[0]
        if todo.numel() == 0:
            break
        par, sim = cands[todo, r], sims[todo, r]
        usable = torch.isfinite(sim)  # a dead parent is never a candidate
        todo, par, sim = todo[usable], par[usable], sim[usable]
        order = torch.argsort(sim, descending=True, stable=True)
        order = order[torch.argsort(par[order], stable=True)]  # by parent, best first
        par_sorted = par[order]
        first = torch.searchsorted(par_sorted, par_sorted, right=False)
        rank = torch.arange(par_sorted.numel(), device=sims.device) - first
        accept = rank < capacity[par_sorted]
        parent_of[todo[order[accept]]] = par_sorted[accept]
        capacity -= torch.bincount(par_sorted[accept], minlength=n_parents)
    return parent_of


def level_vectors(level: JumpReLULevel, similarity: str) -> torch.Tensor:
    if similarity == "encoder":
        return level.W_enc.detach()
    if similarity == "decoder":
        return level.W_dec.detach()
    raise ValueError(f"similarity {similarity!r} has no parameter vectors")


@torch.no_grad()
def assign_forest(levels: Sequence[JumpReLULevel], similarity: str = "encoder",
                  exclude_quantile: float = 0.2, tree: str = "partial",
                  coactivation: "CoactivationEMA | None" = None,
                  live: Sequence[torch.Tensor] | None = None) -> Forest:
    """Build the forest for trained (or training) levels; also the post-hoc baseline.
    ``live[l]`` (bool ``[n_l]``, default all) marks the features that may take part."""
    sizes = tuple(lv.n_features for lv in levels)
    q = 0.0 if tree == "full" else exclude_quantile
    max_children = 2 if tree == "binary" else None
    k = BINARY_CANDIDATES if max_children else 1
    parent_of = []
    for l in range(len(levels) - 1):
        k_eff = min(k, sizes[l])
        parent_ok = None if live is None else live[l].to(levels[l].W_enc.device)
        child_ok = None if live is None else live[l + 1].to(levels[l].W_enc.device)
        if similarity == "coactivation":
            if coactivation is None:
                raise ValueError("similarity='coactivation' needs co-activation statistics")
            sims, cands = top_parents_from_scores(coactivation.frequencies(l), k_eff, parent_ok)
        else:
            sims, cands = top_parents(level_vectors(levels[l + 1], similarity),
                                      level_vectors(levels[l], similarity), k_eff, parent_ok)
        parent_of.append(assign_children(sims, cands, sizes[l], q, max_children, child_ok))
    return Forest(sizes, parent_of)


class CoactivationEMA:
    """Per-step EMA of joint firing frequency P(parent i and child j active), per level pair.

    Exact per-step EMA at O(active pairs) per step: increments are accumulated scaled by
    ``m^-t`` and the matrix is rescaled every ``RESCALE`` steps, instead of decaying the whole
    ``[n_l, n_{l+1}]`` matrix each step. Each step counts a subsample of ``tokens`` rows.
    """

    RESCALE = 1000

    def __init__(self, level_sizes: Sequence[int], momentum: float, tokens: int, device="cpu"):
        self.momentum, self.tokens = momentum, tokens
        self.acc = [torch.zeros(a, b, device=device) for a, b in zip(level_sizes, level_sizes[1:])]
        self.t = 0  # steps since the last rescale
        self.weight = 0.0  # sum of m^(-s) over counted steps since the last rescale

    @torch.no_grad()
    def update(self, codes: Sequence[SparseCode]) -> None:
        inv = self.momentum ** (-(self.t + 1))
        n_tok = min(self.tokens, codes[0].pattern.n_rows)
        for l, acc in enumerate(self.acc):
            pa, ca = _subsample(codes[l], self.tokens), _subsample(codes[l + 1], self.tokens)
            pairs = _same_row_pairs(pa, ca)
            if pairs is not None:
                flat = pairs[0] * acc.shape[1] + pairs[1]
                scale = (1 - self.momentum) * inv / n_tok
                acc.view(-1).index_add_(0, flat, torch.full(flat.shape, scale, dtype=acc.dtype,
                                                            device=acc.device))
        self.t += 1
        if self.t >= self.RESCALE:
            for acc in self.acc:
                acc.mul_(self.momentum ** self.t)
            self.t = 0

    def frequencies(self, level_pair: int) -> torch.Tensor:
        """The current EMA matrix ``[n_l, n_{l+1}]``."""
        return self.acc[level_pair] * self.momentum ** self.t

    def state_dict(self) -> dict:
        return {"acc": [a.clone() for a in self.acc], "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.acc = [a.to(b.device) for a, b in zip(state["acc"], self.acc)]
        self.t = int(state["t"])


def _subsample(code: SparseCode, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the active entries in the first ``tokens`` rows."""
    active = code.vals > 0
    rows, cols = code.pattern.rows[active], code.pattern.cols[active]
    keep = rows < tokens
    return rows[keep], cols[keep]


def _same_row_pairs(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]):
    """All (col_a, col_b) with equal rows; both inputs are row-sorted."""
    ra, ca = a
    rb, cb = b
    if ra.numel() == 0 or rb.numel() == 0:
        return None
    n_rows = int(max(ra.max(), rb.max())) + 1
    cnt_b = torch.bincount(rb, minlength=n_rows)
    start_b = torch.cumsum(cnt_b, 0) - cnt_b
    reps = cnt_b[ra]
    left = torch.repeat_interleave(torch.arange(ra.numel(), device=ra.device), reps)
    offs = torch.arange(left.numel(), device=ra.device) - torch.repeat_interleave(
        torch.cumsum(reps, 0) - reps, reps)
    right = start_b[ra[left]] + offs
    return ca[left], cb[right]


__all__ = ["assign_forest", "assign_children", "top_parents", "CoactivationEMA"]
