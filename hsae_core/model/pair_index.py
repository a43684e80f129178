"""Every level pair's per-batch index lists at once (issue 23: ops dispatched per step).

The perturbation (§3.2) and the PC loss (§3.1) need, per level pair and batch, the swapped
parents' keep mask and the child entries taken in their place, and the PC loss's index lists
(:class:`~hsae_core.model.coupling._PCIndex`) with their co-firing sibling feature pairs
(:class:`~hsae_core.model.coupling._SiblingPairs`).
:func:`~hsae_core.model.coupling.pair_entries_and_swaps` builds them pair by pair. Here the
child entries of every pair are concatenated and each lookup, count, compaction and sort runs
once over all of them, with ids that never collide between pairs: feature i of level l is
``off[l] + i`` (the stacked decoders' rows), links are numbered pair after pair, and pair q's
(token, parent) keys are offset by the key spaces of the pairs before it. Each pair's lists are
slices of the results in the pair's own ids: the same integers in the same order as pair by
pair (tests/test_sync_count.py), so training is bit for bit unchanged; one host read-back for
all pairs, as before, and about half the dispatched ops of the index work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsae_core.model.coupling import (
    _PCIndex,
    _SiblingPairs,
    _entry_index,
    _key_counts,
    _sibling_pairs,
)
from hsae_core.model.forest import Forest
from hsae_core.model.sparse_ops import SupportPattern, arange

#: Build every pair's index lists at once (False: pair by pair, coupling.pair_entries_and_swaps;
#: for A/B measurements and tests).
BATCHED = True


@dataclass
class PairTables:
    """Lookup tables of one forest and batch size over global feature ids ``g`` (feature i of
    level l is ``off[l] + i``) and global link ids (pair q's links from ``loff[q]``). Built
    once per hierarchy update (the forest caches them), never per step."""

    off: list[int]  # per level, the first global feature id (and the total)
    koff: list[int]  # per pair, the first (token, parent) key (and the total: the spare key)
    loff: list[int]  # per pair, the first global link id (and the total: the spare link)
    par: torch.Tensor  # [N] the parent's id in its level, or -1 (level 0: -1)
    par_key: torch.Tensor  # [N] max(parent, 0): the parent column of a key
    n_par: torch.Tensor  # [N] the size of the parent level (a key's row stride)
    key_off: torch.Tensor  # [N] koff of the feature's pair
    par_global: torch.Tensor  # [N] off[l - 1] + max(parent, 0)
    link: torch.Tensor  # [N] global link id of an assigned child, else the spare link
    link_local: torch.Tensor  # [links + 1] each global link's id within its pair
    local: torch.Tensor  # [N] each global feature's id within its level
    by_parent: torch.Tensor  # [links] global link ids, each pair's in its parent order

    @classmethod
    def build(cls, forest: Forest, batch: int, device) -> "PairTables":
        sizes = forest.level_sizes
        off = _bounds(list(sizes))
        koff = _bounds([batch * sizes[q] for q in range(forest.n_pairs)])
        loff = _bounds([forest.links(q).kids.numel() for q in range(forest.n_pairs)])
        n_all = off[-1]
        par = torch.full((n_all,), -1, dtype=torch.int64, device=device)
        n_par = torch.zeros(n_all, dtype=torch.int64, device=device)
        key_off = torch.zeros(n_all, dtype=torch.int64, device=device)
        par_global = torch.zeros(n_all, dtype=torch.int64, device=device)
        link = torch.full((n_all,), loff[-1], dtype=torch.int64, device=device)
        link_local = torch.zeros(loff[-1] + 1, dtype=torch.int64, device=device)
        by_parent = []
        for q, parent_of in enumerate(forest.parent_of):
            rows = slice(off[q + 1], off[q + 2])
            links = forest.links(q)
            par[rows] = parent_of
            n_par[rows] = sizes[q]
            key_off[rows] = koff[q]
            par_global[rows] = off[q] + parent_of.clamp(min=0)
            link[off[q + 1] + links.kids] = loff[q] + torch.arange(
                links.kids.numel(), device=device)
            link_local[loff[q]:loff[q + 1]] = torch.arange(links.kids.numel(), device=device)
            by_parent.append(links.by_parent_perm + loff[q])
        local = torch.cat([torch.arange(n, device=device) for n in sizes])
        return cls(off, koff, loff, par, par.clamp(min=0), n_par, key_off, par_global, link,
                   link_local, local, torch.cat(by_parent))


def pair_tables(forest: Forest, batch: int, device) -> PairTables:
    """:class:`PairTables` of ``forest`` for ``batch`` rows, cached on the forest."""
    cache = forest._pair_tables
    key = (batch, str(device))
    if key not in cache:
        cache[key] = PairTables.build(forest, batch, device)
    return cache[key]


def build_pair_indexes(patterns: list[SupportPattern], forest: Forest,
                       swapped: list[torch.Tensor] | None, with_pc: bool) -> list[tuple]:
    """Per level pair l: ``(keep, take, index, sibs)``: the swap's keep mask over level l's
    entries and taken entries of level l+1 (None without ``swapped``), and the PC loss's
    :class:`_PCIndex` and :class:`_SiblingPairs` (None without ``with_pc`` or links; sibs also
    None when no siblings co-fire). Every pattern must carry its dense mask (training
    supports do). Equal to :func:`coupling.pair_entries_and_swaps` and
    :func:`coupling.pc_pairs` pair by pair; one host sync on CUDA."""
    n_pairs = len(patterns) - 1
    kids = patterns[1:]
    dev = kids[0].rows.device
    t = pair_tables(forest, patterns[0].n_rows, dev)
    base = _bounds([p.nnz for p in kids])
    # every child entry of every pair, in pair order: global feature, row, position in its level
    g = torch.cat([p.cols + t.off[q + 1] for q, p in enumerate(kids)])
    rows = torch.cat([p.rows for p in kids])
    loc = torch.cat([arange(p.nnz, device=dev) for p in kids])
    valid = t.par.index_select(0, g) >= 0
    flags = []  # bools over the entries, counted per pair
    if with_pc:
        pc = _PCStage.stage(patterns, t, g, rows, valid, base)
        flags += [pc.hit, pc.cof]
    if swapped is not None:
        swapped_all = torch.cat(list(swapped))
        flags.append(valid & swapped_all.index_select(0, t.par_global.index_select(0, g)))
    stacked = torch.stack(flags)
    counts = []
    for q in range(n_pairs):
        counts.append(stacked[:, base[q]:base[q + 1]].sum(1))
        if with_pc:
            counts += pc.counts(q, base, t)
    sizes = torch.cat(counts).view(n_pairs, -1).tolist() if n_pairs else []
    # per pair: [(hit, cof,) (taken,) (2 * sibling pairs, met links)]
    take_all = tb = None
    if swapped is not None:
        col = 2 if with_pc else 0
        n_taken = [s[col] for s in sizes]
        take_all = loc.index_select(0, torch.nonzero_static(
            stacked[col], size=sum(n_taken)).view(-1))
        tb = _bounds(n_taken)
    lists = pc.finish(patterns, forest, t, g, loc, sizes) if with_pc else [(None, None)] * n_pairs
    out = []
    for q in range(n_pairs):
        keep = take = None
        if swapped is not None:
            keep = ~swapped[q].index_select(0, patterns[q].cols)
            take = take_all[tb[q]:tb[q + 1]]
        out.append((keep, take, *lists[q]))
    return out


def _bounds(ns: list[int]) -> list[int]:
    out = [0]
    for n in ns:
        out.append(out[-1] + n)
    return out


@dataclass
class _PCStage:
    """The PC loss's per-entry lookups over every pair's child entries, before the sizes are
    read back: which entries meet their parent on their token (``hit``), which share their
    (token, parent) key with a sibling (``cof``), which links are met."""

    local_key: torch.Tensor  # row * n_parent + parent (the parent's mask position)
    key: torch.Tensor  # local_key offset by the pair's key space; the spare key if no parent
    twice_pairs: torch.Tensor  # per entry with a parent: its siblings on its token (summed: 2x)
    hit: torch.Tensor
    cof: torch.Tensor
    link: torch.Tensor  # global link id, the spare link if no parent
    met: torch.Tensor  # bool over global links

    @classmethod
    def stage(cls, patterns, t: PairTables, g, rows, valid, base) -> "_PCStage":
        spare_key = t.koff[-1]
        local_key = (rows * t.n_par.index_select(0, g)
                     + t.par_key.index_select(0, g))  # row * n_parent + parent, per pair
        hit = valid & torch.cat([patterns[q].mask.view(-1).index_select(
            0, local_key[base[q]:base[q + 1]]) for q in range(len(patterns) - 1)])
        key = torch.where(valid, local_key + t.key_off.index_select(0, g), spare_key)
        same = _key_counts(key, spare_key + 1)  # entries sharing a (token, parent) key
        link = t.link.index_select(0, g)
        met = torch.zeros(t.loff[-1] + 1, dtype=torch.int32, device=g.device).index_add_(
            0, link, hit.int())[:-1] > 0
        return cls(local_key, key, (same.long() - 1) * valid, hit, valid & (same > 1), link,
                   met)

    def counts(self, q: int, base: list[int], t: PairTables) -> list[torch.Tensor]:
        """Pair q's twice its sibling entry pairs and its met links (0-dim -> [1])."""
        return [self.twice_pairs[base[q]:base[q + 1]].sum().view(1),
                self.met[t.loff[q]:t.loff[q + 1]].sum().view(1)]

    def finish(self, patterns, forest: Forest, t: PairTables, g, loc, sizes) -> list[tuple]:
        """Per pair, ``(_PCIndex, _SiblingPairs or None)`` (None, None without links)."""
        n_pairs = len(sizes)
        n_hit, n_cof = [s[0] for s in sizes], [s[1] for s in sizes]
        n_sib, n_met = [s[-2] // 2 for s in sizes], [s[-1] for s in sizes]
        hit_at = torch.nonzero_static(self.hit, size=sum(n_hit)).view(-1)
        hit_c, hit_key = loc.index_select(0, hit_at), self.local_key.index_select(0, hit_at)
        hit_link = t.link_local.index_select(0, self.link.index_select(0, hit_at))
        met_at = t.link_local.index_select(0, torch.nonzero_static(
            self.met, size=sum(n_met)).view(-1))
        met_p = t.by_parent.index_select(0, torch.nonzero_static(
            self.met.index_select(0, t.by_parent), size=sum(n_met)).view(-1))
        met_by_parent = t.link_local.index_select(0, met_p)
        cof_at = torch.nonzero_static(self.cof, size=sum(n_cof)).view(-1)
        a, b = _sibling_pairs(self.key.index_select(0, cof_at), sum(n_sib))
        a, b = cof_at.index_select(0, a), cof_at.index_select(0, b)
        sib_a, sib_b = loc.index_select(0, a), loc.index_select(0, b)
        sibs = (_SiblingPairs.build(g.index_select(0, a), g.index_select(0, b), t.off[-1])
                if a.numel() else None)
        if sibs is not None:  # feature ids within their level
            sib_lo, sib_hi = t.local.index_select(0, sibs.lo), t.local.index_select(0, sibs.hi)
        hb, mb, sb = _bounds(n_hit), _bounds(n_met), _bounds(n_sib)
        out = []
        for q in range(n_pairs):
            if not forest.links(q).kids.numel():
                out.append((None, None))
                continue
            h, s, m = slice(hb[q], hb[q + 1]), slice(sb[q], sb[q + 1]), slice(mb[q], mb[q + 1])
            hit_p = _entry_index(patterns[q]).index_select(0, hit_key[h]).long()
            idx = _PCIndex(hit_p, hit_c[h], hit_link[h], sib_a[s], sib_b[s], met_at[m],
                           met_by_parent[m])
            sib = (_SiblingPairs(sib_lo[s], sib_hi[s], sibs.inverse[s] - sb[q]) if n_sib[q]
                   else None)
            out.append((idx, sib))
        return out
