"""The core on a CUDA device (issue 17): the fast coupled decode, PC loss and swaps against the
dense float64 reference computed on the same device (§3.1-3.2), the STE threshold gradient,
bf16 autocast, save/load and checkpoint/resume equality. (What the step's host synchronisations
are: tests/test_sync_count.py.)

Marked ``cuda``: ``pytest -m cuda tests/test_cuda.py`` selects them; without CUDA they skip.
``HSAE_TEST_DEVICE=cpu`` runs them on the CPU instead (``benchmarks/gpu_check.py --device cpu``
does, in CI, so they cannot rot). Imports only torch, ``hsae_core.model``/``common`` and the
dense reference: a GPU machine without zarr, dvc, pydantic or gguf runs them.
"""

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (resume)

import pytest  # noqa: E402
import torch  # noqa: E402

from hsae_core.common import fsio  # noqa: E402
from hsae_core.model import sparse_ops  # noqa: E402
from hsae_core.model.config import HSAEConfig  # noqa: E402
from hsae_core.model.coupling import _PCIndex  # noqa: E402
from hsae_core.model.forest import Forest  # noqa: E402
from hsae_core.model.hsae import HSAE  # noqa: E402
from hsae_core.model.jumprelu import JumpReLULevel  # noqa: E402
from hsae_core.model.trainer import Trainer  # noqa: E402
from tests.reference import dense_hsae_loss, dense_level, dense_pc_loss  # noqa: E402

DEVICE = os.environ.get("HSAE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE is None, reason="no CUDA device (HSAE_TEST_DEVICE=cpu "
                                                        "runs these on the CPU)")]


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def random_forest(sizes, gen, p_unassigned=0.3):
    parent_of = []
    for a, b in zip(sizes, sizes[1:]):
        p = torch.randint(0, a, (b,), generator=gen)
        p[torch.rand(b, generator=gen) < p_unassigned] = -1
        parent_of.append(p)
    return Forest(tuple(sizes), parent_of)


def random_model(seed, sizes=(6, 10, 16), d=5, dtype=torch.float64):
    """Random weights (decoders not unit norm, on purpose), thresholds and a random forest, on
    DEVICE; the decoders get packed on the device by the first training forward."""
    cfg = HSAEConfig(d_model=d, level_sizes=sizes, target_l0=3, bandwidth=0.5, seed=seed)
    model = HSAE(cfg).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lv in model.levels:
            for p, scale, shift in ((lv.W_enc, 1, 0), (lv.W_dec, 1, 0), (lv.b_enc, 0.3, 0),
                                    (lv.b_dec, 0.3, 0)):
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64) + shift)
            lv.threshold.copy_(0.2 + torch.rand(lv.threshold.shape, generator=gen,
                                                dtype=torch.float64))
    model.forest = random_forest(sizes, gen)
    return model.to(DEVICE), gen


def swaps(model, gen):
    return [((torch.rand(n, generator=gen) < 0.5).to(DEVICE) & model.forest.has_children(l))
            for l, n in enumerate(model.cfg.level_sizes[:-1])]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dense_kernels", [False, True])
def test_coupled_decode_pc_and_swaps_match_dense_reference(seed, dense_kernels, monkeypatch):
    """Loss, PC loss per pair and every gradient of the fast path (merged sparse kernels, or
    every product dense) against the dense float64 twin, both on the device."""
    monkeypatch.setattr(sparse_ops, "DENSE_CUTOFF", 0.0 if dense_kernels else 1.1)
    model, gen = random_model(seed)
    x = (torch.randn(13, 5, generator=gen, dtype=torch.float64) * 2).to(DEVICE)
    swapped = swaps(model, gen)
    lambdas = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64, device=DEVICE)

    out = model(x, swapped=swapped)
    fast = HSAE.total_loss(out, lambdas, 0.7)
    fast.backward()
    g_fast = grads(model)
    model.zero_grad()
    ref = dense_hsae_loss(model, x, model.forest, swapped, lambdas, 0.7)
    ref.backward()
    g_ref = grads(model)

    assert fast.device.type == torch.device(DEVICE).type
    assert rel_err(fast.detach(), ref.detach()) < 1e-10
    acts = [dense_level(lv, x)[0] for lv in model.levels]
    for l in range(2):
        pc_ref = dense_pc_loss(acts[l], acts[l + 1], model.levels[l].W_dec,
                               model.levels[l + 1].W_dec, model.forest.parent_of[l])
        assert rel_err(out.pc[l].detach(), pc_ref.detach()) < 1e-10
    assert set(g_fast) == set(g_ref)
    for name in g_ref:
        assert rel_err(g_fast[name], g_ref[name]) < 1e-6, name
    assert any(g_ref[f"levels.{l}.threshold"].abs().sum() > 0 for l in range(3))
    assert any(bool(s.any()) for s in swapped)  # the perturbation really ran


@pytest.mark.parametrize("seed", range(2))
def test_cofiring_siblings_match_reference(seed):
    """Few parents and low thresholds: big groups of siblings firing together (the PC loss's
    sibling-pair path) and many swapped children."""
    gen = torch.Generator().manual_seed(100 + seed)
    cfg = HSAEConfig(d_model=6, level_sizes=(7, 23), target_l0=2, bandwidth=0.3, seed=seed)
    model = HSAE(cfg).double()
    with torch.no_grad():
        for lv in model.levels:
            lv.W_dec.mul_(1 + torch.rand(lv.W_dec.shape[0], 1, generator=gen,
                                         dtype=torch.float64))
            lv.threshold.fill_(0.05)
    parent_of = torch.randint(0, 3, (23,), generator=gen)
    parent_of[::5] = -1
    model.forest = Forest((7, 23), [parent_of])
    model = model.to(DEVICE)
    swapped = [torch.tensor([True, False, True, False, False, True, False], device=DEVICE)
               & model.forest.has_children(0)]
    x = torch.randn(17, 6, generator=gen, dtype=torch.float64).to(DEVICE)
    lambdas = torch.tensor([0.2, 0.3], dtype=torch.float64, device=DEVICE)

    out = model(x, swapped=swapped)
    fast = HSAE.total_loss(out, lambdas, rho=0.9)
    g_fast = torch.autograd.grad(fast, list(model.parameters()))
    ref = dense_hsae_loss(model, x, model.forest, swapped, lambdas, rho=0.9)
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    assert rel_err(fast.detach(), ref.detach()) < 1e-10
    for a, b in zip(g_fast, g_ref):
        assert rel_err(a, b) < 1e-6 or (a.abs().max() == 0 and b.abs().max() == 0)
    idx = _PCIndex.build(out.codes[0].pattern, out.codes[1].pattern, model.forest.parent_of[0],
                         model.forest.links(0))
    assert idx.sib_a.numel() > 10


def test_fp32_fast_path_tracks_the_float64_reference():
    """The dtype training uses: fp32 kernels on the device within fp32 rounding of float64."""
    model64, gen = random_model(7, sizes=(32, 64, 128), d=24)
    model32, _ = random_model(7, sizes=(32, 64, 128), d=24, dtype=torch.float32)
    x = torch.randn(64, 24, generator=gen, dtype=torch.float64).to(DEVICE)
    swapped = swaps(model64, gen)
    lambdas = torch.tensor([0.3, 0.2, 0.1], device=DEVICE)
    fast = HSAE.total_loss(model32(x.float(), swapped=swapped), lambdas, 0.7)
    g_fast = torch.autograd.grad(fast, list(model32.parameters()))
    ref = dense_hsae_loss(model64, x, model64.forest, swapped, lambdas.double(), 0.7)
    g_ref = torch.autograd.grad(ref, list(model64.parameters()))
    assert rel_err(fast.detach().double(), ref.detach()) < 1e-5
    for (name, _), a, b in zip(model64.named_parameters(), g_fast, g_ref):
        assert rel_err(a.double(), b) < 1e-3, name


def test_threshold_gradient_matches_the_straight_through_definition():
    """dL/dtheta_i = sum_b dL/da_bi (-theta_i / eps) 1[|z_bi - theta_i| < eps/2]
    + lambda (-1/eps) #{b: |z_bi - theta_i| < eps/2} / B (Rajamanoharan et al. 2024b)."""
    gen = torch.Generator().manual_seed(0)
    eps, lam = 0.4, 0.3
    lv = JumpReLULevel(6, 9, eps, gen).double()
    with torch.no_grad():
        lv.threshold.copy_(0.3 + torch.rand(9, generator=gen, dtype=torch.float64))
    lv = lv.to(DEVICE)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64).to(DEVICE)
    target = torch.randn(40, 6, generator=gen, dtype=torch.float64).to(DEVICE)
    code = lv.encode(x)
    loss = (lv.decode(code) - target).pow(2).sum() + lam * code.l0
    (g_theta,) = torch.autograd.grad(loss, [lv.threshold])
    with torch.no_grad():
        z = x @ lv.W_enc.t() + lv.b_enc
        a = z * (z > lv.threshold)
        dl_da = 2 * (a @ lv.W_dec + lv.b_dec - target) @ lv.W_dec.t()
        window = ((z - lv.threshold).abs() < eps / 2).double()
        expected = ((dl_da * (-lv.threshold / eps) * window).sum(0)
                    + lam * (-1 / eps) * window.sum(0) / 40)
    assert window.sum() > 0
    assert torch.allclose(g_theta, expected, rtol=1e-10, atol=1e-12)


def small_cfg(**kw):
    base = dict(d_model=16, level_sizes=(16, 32, 64), target_l0=3.0, batch_size=64,
                total_steps=24, update_interval=8, lr=3e-3, dead_window_tokens=64 * 6,
                bandwidth=0.05, swap_rate=0.2, rho=0.05, seed=7, device=DEVICE)
    base.update(kw)
    return HSAEConfig(**base)


def batches(n=24, seed=1):
    """Sparse sums of fixed directions (made on the CPU, then moved: the same on every run)."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(48, 16, generator=gen)
    out = []
    for _ in range(n):
        idx = torch.randint(0, 48, (64, 3), generator=gen)
        x = (dirs[idx] * torch.rand(64, 3, 1, generator=gen)).sum(1)
        out.append((x + 0.05 * torch.randn(64, 16, generator=gen)).to(DEVICE))
    return out


def test_bf16_autocast_trains_with_fp32_thresholds():
    data = batches(10)
    trainer = Trainer(small_cfg(total_steps=10, autocast_dtype="bfloat16"))
    model = trainer.fit(data)
    assert all(lv.threshold.dtype == torch.float32 for lv in model.levels)
    assert all(p.device.type == torch.device(DEVICE).type for p in model.parameters())
    lv = model.levels[2]
    with torch.no_grad():
        pre16 = lv.preacts(data[0])
        lv.matmul_dtype = None
        pre32 = lv.preacts(data[0])
    assert pre16.dtype == torch.float32 and rel_err(pre16, pre32) < 2e-2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_save_load_round_trip(tmp_path):
    """What ``pipeline.io`` saves (state dict, config, forest) reloads exactly, on the device
    and on the CPU."""
    model = Trainer(small_cfg(total_steps=20)).fit(batches(20))
    assert not model.forest.is_empty()
    fsio.save_torch({"model": model.state_dict(), "config": model.cfg.to_dict(),
                     "forest": model.forest.to_dict()}, tmp_path / "m.pt")
    for device in (DEVICE, "cpu"):
        saved = fsio.load_torch(tmp_path / "m.pt", map_location=device)
        loaded = HSAE(HSAEConfig.from_dict(saved["config"]).replace(device=device)).to(device)
        loaded.load_state_dict(saved["model"])
        loaded.forest = Forest.from_dict(saved["forest"]).to(device)
        assert loaded.cfg.replace(device=DEVICE) == model.cfg
        assert loaded.forest.equals(model.forest)
        for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert b.device.type == torch.device(device).type
            assert torch.equal(a.cpu(), b.cpu()), n
        x = batches(1, seed=9)[0].to(DEVICE)
        for l in range(3):  # bit-equal on the same device; the CPU's float kernels differ
            want, got = model.reconstruct(x, l).cpu(), loaded.reconstruct(x.to(device), l).cpu()
            if torch.device(device).type == torch.device(DEVICE).type:
                assert torch.equal(want, got)
            else:
                assert torch.allclose(want, got, rtol=1e-4, atol=1e-4)


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


def test_checkpoint_resume_matches_an_uninterrupted_run(tmp_path, deterministic):
    """Stopped at step 12 (after a hierarchy update, with swaps, ghost grads and the
    controller running), saved, loaded into a new trainer and finished: equal to an
    uninterrupted run, as equal as two uninterrupted runs are to each other (bit for bit on a
    deterministic device)."""
    cfg, data = small_cfg(), batches()
    straight = [Trainer(cfg).fit(data).state_dict() for _ in range(2)]
    first = Trainer(cfg)
    for x in data[:12]:
        first.train_step(x)
    assert first.n_updates == 1
    fsio.save_torch(first.state_dict(), tmp_path / "ckpt.pt")
    resumed = Trainer(cfg)
    resumed.load_state_dict(fsio.load_torch(tmp_path / "ckpt.pt", map_location=DEVICE))
    assert resumed.step == 12
    end = resumed.fit(data).state_dict()
    assert resumed.step == cfg.total_steps and resumed.n_updates == 2
    for name, a in straight[0].items():
        noise = float((a - straight[1][name]).abs().max())
        assert float((end[name] - a).abs().max()) <= 4 * noise, (name, noise)
