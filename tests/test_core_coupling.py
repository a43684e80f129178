"""The fast sparse paths against the dense float64 reference on random inputs and forests."""

import pytest
import torch

from hsae_core.model import sparse_ops
from hsae_core.model.config import HSAEConfig
from hsae_core.model.coupling import pc_loss
from hsae_core.model.forest import Forest
from hsae_core.model.hsae import HSAE
from tests.reference import dense_hsae_loss, dense_level, dense_pc_loss


def random_forest(sizes, gen, p_unassigned=0.3):
    parent_of = []
    for a, b in zip(sizes, sizes[1:]):
        p = torch.randint(0, a, (b,), generator=gen)
        p[torch.rand(b, generator=gen) < p_unassigned] = -1
        parent_of.append(p)
    return Forest(tuple(sizes), parent_of)


def random_model(seed, sizes=(6, 10, 16), d=5, bandwidth=0.5):
    cfg = HSAEConfig(d_model=d, level_sizes=sizes, target_l0=3, bandwidth=bandwidth, seed=seed)
    model = HSAE(cfg).double()
    gen = torch.Generator().manual_seed(seed)
    for lv in model.levels:
        with torch.no_grad():
            lv.W_enc.copy_(torch.randn(lv.W_enc.shape, generator=gen, dtype=torch.float64))
            # not unit norm on purpose
            lv.W_dec.copy_(torch.randn(lv.W_dec.shape, generator=gen, dtype=torch.float64))
            lv.b_enc.copy_(0.3 * torch.randn(lv.b_enc.shape, generator=gen, dtype=torch.float64))
            lv.b_dec.copy_(0.3 * torch.randn(lv.b_dec.shape, generator=gen, dtype=torch.float64))
            lv.threshold.copy_(0.2 + torch.rand(lv.threshold.shape, generator=gen,
                                                dtype=torch.float64))
    model.forest = random_forest(sizes, gen)
    return model, gen


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dense_kernels", [False, True])
def test_full_loss_and_gradients_match_dense_reference(seed, dense_kernels, monkeypatch):
    monkeypatch.setattr(sparse_ops, "DENSE_CUTOFF", 0.0 if dense_kernels else 1.1)
    model, gen = random_model(seed)
    x = torch.randn(13, 5, generator=gen, dtype=torch.float64) * 2
    swapped = [(torch.rand(n, generator=gen) < 0.5) & model.forest.has_children(l)
               for l, n in enumerate(model.cfg.level_sizes[:-1])]
    lambdas = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)
    rho = 0.7

    out = model(x, swapped=swapped)
    fast = HSAE.total_loss(out, lambdas, rho)
    fast.backward()
    g_fast = grads(model)
    model.zero_grad()
    ref = dense_hsae_loss(model, x, model.forest, swapped, lambdas, rho)
    ref.backward()
    g_ref = grads(model)

    assert rel_err(fast.detach(), ref.detach()) < 1e-10
    assert set(g_fast) == set(g_ref)
    for name in g_ref:
        assert rel_err(g_fast[name], g_ref[name]) < 1e-6, name
    # the window really is exercised: some thresholds receive STE gradient
    assert any(g_ref[f"levels.{l}.threshold"].abs().sum() > 0 for l in range(3))


@pytest.mark.parametrize("dense_kernels", [False, True])
def test_logged_error_of_perturbed_levels_is_the_unperturbed_one(dense_kernels, monkeypatch):
    """``sq_error`` (the training curves' FVE) is the clean reconstruction's error on both
    decode paths; the merged one holds the swaps inside a level's output (a bug found in issue
    23: there it logged the perturbed error), and NaN without ``clean_error``."""
    monkeypatch.setattr(sparse_ops, "DENSE_CUTOFF", 0.0 if dense_kernels else 1.1)
    model, gen = random_model(4)
    x = torch.randn(13, 5, generator=gen, dtype=torch.float64) * 2
    swapped = [model.forest.has_children(l) for l in range(2)]  # every parent with children
    out = model(x, swapped=swapped, clean_error=True)
    clean = torch.stack([(x - model.reconstruct(x, l)).pow(2).sum() for l in range(3)])
    perturbed = model(x, swapped=swapped).mse * x.shape[0]
    assert torch.allclose(out.sq_error, clean, rtol=1e-12)
    assert not torch.allclose(perturbed[:2], clean[:2])  # the swaps do change levels 0 and 1
    assert torch.isnan(model(x, swapped=swapped).sq_error[:2]).all()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dense_kernels", [False, True])
def test_cofiring_siblings_match_reference(seed, dense_kernels, monkeypatch):
    """Low thresholds and few parents make large groups of siblings firing together, the
    sibling-pair path of the PC loss, and many swapped children."""
    monkeypatch.setattr(sparse_ops, "DENSE_CUTOFF", 0.0 if dense_kernels else 1.1)
    gen = torch.Generator().manual_seed(100 + seed)
    cfg = HSAEConfig(d_model=6, level_sizes=(7, 23), target_l0=2, bandwidth=0.3, seed=seed)
    model = HSAE(cfg).double()
    with torch.no_grad():
        for lv in model.levels:
            lv.W_dec.mul_(1 + torch.rand(lv.W_dec.shape[0], 1, generator=gen, dtype=torch.float64))
            lv.threshold.fill_(0.05)
    parent_of = torch.randint(0, 3, (23,), generator=gen)  # few parents: big sibling groups
    parent_of[::5] = -1
    model.forest = Forest((7, 23), [parent_of])
    swapped = [torch.tensor([True, False, True, False, False, True, False])
               & model.forest.has_children(0)]
    x = torch.randn(17, 6, generator=gen, dtype=torch.float64)
    lambdas = torch.tensor([0.2, 0.3], dtype=torch.float64)

    out = model(x, swapped=swapped)
    fast = HSAE.total_loss(out, lambdas, rho=0.9)
    pc_fast = out.pc.sum()
    g_fast = torch.autograd.grad(fast, list(model.parameters()))
    ref = dense_hsae_loss(model, x, model.forest, swapped, lambdas, rho=0.9)
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    ap, _ = dense_level(model.levels[0], x)
    ac, _ = dense_level(model.levels[1], x)
    pc_ref = dense_pc_loss(ap, ac, model.levels[0].W_dec, model.levels[1].W_dec, parent_of)
    assert rel_err(pc_fast.detach(), pc_ref.detach()) < 1e-10
    assert rel_err(fast.detach(), ref.detach()) < 1e-10
    for a, b in zip(g_fast, g_ref):
        assert rel_err(a, b) < 1e-6 or (a.abs().max() == 0 and b.abs().max() == 0)
    # the sibling path is really exercised
    from hsae_core.model.coupling import _PCIndex
    idx = _PCIndex.build(out.codes[0].pattern, out.codes[1].pattern, parent_of,
                         model.forest.links(0))
    assert idx.sib_a.numel() > 10


def test_pc_loss_never_builds_batch_by_parents_by_d(monkeypatch):
    """At the paper's shapes a [B, n_parents, d] tensor would not fit; the fast path's largest
    intermediate stays O(nnz) or O(n_children * d)."""
    gen = torch.Generator().manual_seed(0)
    from hsae_core.model.jumprelu import JumpReLULevel
    d, B = 64, 256
    lp, lc = JumpReLULevel(d, 2048, 0.01, gen), JumpReLULevel(d, 4096, 0.01, gen)
    x = torch.randn(B, d, generator=gen) * 4
    for lv in (lp, lc):
        lv.init_thresholds_(x, 20)
    parent_of = torch.randint(0, 2048, (4096,), generator=gen)
    forest = Forest((2048, 4096), [parent_of])
    biggest = []
    orig_empty = torch.Tensor.new_zeros

    def spy(self, *size, **kw):
        out = orig_empty(self, *size, **kw)
        biggest.append(out.numel())
        return out
    monkeypatch.setattr(torch.Tensor, "new_zeros", spy)
    loss = pc_loss(lp.encode(x), lc.encode(x), lp.W_dec, lc.W_dec, parent_of)
    loss.backward()
    assert max(biggest) < B * 2048 * d / 50


def test_merged_decode_reads_packed_and_unpacked_decoders_alike(monkeypatch):
    """The merged path reads the decoders as one table: a view when HSAE.pack_decoders_ put
    them in one buffer (with spare rows for the output gradient), a copy otherwise."""
    from hsae_core.model.coupled_decode import stacked_decoders
    monkeypatch.setattr(sparse_ops, "DENSE_CUTOFF", 1.1)
    results = []
    for packed in (True, False):
        model, gen = random_model(3)  # .double() gave every parameter its own storage
        x = torch.randn(11, 5, generator=gen, dtype=torch.float64)
        swapped = [(torch.rand(n, generator=gen) < 0.5) & model.forest.has_children(l)
                   for l, n in enumerate(model.cfg.level_sizes[:-1])]
        ws = [lv.W_dec for lv in model.levels]
        if packed:
            model(x, swapped=swapped)  # the training forward packs, with a slot of L * batch rows
            assert stacked_decoders(ws, slot_rows=3 * 11) is not None
        else:
            monkeypatch.setattr(HSAE, "_ensure_packed", lambda self, batch: None)
            assert stacked_decoders(ws) is None
        out = model(x, swapped=swapped)
        loss = HSAE.total_loss(out, torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64), 0.7)
        results.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    (la, ga), (lb, gb) = results
    assert rel_err(la, lb) < 1e-12
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < 1e-12 or (a.abs().max() == 0 and b.abs().max() == 0)


def test_trainer_packs_decoders_and_repacking_keeps_the_parameters():
    from hsae_core.model.coupled_decode import stacked_decoders
    from hsae_core.model.trainer import Trainer
    t = Trainer(HSAEConfig(d_model=8, level_sizes=(4, 8, 16), batch_size=32, target_l0=2, seed=0))
    ws = [lv.W_dec for lv in t.model.levels]
    table = stacked_decoders(ws, slot_rows=3 * 32)
    assert table is not None and table.shape == (4 + 8 + 16 + 96, 8)
    before = [w.detach().clone() for w in ws]
    t.model.pack_decoders_(slot_rows=5)
    assert all(a is b for a, b in zip(ws, [lv.W_dec for lv in t.model.levels]))  # same objects
    assert all(torch.equal(a, b) for a, b in zip(before, ws))
    assert {id(p) for g in t.optimizer.param_groups for p in g["params"]} >= {id(w) for w in ws}


@pytest.mark.parametrize("dense_kernels", [False, True])
def test_all_pairs_at_once_trains_bit_for_bit_as_pair_by_pair(dense_kernels, monkeypatch):
    """Issue 23: the training forward builds every level pair's index lists in one pass
    (pair_index.py) instead of pair by pair; loss and every gradient are the same bits."""
    from hsae_core.model import pair_index
    monkeypatch.setattr(sparse_ops, "DENSE_CUTOFF", 0.0 if dense_kernels else 1.1)
    results = []
    for batched in (True, False):
        monkeypatch.setattr(pair_index, "BATCHED", batched)
        model, gen = random_model(5, sizes=(12, 24, 48, 96), d=8, bandwidth=0.3)
        model = model.float()
        x = torch.randn(40, 8, generator=gen) * 2
        swapped = [(torch.rand(n, generator=gen) < 0.5) & model.forest.has_children(l)
                   for l, n in enumerate(model.cfg.level_sizes[:-1])]
        out = model(x, swapped=swapped)
        loss = HSAE.total_loss(out, torch.tensor([0.3, 0.2, 0.1, 0.05]), 0.7)
        results.append((loss.detach(), out.pc.detach(),
                        torch.autograd.grad(loss, list(model.parameters()))))
    (la, pa, ga), (lb, pb, gb) = results
    assert bool((pa > 0).all())  # every pair's PC loss is computed
    assert torch.equal(la, lb) and torch.equal(pa, pb)
    for a, b in zip(ga, gb):
        assert torch.equal(a, b)
