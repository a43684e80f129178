"""Host-device synchronisations per training step, counted on the CPU (issue 17).

A CUDA host waits for the device at every value read back (``item``, ``bool``, ``int``,
``tolist``), every op whose output size depends on the data (``nonzero``, boolean-mask indexing,
``unique``, ``bincount``: two, ``repeat_interleave`` without ``output_size``) and every blocking
upload. ``SyncCounter`` (benchmarks/gpu_check.py) patches those calls, so the CPU counts them
per source line. On the configuration below, before issue 17's changes, an HSAE step made 89
(69 in the kernels: sparse_ops, coupling, coupled_decode) and an independent step 34 (25); after
them 22 (14) and 6 (4); after issue 23's read-back merging 4 (3) and 2 (1), and with the
sibling pairs unread and the loss's finiteness read every ``log_every`` steps 2 (2) and 1 (1):
the bounds are what the code meets. Without CUDA the last test skips; on CUDA it checks
``torch.cuda.set_sync_debug_mode``'s own view of the kernels.
"""

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hsae_core.model.config import HSAEConfig
from hsae_core.model.coupling import (
    PairEntries,
    _compact,
    _PCIndex,
    _SiblingPairs,
    pair_entries_and_swaps,
    swap_masks,
    swap_masks_all,
)
from hsae_core.model.forest import Forest
from hsae_core.model.hsae import HSAE
from hsae_core.model import sparse_ops
from hsae_core.model.sparse_ops import SupportPattern, _offsets, sorted_offsets
from hsae_core.model.trainer import Trainer

_spec = importlib.util.spec_from_file_location(
    "gpu_check", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("gpu_check", gpu_check)
_spec.loader.exec_module(gpu_check)
SyncCounter = gpu_check.SyncCounter

KERNELS = ("hsae_core/model/sparse_ops.py", "hsae_core/model/coupling.py",
           "hsae_core/model/coupled_decode.py", "hsae_core/model/pair_index.py")
SIZES = (64, 128, 256, 512)


def counted(fn) -> int:
    with SyncCounter() as c:
        fn()
    return c.total


def test_counter_sees_every_kind_of_sync_and_none_of_the_alternatives():
    t = torch.tensor([0, 3, 1, 3])
    mask = t > 0
    assert counted(lambda: bool(mask.any())) == 1
    assert counted(lambda: t.sum().item()) == 1
    assert counted(lambda: int(t[1])) == 1
    assert counted(lambda: t.tolist()) == 1
    assert counted(lambda: mask.nonzero()) == 1
    assert counted(lambda: torch.nonzero(mask)) == 1
    assert counted(lambda: t[mask]) == 1
    assert counted(lambda: torch.unique(t)) == 1
    assert counted(lambda: torch.bincount(t, minlength=4)) == 2
    assert counted(lambda: torch.repeat_interleave(t, t)) == 1
    assert counted(lambda: t.new_tensor([1, 2])) == 1
    assert counted(lambda: torch.zeros(3).to("cpu")) == 1  # an upload, on a GPU
    # the fixed-size, sync-free alternatives
    assert counted(lambda: torch.nonzero_static(mask, size=3)) == 0
    assert counted(lambda: torch.repeat_interleave(t, t, output_size=7)) == 0
    assert counted(lambda: sorted_offsets(torch.sort(t).values, 4)) == 0
    assert counted(lambda: t.masked_fill(mask, 0)) == 0
    assert counted(lambda: t.to(torch.float64)) == 0
    assert counted(lambda: t.to("cpu", non_blocking=True)) == 0
    assert counted(lambda: torch.full((1,), 5)) == 0


def test_sync_free_replacements_give_the_same_lists():
    gen = torch.Generator().manual_seed(0)
    idx = torch.sort(torch.randint(0, 50, (300,), generator=gen)).values
    assert torch.equal(sorted_offsets(idx, 60), _offsets(torch.bincount(idx, minlength=60)))
    mask = torch.rand(500, generator=gen) < 0.3
    assert torch.equal(_compact(mask, int(mask.sum())), mask.nonzero(as_tuple=True)[0])


def test_kept_arange_is_torch_arange_without_a_kernel():
    """sparse_ops.arange: views of one kept buffer per dtype, grown when asked for more."""
    from gpu_counters import OpCounter
    from hsae_core.model.sparse_ops import arange
    for n in (0, 5, 1024, 5000, 3):
        for dtype in (torch.int64, torch.int32):
            assert torch.equal(arange(n, dtype), torch.arange(n, dtype=dtype))
    before = arange(100)
    grown = arange(50_000)  # a new buffer; views of the old one stay valid
    assert torch.equal(before, torch.arange(100)) and torch.equal(grown, torch.arange(50_000))
    with OpCounter() as ops:
        arange(6000)
    assert ops.count == 0


def test_batched_builders_equal_one_by_one_at_one_sync_for_all_levels():
    """What hsae.py can call instead of one builder per level or pair (fewer syncs)."""
    gen = torch.Generator().manual_seed(1)
    masks = [torch.rand(16, n, generator=gen) < 0.2 for n in (8, 16, 32)]
    with SyncCounter() as c:
        pats = SupportPattern.from_masks(masks)
    assert c.total == 1
    for p, m in zip(pats, masks):
        q = SupportPattern.from_mask(m)
        assert torch.equal(p.rows, q.rows) and torch.equal(p.cols, q.cols)
    parent_of = [torch.randint(-1, n, (2 * n,), generator=gen) for n in (8, 16)]
    specs = [(pats[l + 1], parent_of[l], pats[l].n_cols) for l in range(2)]
    with SyncCounter() as c:
        entries = PairEntries.build_all(specs)
    assert c.total == 1
    swapped = [torch.rand(n, generator=gen) < 0.5 for n in (8, 16)]
    with SyncCounter() as c:
        both = swap_masks_all([(pats[l], entries[l], swapped[l]) for l in range(2)])
    assert c.total == 1
    for l in range(2):
        one = PairEntries.build(*specs[l])
        assert all(torch.equal(a, b) for a, b in zip(
            (one.sel, one.par, one.keys), (entries[l].sel, entries[l].par, entries[l].keys)))
        keep, take = swap_masks(pats[l], one, swapped[l])
        assert torch.equal(keep, both[l][0]) and torch.equal(take, both[l][1])
        assert take.numel() > 0


def test_merged_read_backs_equal_the_separate_builders():
    """Issue 23: the supports with extra values, the pairs' entries with their swaps, and the
    sibling pairs' distinct keys each read back once for all levels, to the same lists."""
    gen = torch.Generator().manual_seed(2)
    masks = [torch.rand(32, n, generator=gen) < 0.25 for n in (8, 16, 32)]
    dead = [torch.rand(n, generator=gen) < 0.1 for n in (8, 16, 32)]
    with SyncCounter() as c:
        pats, any_dead = SupportPattern.from_masks_reading(masks, [d.any() for d in dead])
    assert c.total == 1 and any_dead == [int(d.any()) for d in dead]
    parent_of = [torch.randint(-1, n, (2 * n,), generator=gen) for n in (8, 16)]
    swapped = [torch.rand(8, generator=gen) < 0.5, None]
    forest = Forest((8, 16, 32), parent_of)
    links = [forest.links(l) for l in range(2)]  # built at a hierarchy update, not per step
    with SyncCounter() as c:
        built = pair_entries_and_swaps([(pats[l + 1], parent_of[l], pats[l], swapped[l],
                                         links[l]) for l in range(2)])
    assert c.total == 1
    for l, (e, keep, take, idx) in enumerate(built):
        ref = _PCIndex.build(pats[l], pats[l + 1], parent_of[l], forest.links(l))
        for name in ("hit_p", "hit_c", "hit_link", "sib_a", "sib_b", "met", "met_by_parent"):
            assert torch.equal(getattr(idx, name), getattr(ref, name)), name
        assert idx.hit_p.numel() > 0 and idx.sib_a.numel() > 0
        one = PairEntries.build(pats[l + 1], parent_of[l], pats[l].n_cols)
        assert all(torch.equal(a, b) for a, b in zip((one.sel, one.par, one.keys),
                                                     (e.sel, e.par, e.keys)))
        if swapped[l] is None:
            assert keep is None and take is None
        else:
            k1, t1 = swap_masks(pats[l], one, swapped[l])
            assert torch.equal(keep, k1) and torch.equal(take, t1) and take.numel() > 0


def test_sibling_pairs_equal_unique_without_a_read_back():
    """Issue 23: the co-firing sibling feature pairs keep one slot per entry pair; the first
    slot of each feature pair holds what ``torch.unique`` gives, the others gather no
    coefficient, and nothing is read back."""
    gen = torch.Generator().manual_seed(3)
    for n, k in ((16, 40), (32, 3), (8, 100), (4, 1)):
        ca, cb = (torch.randint(0, n, (k,), generator=gen) for _ in range(2))
        with SyncCounter() as c:
            sp = _SiblingPairs.build(ca, cb, n)
        assert c.total == 0
        keys, inverse = torch.unique(torch.minimum(ca, cb) * n + torch.maximum(ca, cb),
                                     return_inverse=True)
        slot_keys = sp.lo * n + sp.hi
        assert bool((sp.lo <= sp.hi).all()) and slot_keys.numel() == k
        assert torch.equal(slot_keys.index_select(0, sp.inverse), keys[inverse])
        heads = torch.unique(sp.inverse)  # one slot per distinct pair, its first
        assert torch.equal(slot_keys.index_select(0, heads), keys)
        w = torch.rand(k, generator=gen, dtype=torch.float64)
        coef = torch.zeros(k, dtype=torch.float64).index_add_(0, sp.inverse, w)
        ref = torch.zeros(keys.numel(), dtype=torch.float64).index_add_(0, inverse, w)
        assert torch.equal(coef.index_select(0, heads), ref)
        rest = torch.ones(k, dtype=torch.bool)
        rest[heads] = False
        assert bool((coef[rest] == 0).all())


def one_step(independent: bool):
    """Syncs of one steady-state step: thresholds initialised, a forest, swaps, PC loss (not a
    logging step nor a hierarchy update)."""
    torch.manual_seed(0)
    kw = dict(rho=0.0, swap_rate=0.0) if independent else dict(swap_rate=0.2)
    cfg = HSAEConfig(d_model=32, level_sizes=SIZES, batch_size=128, total_steps=1000,
                     target_l0=8, update_interval=0, **kw)
    t = Trainer(cfg)
    xs = [torch.randn(128, 32) for _ in range(4)]
    t.train_step(xs[0])
    if not independent:
        assert not t.update_hierarchy().is_empty()
    for i in range(5):
        t.train_step(xs[i % 4])
    with SyncCounter() as c:
        t.train_step(xs[1])
    return c


def test_hsae_step_syncs():
    c = one_step(independent=False)
    files = c.by_file()
    assert files.get("hsae_core/model/coupled_decode.py", 0) == 0
    # every level's support and "any dead feature?": one read back (sparse_ops)
    assert files.get("hsae_core/model/sparse_ops.py", 0) == 1
    # once for all pairs: child entries with a parent, swapped children and the PC index lists'
    # sizes (the co-firing sibling feature pairs need no read since issue 23), every pair's
    # lists built in one pass (pair_index.py)
    assert files.get("hsae_core/model/pair_index.py", 0) == 1
    assert files.get("hsae_core/model/coupling.py", 0) == 0
    assert sum(files.get(f, 0) for f in KERNELS) <= 2  # 69 before issue 17, 14 before 23
    # nothing else: the loss's finiteness is read every log_every steps (model/finite.py), the
    # swap draws are one asynchronous upload, the forest's emptiness is read from its cached
    # links
    assert c.total <= 2, c.by_site()  # 89 before issue 17, 22 before issue 23


def test_independent_step_syncs():
    c = one_step(independent=True)
    files = c.by_file()
    assert files.get("hsae_core/model/sparse_ops.py", 0) == 1
    assert sum(files.get(f, 0) for f in KERNELS) == 1  # 25 before issue 17, 4 before 23
    assert c.total <= 1, c.by_site()  # 34 before issue 17, 6 before 23


def cuda_model(seed=3, sizes=(32, 64, 128), d=16):
    cfg = HSAEConfig(d_model=d, level_sizes=sizes, target_l0=3, bandwidth=0.5, seed=seed)
    model = HSAE(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lv in model.levels:
            lv.b_enc.uniform_(-0.3, 0.3, generator=gen)
            lv.threshold.copy_(0.05 + 0.2 * torch.rand(lv.threshold.shape, generator=gen))
    parent_of = []
    for a, b in zip(sizes, sizes[1:]):
        p = torch.randint(0, a, (b,), generator=gen)
        p[torch.rand(b, generator=gen) < 0.3] = -1
        parent_of.append(p)
    model.forest = Forest(sizes, parent_of)
    return model.to("cuda"), gen


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available()
                    or os.environ.get("HSAE_TEST_DEVICE", "cuda").startswith("cpu"),
                    reason="torch.cuda.set_sync_debug_mode needs CUDA")
def test_on_cuda_pc_index_reads_back_once_and_the_backward_never(monkeypatch):
    """torch.cuda.set_sync_debug_mode's view: building the PC index lists of a level pair
    costs the host synchronisations the CPU counter (SyncCounter) sees in it, no more (on one
    H200 both saw 4 for this call outside training, where supports carry no dense masks; within
    a training step gpu_check counts 22.0 patched vs 22.05 CUDA per step); the backward of a
    training step whose supports are all sparse (the merged decode: coupled decode, PC loss,
    JumpReLU) none. (The level-by-level path, taken when a support is dense, syncs in its
    backward: ``unique_consecutive`` in sparse_ops.scatter_bag_sum_, seen on an H200.)"""
    monkeypatch.setattr(sparse_ops, "DENSE_CUTOFF", 1.0)  # every support sparse: merged path
    model, gen = cuda_model()
    x = torch.randn(64, 16, generator=gen).cuda() * 2
    codes = model.encode(x)
    entries = PairEntries.build(codes[1].pattern, model.forest.parent_of[0], 32)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with SyncCounter() as counter:
                idx = _PCIndex.build(codes[0].pattern, codes[1].pattern,
                                     model.forest.parent_of[0], model.forest.links(0), entries)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert idx.hit_p.numel() > 0
    # (torch's own cuda module syncs once while the debug mode is switched back: not ours)
    on_cuda = [str(w.filename) + ":" + str(w.lineno) for w in seen
               if "synchroniz" in str(w.message)
               and not str(w.filename).replace("\\", "/").endswith("torch/cuda/__init__.py")]
    assert len(on_cuda) == counter.total, (on_cuda, counter.by_site())
    swapped = [(torch.rand(n, generator=gen) < 0.3).cuda() & model.forest.has_children(l)
               for l, n in enumerate(model.cfg.level_sizes[:-1])]
    out = model(x, swapped=swapped)
    loss = HSAE.total_loss(out, torch.tensor([0.3, 0.2, 0.1], device="cuda"), 0.7)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _random_pair_setup(seed: int, sizes=(8, 16, 32, 64), batch=24, density=0.25,
                       empty_pair: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    masks = [torch.rand(batch, n, generator=gen) < density for n in sizes]
    pats = SupportPattern.from_masks(masks)
    parent_of = [torch.randint(-1, sizes[l], (sizes[l + 1],), generator=gen)
                 for l in range(len(sizes) - 1)]
    if empty_pair is not None:
        parent_of[empty_pair].fill_(-1)
    forest = Forest(sizes, parent_of)
    swapped = [(torch.rand(n, generator=gen) < 0.5) & forest.has_children(l)
               for l, n in enumerate(sizes[:-1])]
    return pats, forest, swapped


@pytest.mark.parametrize("seed,empty_pair,with_swaps,with_pc", [
    (4, None, True, True), (5, 1, True, True), (6, None, False, True), (7, 0, True, False)])
def test_all_pairs_at_once_equal_pair_by_pair(seed, empty_pair, with_swaps, with_pc):
    """Issue 23: pair_index builds every pair's swap lists, PC index and co-firing sibling
    pairs in one pass over all pairs' entries: the same integers in the same order as
    coupling's pair-by-pair builders (so training is bit for bit unchanged), one read-back."""
    from hsae_core.model.pair_index import build_pair_indexes, pair_tables

    pats, forest, swapped = _random_pair_setup(seed, empty_pair=empty_pair)
    swaps = swapped if with_swaps else None
    pair_tables(forest, pats[0].n_rows, "cpu")  # once per hierarchy update, not per step
    with SyncCounter() as c:
        built = build_pair_indexes(pats, forest, swaps, with_pc)
    assert c.total == 1
    n_sib = 0
    for l, (keep, take, idx, sibs) in enumerate(built):
        links = forest.links(l)
        pc = with_pc and links.kids.numel() > 0
        (e, k1, t1, ref), = pair_entries_and_swaps([
            (pats[l + 1], forest.parent_of[l], pats[l], swaps[l] if swaps else None,
             links if pc else None)])
        if swaps is None:
            assert keep is None and take is None
        else:
            assert torch.equal(keep, k1) and torch.equal(take, t1)
        if not pc:
            assert idx is None and sibs is None
            continue
        for name in ("hit_p", "hit_c", "hit_link", "sib_a", "sib_b", "met", "met_by_parent"):
            assert torch.equal(getattr(idx, name), getattr(ref, name)), name
        if ref.sib_a.numel() == 0:
            assert sibs is None
            continue
        n_sib += ref.sib_a.numel()
        child = pats[l + 1]
        one = _SiblingPairs.build(child.cols.index_select(0, ref.sib_a),
                                  child.cols.index_select(0, ref.sib_b), child.n_cols)
        assert torch.equal(sibs.lo, one.lo) and torch.equal(sibs.hi, one.hi)
        assert torch.equal(sibs.inverse, one.inverse)
    assert n_sib > 0 or not with_pc  # the sibling lists are exercised
