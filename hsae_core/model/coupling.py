"""The two couplings between adjacent levels, in exact sparse form (METHOD §3).

Never builds a ``[batch, parents, d]`` tensor. For a parent i with children C_i and
``S_i = sum_{j in C_i} a_j d_j``:

  ||a_i d_i - S_i||^2 = a_i^2 ||d_i||^2 - 2 a_i sum_j a_j <d_i, d_j>
                        + sum_j a_j^2 ||d_j||^2 + 2 sum_{j<k in C_i} a_j a_k <d_j, d_k>

summed over tokens b and parents i with children (§3.1), averaged over the batch:

- the diagonal terms are per-feature sums of a^2 times squared row norms;
- the parent-child term pairs each child entry with its parent's entry at the same token (a
  sorted-key lookup) and uses one Gram value <d_parent(j), d_j> per link, sampled from
  ``W_c W_p^T`` on the link pattern;
- the sibling term runs over pairs of children of one parent that fire on the same token
  (rare: the sparsity penalty discourages it), again with sampled Gram values.

Support entries with value 0 (inside the JumpReLU window) are kept: they add nothing to the
loss but carry its gradient to the threshold, exactly as the dense formula does.
The backward is written by hand: each decoder receives one gradient buffer, built with
embedding-bag sums (no ``[pairs, d]`` gathers). Cost per step: O(nnz + links + n * d).

The perturbation (§3.2, METHOD §1) is applied in :meth:`HSAE._decode_all` with
:func:`swap_masks`: swapped parents' entries are masked out of level l's decode and their
children's entries are decoded into level l's reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsae_core.model.forest import Forest, Links
from hsae_core.model.jumprelu import SparseCode
from hsae_core.model.sparse_ops import SupportPattern, arange, scatter_bag_sum_, sddmm


@dataclass
class PairEntries:
    """The child entries of one level pair and batch whose feature has a parent.

    Shared by the PC loss and the perturbation, built once per pair and step: ``sel`` are
    positions in the child's support, ``par`` their parents, ``keys = row * n_parent + par``
    (flat positions in a ``[batch, n_parent]`` map; flat 1-D lookups are several times faster
    than 2-D advanced indexing on CPU).
    """

    sel: torch.Tensor
    par: torch.Tensor
    keys: torch.Tensor

    @classmethod
    def build(cls, child: SupportPattern, parent_of: torch.Tensor,
              n_parents: int) -> "PairEntries":
        return cls.build_all([(child, parent_of, n_parents)])[0]

    @classmethod
    def build_all(cls, specs: list[tuple[SupportPattern, torch.Tensor, int]]
                  ) -> list["PairEntries"]:
        """One per ``(child, parent_of, n_parents)``, their sizes read back at once (one host
        sync on CUDA for every level pair)."""
        c_pars = [parent_of.index_select(0, child.cols) for child, parent_of, _ in specs]
        sizes = torch.stack([(c >= 0).sum() for c in c_pars]).tolist() if specs else []
        return [cls.compacted(child, c_par >= 0, c_par, n, n_parents)
                for (child, _, n_parents), c_par, n in zip(specs, c_pars, sizes)]

    @classmethod
    def compacted(cls, child: SupportPattern, valid: torch.Tensor, c_par: torch.Tensor, n: int,
                  n_parents: int) -> "PairEntries":
        """From every child entry's parent ``c_par`` (-1: none), ``valid = c_par >= 0`` and
        its count ``n`` (read back already)."""
        sel = _compact(valid, n)
        par = c_par.index_select(0, sel)
        return cls(sel, par, child.rows.index_select(0, sel) * n_parents + par)


def pair_entries_and_swaps(specs: list[tuple]) -> list[tuple]:
    """Per ``(child, parent_of, parent, swapped or None, links or None)``: the
    :class:`PairEntries`; with ``swapped``, :func:`swap_masks`'s (keep, take) (else None, None);
    with ``links``, the PC loss's :class:`_PCIndex` (else None). Every size is counted on the
    uncompacted child entries and all are read back at once: one host sync on CUDA for all
    level pairs and all three uses (the taken entries are those whose parent is swapped; the PC
    counts need the parent's dense mask, which training supports carry; without it the index is
    built apart)."""
    c_pars = [parent_of.index_select(0, child.cols) for child, parent_of, *_ in specs]
    valids = [c >= 0 for c in c_pars]
    counts: list[torch.Tensor] = []  # in the order they are read below
    staged = []
    for c, valid, (child, _, parent, swapped, links) in zip(c_pars, valids, specs):
        counts.append(valid.sum())
        if swapped is not None:
            counts.append((valid & swapped.index_select(0, c.clamp(min=0))).sum())
        st = None
        if links is not None and parent.mask is not None:
            st = _StagedCounts.stage(parent, child, c, valid, links)
            counts.extend(st.counts)
        staged.append(st)
    sizes = iter(torch.stack(counts).tolist() if counts else [])
    out = []
    for (child, _, parent, swapped, links), c_par, valid, st in zip(specs, c_pars, valids,
                                                                    staged):
        e = PairEntries.compacted(child, valid, c_par, next(sizes), parent.n_cols)
        keep = take = idx = None
        if swapped is not None:
            taken = _compact(swapped.index_select(0, e.par), next(sizes))
            keep, take = ~swapped.index_select(0, parent.cols), e.sel.index_select(0, taken)
        if st is not None:
            idx = st.finish(e, [next(sizes) for _ in st.counts])
        elif links is not None:
            idx = _PCIndex.build(parent, child, None, links, e)
        out.append((e, keep, take, idx))
    return out


@dataclass
class _StagedCounts:
    """A :class:`_StagedIndex` counted on a pair's uncompacted child entries (those without a
    parent masked out), so its sizes join the entries' read-back."""

    links: Links
    parent: SupportPattern
    link_all: torch.Tensor
    hit_all: torch.Tensor
    cof_all: torch.Tensor
    met: torch.Tensor
    counts: list[torch.Tensor]

    @classmethod
    def stage(cls, parent: SupportPattern, child: SupportPattern, c_par: torch.Tensor,
              valid: torch.Tensor, links: Links) -> "_StagedCounts":
        keys = child.rows * parent.n_cols + c_par.clamp(min=0)
        hit = valid & parent.mask.view(-1).index_select(0, keys)
        link_all = links.by_child_crow.index_select(0, child.cols)  # n_links where unassigned
        met = links.kids.new_zeros(links.kids.numel() + 1, dtype=torch.int32).index_add_(
            0, link_all, hit.int())[:-1] > 0
        size = parent.n_rows * parent.n_cols  # one spare key for the entries without a parent
        same = _key_counts(torch.where(valid, keys, size), size + 1)
        cof = valid & (same > 1)
        return cls(links, parent, link_all, hit, cof, met,
                   [hit.sum(), met.sum(), cof.sum(), ((same.long() - 1) * valid).sum()])

    def finish(self, e: PairEntries, sizes: list[int]) -> "_PCIndex":
        return _StagedIndex(self.parent, e, self.links, self.link_all.index_select(0, e.sel),
                            self.hit_all.index_select(0, e.sel), self.met, None,
                            self.cof_all.index_select(0, e.sel), []).finish(sizes)


@dataclass
class _PCIndex:
    """Index lists of one level pair for one batch (no gradients flow through these).

    Their sizes depend on the batch. With the supports' dense masks at hand (always, in
    training) every size is computed on the device first and the sizes of all level pairs are
    read back at once (:meth:`build_all`): one host synchronisation per step on CUDA, where
    nonzero, bool() or int() per list would cost one each."""

    hit_p: torch.Tensor  # parent entry met by ...
    hit_c: torch.Tensor  # ... the child entry at the same token whose parent it is
    hit_link: torch.Tensor  # the link (child feature) of each hit
    sib_a: torch.Tensor  # child entries a < b of one parent firing on one token
    sib_b: torch.Tensor
    met: torch.Tensor  # the links with a hit in the batch, ascending (child order) ...
    met_by_parent: torch.Tensor  # ... and in parent order (Links.by_parent_perm)

    @classmethod
    def build(cls, parent: SupportPattern, child: SupportPattern, parent_of: torch.Tensor,
              links: Links, entries: PairEntries | None = None) -> "_PCIndex":
        return cls.build_all([(parent, child, parent_of, links, entries)])[0]

    @classmethod
    def build_all(cls, specs: list[tuple]) -> list["_PCIndex"]:
        """One index per ``(parent, child, parent_of, links, entries or None)``."""
        staged = [_StagedIndex.stage(*spec) for spec in specs]
        counts = [c for st in staged for c in st.counts]
        sizes = torch.stack(counts).tolist() if counts else []
        out = []
        for st in staged:
            out.append(st.finish(sizes[:len(st.counts)]))
            sizes = sizes[len(st.counts):]
        return out


@dataclass
class _StagedIndex:
    """A :class:`_PCIndex` before its sizes are known: device masks and their counts."""

    parent: SupportPattern
    e: PairEntries
    links: Links
    link_e: torch.Tensor  # the link of each child entry with a parent
    hit: torch.Tensor  # bool over e: its parent fires on its token
    met: torch.Tensor  # bool over links: a hit in the batch
    p_pos: torch.Tensor | None  # without a mask: each entry's position in the parent support
    cof: torch.Tensor | None  # with a mask: bool over e, a sibling fires on the same token
    counts: list[torch.Tensor]  # 0-dim: hits, met links (, co-firing entries, 2 * pairs)

    @classmethod
    def stage(cls, parent: SupportPattern, child: SupportPattern, parent_of: torch.Tensor,
              links: Links, entries: PairEntries | None = None) -> "_StagedIndex":
        e = PairEntries.build(child, parent_of, parent.n_cols) if entries is None else entries
        link_e = links.by_child_crow.index_select(0, child.cols.index_select(0, e.sel))
        p_pos = cof = None
        extra = []
        if parent.mask is not None:  # dense lookups: O(nnz), no search, no sort of everything
            hit = parent.mask.view(-1).index_select(0, e.keys)
            same = _key_counts(e.keys, parent.n_rows * parent.n_cols)  # entries sharing the key
            cof = same > 1
            # the sum over entries of (same - 1) is twice the number of sibling pairs
            extra = [cof.sum(), (same.long() - 1).sum()]
        else:
            p_keys = parent.rows * parent.n_cols + parent.cols  # sorted: supports are row-major
            p_pos = torch.searchsorted(p_keys, e.keys).clamp_(max=max(p_keys.numel() - 1, 0))
            hit = (p_keys.index_select(0, p_pos) == e.keys if p_keys.numel()
                   else torch.zeros_like(e.keys, dtype=torch.bool))
        met = links.kids.new_zeros(links.kids.numel(), dtype=torch.int32).index_add_(
            0, link_e, hit.int()) > 0
        return cls(parent, e, links, link_e, hit, met, p_pos, cof,
                   [hit.sum(), met.sum(), *extra])

    def finish(self, sizes: list[int]) -> _PCIndex:
        e, n_hit, n_met = self.e, sizes[0], sizes[1]
        hit_pos = _compact(self.hit, n_hit)
        if self.p_pos is None:
            hit_p = _entry_index(self.parent).index_select(
                0, e.keys.index_select(0, hit_pos)).long()
            cof_pos = _compact(self.cof, sizes[2])
            a, b = _sibling_pairs(e.keys.index_select(0, cof_pos), sizes[3] // 2)
            a, b = cof_pos.index_select(0, a), cof_pos.index_select(0, b)
        else:
            hit_p = self.p_pos.index_select(0, hit_pos)
            a, b = _sibling_pairs(e.keys)  # reads its own size back
        perm = self.links.by_parent_perm
        return _PCIndex(hit_p, e.sel.index_select(0, hit_pos),
                        self.link_e.index_select(0, hit_pos), e.sel.index_select(0, a),
                        e.sel.index_select(0, b), _compact(self.met, n_met),
                        perm.index_select(0, _compact(self.met.index_select(0, perm), n_met)))


def _compact(mask: torch.Tensor, n: int) -> torch.Tensor:
    """The positions of the ``n`` True entries of a 1-D ``mask`` (``n`` known): no host sync."""
    return torch.nonzero_static(mask, size=n).view(-1)


_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(name: str, size: int, device) -> torch.Tensor:
    """A reusable flat int32 buffer. Never cleared: callers write the cells they read in the
    same step, so stale cells are never seen."""
    key = (name, device)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < size:
        buf = _SCRATCH[key] = torch.empty(size, dtype=torch.int32, device=device)
    return buf[:size]


def _entry_index(pattern: SupportPattern) -> torch.Tensor:
    """Flat ``[n_rows * n_cols]`` map from row * n_cols + col to the entry's position, valid
    on the support."""
    buf = _scratch("entry", pattern.n_rows * pattern.n_cols, pattern.rows.device)
    keys = pattern.rows * pattern.n_cols + pattern.cols
    buf.index_copy_(0, keys, arange(pattern.nnz, torch.int32, keys.device))
    return buf


def _key_counts(keys: torch.Tensor, size: int) -> torch.Tensor:
    """Int32 over ``keys``: how many entries have the same key (1 = none other). O(nnz), no
    sort."""
    buf = _scratch("count", size, keys.device)
    buf.index_fill_(0, keys, 0)
    buf.index_add_(0, keys, torch.ones_like(keys, dtype=torch.int32))
    return buf.index_select(0, keys)


def _sibling_pairs(keys: torch.Tensor, n_pairs: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs (a, b), a before b in sorted order, of entries with equal keys >= 0.
    ``n_pairs``: their number when known; else it is read back (one host sync)."""
    n = keys.numel()
    if n < 2 or n_pairs == 0:
        return keys.new_zeros(0), keys.new_zeros(0)
    sorted_keys, order = torch.sort(keys, stable=True)
    # partners after each position: the rest of its run of equal keys (none for keys < 0)
    run_end = torch.searchsorted(sorted_keys, sorted_keys, right=True)
    count = torch.where(sorted_keys >= 0, run_end - 1 - arange(n, device=keys.device), 0)
    if n_pairs is None:
        n_pairs = int(count.sum())
        if n_pairs == 0:
            return keys.new_zeros(0), keys.new_zeros(0)
    left = torch.repeat_interleave(arange(n, device=keys.device), count,
                                   output_size=n_pairs)
    offset = arange(n_pairs, device=keys.device) - torch.repeat_interleave(
        torch.cumsum(count, 0) - count, count, output_size=n_pairs)
    return order.index_select(0, left), order.index_select(0, left + 1 + offset)


@dataclass
class _SiblingPairs:
    """The feature pairs (lo < hi) of a batch's co-firing sibling entry pairs, one slot per
    entry pair, sorted by feature pair; ``inverse`` maps each entry pair to the first slot of
    its feature pair. A feature pair's other slots are never mapped to, so their gradient
    coefficients are exact zeros: each distinct feature pair has one Gram value and one
    gradient coefficient, as with ``torch.unique``, but no count of distinct pairs is read
    back (issue 23: the last data-dependent size of the PC loss)."""

    lo: torch.Tensor
    hi: torch.Tensor
    inverse: torch.Tensor

    @classmethod
    def build(cls, ca: torch.Tensor, cb: torch.Tensor, n: int) -> "_SiblingPairs":
        """From the feature ids ``ca``, ``cb`` of each entry pair, ``n`` features: a sort,
        no host sync."""
        keys = torch.minimum(ca, cb) * n + torch.maximum(ca, cb)
        sorted_keys, order = torch.sort(keys)
        first = torch.ones_like(sorted_keys, dtype=torch.bool)
        first[1:] = sorted_keys[1:] != sorted_keys[:-1]
        slot = arange(keys.numel(), device=keys.device)
        head = torch.cummax(torch.where(first, slot, 0), 0).values  # first slot of each run
        inverse = torch.empty_like(order).index_copy_(0, order, head)
        lo = torch.div(sorted_keys, n, rounding_mode="floor")
        return cls(lo, sorted_keys - lo * n, inverse)

    def pattern(self, n: int) -> SupportPattern:
        return SupportPattern(self.lo, self.hi, n, n)


def _link_pattern(links: Links, n_parents: int) -> SupportPattern:
    """The links as a ``[n_child, n_parent]`` support with one entry per assigned child."""
    return SupportPattern(links.kids, links.par, links.by_child_crow.numel() - 1, n_parents,
                          _crow=links.by_child_crow)


@dataclass
class _PairPC:
    """One level pair's share of the forest PC loss: patterns, indexes and masks."""

    level: int  # the parent level l (pair l, l+1)
    pat_p: SupportPattern
    pat_c: SupportPattern
    idx: _PCIndex
    links: Links
    has_children: torch.Tensor  # [n_l] bool
    assigned: torch.Tensor  # [n_{l+1}] bool
    sibs: "_SiblingPairs | None" = None  # the co-firing sibling feature pairs (idx.sib_a/b)


def pairs_pattern(pairs: list[_PairPC], level: int) -> SupportPattern:
    """The support of ``level`` as recorded by the pairs it belongs to."""
    for q in pairs:
        if q.level == level:
            return q.pat_p
        if q.level + 1 == level:
            return q.pat_c
    raise KeyError(level)


def pc_forward(pairs: list[_PairPC], vals: list[torch.Tensor], ws: list[torch.Tensor]):
    """The PC loss ``[L-1]`` of every level pair in ``pairs`` (0 elsewhere), and what its
    backward needs. Each level's squared decoder norms and sum over the batch of a^2 are
    computed once (a middle level is parent in one pair and child in the next)."""
    n_levels = len(vals)
    norm2, sq = {}, {}  # per level: squared decoder row norms, sum over the batch of a^2
    for l in {q.level for q in pairs} | {q.level + 1 for q in pairs}:
        norm2[l] = torch.linalg.vector_norm(ws[l], dim=1).square_()
        sq[l] = torch.zeros_like(norm2[l]).index_add_(0, pairs_pattern(pairs, l).cols,
                                                      vals[l].square())
    out = vals[0].new_zeros(n_levels - 1)
    saved = []
    for q in pairs:
        p, c, idx = q.level, q.level + 1, q.idx
        w_p, w_c = ws[p], ws[c]
        gram = sddmm(_link_pattern(q.links, w_p.shape[0]), w_c, w_p)  # <d_parent(j), d_j>
        diag_p = torch.where(q.has_children, norm2[p], 0.0)
        diag_c = torch.where(q.assigned, norm2[c], 0.0)
        total = torch.dot(sq[p], diag_p) + torch.dot(sq[c], diag_c)
        vp_hit, vc_hit = vals[p].index_select(0, idx.hit_p), vals[c].index_select(0, idx.hit_c)
        gram_hit = gram.index_select(0, idx.hit_link)
        total = total - 2 * torch.dot(vp_hit * vc_hit, gram_hit)
        va, vb = vals[c].index_select(0, idx.sib_a), vals[c].index_select(0, idx.sib_b)
        if idx.sib_a.numel():
            sibs = q.sibs
            sib_dot = sddmm(sibs.pattern(w_c.shape[0]), w_c, w_c).index_select(0, sibs.inverse)
            total = total + 2 * torch.dot(va * vb, sib_dot)
        else:
            sib_dot, sibs = va, None
        out[p] = total / q.pat_p.n_rows
        saved.append((diag_p, diag_c, gram.shape[0], vp_hit, vc_hit, gram_hit, va, vb, sibs,
                      sib_dot))
    return out, (saved, sq)


def pc_backward_(pairs: list[_PairPC], state, grad: torch.Tensor, vals, ws,
                 g_vals: list[torch.Tensor | None], g_w: list[torch.Tensor | None]) -> None:
    """Adds the gradients of ``grad . pc_forward(...)`` to ``g_vals`` and ``g_w`` in place
    (``None`` entries are created): the decoder rows' diagonal terms as one scaled copy of each
    row, the cross terms as bag sums over the links and sibling pairs met in the batch only."""
    row_coef, cross = pc_backward_terms_(pairs, state, grad, vals, g_vals)
    apply_decoder_terms_(g_w, ws, row_coef, cross)


@dataclass
class CrossTerm:
    """Decoder-gradient rows ``dst_level[rows[k]] += coef[k] * W_src_level[partners[k]]``."""

    dst: int
    rows: torch.Tensor
    partners: torch.Tensor
    coef: torch.Tensor
    src: int
    rows_sorted: bool


def pc_backward_terms_(pairs: list[_PairPC], state, grad: torch.Tensor, vals,
                       g_vals: list[torch.Tensor | None]
                       ) -> tuple[list[torch.Tensor | None], list[CrossTerm]]:
    """Adds the activation gradients of ``grad . pc_forward(...)`` to ``g_vals`` in place and
    returns the decoder gradients as terms: per level the coefficient of each row's own
    (diagonal) term, ``g_W[i] += row_coef[i] * W[i]``, and the cross terms between rows."""
    saved_pairs, sq = state
    row_coef: list[torch.Tensor | None] = [None] * len(vals)
    cross: list[CrossTerm] = []

    def add(acc, l, g):
        acc[l] = g if acc[l] is None else acc[l].add_(g)

    for q, saved in zip(pairs, saved_pairs):
        diag_p, diag_c, n_links, vp_hit, vc_hit, gram_hit, va, vb, sibs, sib_dot = saved
        p, c, idx, links = q.level, q.level + 1, q.idx, q.links
        s2 = grad[p] * (2.0 / q.pat_p.n_rows)
        g_vp = vals[p] * diag_p.index_select(0, q.pat_p.cols)
        g_vp.index_add_(0, idx.hit_p, vc_hit * gram_hit, alpha=-1)
        g_vc = vals[c] * diag_c.index_select(0, q.pat_c.cols)
        g_vc.index_add_(0, idx.hit_c, vp_hit * gram_hit, alpha=-1)
        if idx.sib_a.numel():
            g_vc.index_add_(0, idx.sib_a, vb * sib_dot)
            g_vc.index_add_(0, idx.sib_b, va * sib_dot)
        add(g_vals, p, g_vp.mul_(s2))
        add(g_vals, c, g_vc.mul_(s2))
        add(row_coef, p, sq[p] * diag_p.ne(0) * s2)
        add(row_coef, c, sq[c] * diag_c.ne(0) * s2)
        beta = vp_hit.new_zeros(n_links).index_add_(0, idx.hit_link, vp_hit * vc_hit, alpha=-1)
        beta.mul_(s2)
        # child rows: links in child order (ascending, unique); parent rows: the same links in
        # parent order (Links.by_parent_perm), so neither side sorts; only the links met in the
        # batch are summed (listed in the forward: no host sync here; a met link whose products
        # are all 0, on window entries, adds exact zeros)
        met = idx.met
        cross.append(CrossTerm(c, links.kids.index_select(0, met), links.par.index_select(0, met),
                               beta.index_select(0, met), p, True))
        met = idx.met_by_parent
        cross.append(CrossTerm(p, links.par.index_select(0, met), links.kids.index_select(0, met),
                               beta.index_select(0, met), c, True))
        if sibs is not None:  # one coefficient per distinct feature pair, both directions
            coef = va.new_zeros(sibs.lo.numel()).index_add_(0, sibs.inverse, va * vb).mul_(s2)
            cross.append(CrossTerm(c, torch.cat([sibs.lo, sibs.hi]), torch.cat([sibs.hi, sibs.lo]),
                                   torch.cat([coef, coef]), c, False))
    return row_coef, cross


def apply_decoder_terms_(g_w: list[torch.Tensor | None], ws, row_coef: list[torch.Tensor | None],
                         cross: list[CrossTerm]) -> None:
    """Adds :func:`pc_backward_terms_`'s decoder terms to ``g_w`` in place, level by level."""
    for l, coef in enumerate(row_coef):
        if coef is None:
            continue
        if g_w[l] is None:
            g_w[l] = ws[l] * coef[:, None]
        else:
            g_w[l].addcmul_(ws[l], coef[:, None])
    for t in cross:
        scatter_bag_sum_(g_w[t.dst], t.rows, t.partners, t.coef, ws[t.src],
                         dest_sorted=t.rows_sorted)


class _ForestPC(torch.autograd.Function):
    """The PC loss of every level pair alone, as one autograd node (the trainer's path is
    :mod:`hsae_core.model.coupled_decode`, which also decodes)."""

    @staticmethod
    def forward(ctx, pairs: list[_PairPC], n_levels: int, *tensors):
        out, ctx.state = pc_forward(pairs, list(tensors[:n_levels]), list(tensors[n_levels:]))
        ctx.save_for_backward(*tensors)
        ctx.pairs, ctx.n_levels = pairs, n_levels
        return out

    @staticmethod
    def backward(ctx, grad):
        n = ctx.n_levels
        tensors = ctx.saved_tensors
        g_vals: list[torch.Tensor | None] = [None] * n
        g_w: list[torch.Tensor | None] = [None] * n
        pc_backward_(ctx.pairs, ctx.state, grad, list(tensors[:n]), list(tensors[n:]), g_vals, g_w)
        return (None, None, *g_vals, *g_w)


def pc_pairs(codes: list[SparseCode], forest: Forest,
             entries: list[PairEntries | None] | None = None,
             indexes: list["_PCIndex | None"] | None = None,
             sibs_built: list["_SiblingPairs | None"] | None = None) -> list[_PairPC]:
    """The level pairs with links, with this batch's index lists (built together: their sizes
    are read back at once; ``indexes`` are those :func:`pair_entries_and_swaps` or
    :func:`~hsae_core.model.pair_index.build_pair_indexes` built) and co-firing sibling pairs
    (no read-back; ``sibs_built``: those the latter built, None where none co-fire)."""
    used = [l for l in range(len(codes) - 1) if forest.links(l).kids.numel()]
    todo = [l for l in used if indexes is None or indexes[l] is None]
    if sibs_built is not None and todo:
        raise ValueError("pc_pairs: sibs_built needs the index of every pair with links")
    built = dict(zip(todo, _PCIndex.build_all([
        (codes[l].pattern, codes[l + 1].pattern, forest.parent_of[l], forest.links(l),
         entries[l] if entries is not None else None) for l in todo])))
    idx = [built[l] if l in built else indexes[l] for l in used]
    sibs = {}
    for l, i in zip(used, idx):
        if sibs_built is not None:
            if sibs_built[l] is not None:
                sibs[l] = sibs_built[l]
        elif i.sib_a.numel():
            child = codes[l + 1].pattern
            sibs[l] = _SiblingPairs.build(child.cols.index_select(0, i.sib_a),
                                          child.cols.index_select(0, i.sib_b), child.n_cols)
    return [_PairPC(l, codes[l].pattern, codes[l + 1].pattern, i, forest.links(l),
                    forest.has_children(l), forest.parent_of[l] >= 0, sibs.get(l))
            for l, i in zip(used, idx)]


def forest_pc_loss(codes: list[SparseCode], w_decs: list[torch.Tensor], forest: Forest,
                   entries: list[PairEntries | None] | None = None) -> torch.Tensor:
    """``[L-1]``: sum_i ||f_i - sum_{j in C_i} f_j||^2 averaged over the batch, per level pair
    (0 for pairs without links). ``entries`` reuses the perturbation's per-pair lookups."""
    pairs = pc_pairs(codes, forest, entries)
    if not pairs:
        return codes[0].vals.new_zeros(len(codes) - 1)
    return _ForestPC.apply(pairs, len(codes), *(c.vals for c in codes), *w_decs)


def pc_loss(parent: SparseCode, child: SparseCode, w_dec_parent: torch.Tensor,
            w_dec_child: torch.Tensor, parent_of: torch.Tensor) -> torch.Tensor:
    """sum_i ||f_i - sum_{j in C_i} f_j||^2 averaged over the batch, for one level pair."""
    forest = Forest((w_dec_parent.shape[0], w_dec_child.shape[0]), [parent_of])
    return forest_pc_loss([parent, child], [w_dec_parent, w_dec_child], forest)[0]


def swap_masks(parent: SupportPattern, entries: PairEntries, swapped: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep mask over parent entries, positions of the taken child entries) for the
    ``swapped`` parents ([n_l] bool, only parents with children): the parent entries leave
    level l's reconstruction and the taken child entries enter it in their place (§3.2)."""
    return swap_masks_all([(parent, entries, swapped)])[0]


def swap_masks_all(specs: list[tuple[SupportPattern, PairEntries, torch.Tensor]]
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`swap_masks` of every ``(parent, entries, swapped)``, the numbers of taken child
    entries read back at once (one host sync on CUDA for every level pair)."""
    taken = [swapped.index_select(0, e.par) for _, e, swapped in specs]
    sizes = torch.stack([t.sum() for t in taken]).tolist() if specs else []
    return [(~swapped.index_select(0, parent.cols), e.sel.index_select(0, _compact(t, n)))
            for (parent, e, swapped), t, n in zip(specs, taken, sizes)]
