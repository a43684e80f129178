"""Trainer behaviour: resume equivalence, save/load, STE and decoder norms, schedules."""

import math

import pytest
import torch

from hsae_core.model.config import HSAEConfig
from hsae_core.model.finite import FiniteWatch
from hsae_core.model.hsae import HSAE
from hsae_core.model.jumprelu import JumpReLULevel
from hsae_core.model.trainer import Trainer, lr_at
from hsae_core.pipeline.checkpoint import Checkpoint
from hsae_core.pipeline.io import load_hsae, save_hsae
from tests.synthetic import SyntheticForest

SYN = SyntheticForest.make(d=16, branching=(2, 2), n_roots=4, seed=3)


def small_cfg(**kw):
    base = dict(d_model=16, level_sizes=SYN.sizes, target_l0=2.0, batch_size=64, total_steps=40,
                update_interval=10, lr=3e-3, dead_window_tokens=256, bandwidth=0.05, seed=7)
    base.update(kw)
    return HSAEConfig(**base)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("similarity,tree", [("encoder", "partial"), ("coactivation", "binary"),
                                             ("decoder", "fixed")])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, similarity, tree):
    cfg = small_cfg(similarity=similarity, tree=tree, coactivation_tokens=32)
    straight = Trainer(cfg).fit(SYN.batches(64, seed=1))

    ckpt = tmp_path / "ckpt.pt"

    def kill_at_23(step, record):
        if step == 23:
            raise Interrupt()
    first = Trainer(cfg, checkpoint_every=5, on_checkpoint=Checkpoint(ckpt).save, log_every=1,
                    on_log=kill_at_23)
    with pytest.raises(Interrupt):
        first.fit(SYN.batches(64, seed=1))
    assert torch.load(ckpt, weights_only=False)["step"] == 20  # work since step 20 is redone
    resumed_trainer = Trainer(cfg, checkpoint_every=5, on_checkpoint=Checkpoint(ckpt).save)
    assert Checkpoint(ckpt).resume(resumed_trainer) == 20
    resumed = resumed_trainer.fit(SYN.batches(64, seed=1))

    assert resumed_trainer.step == cfg.total_steps
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert straight.forest.equals(resumed.forest)
    assert not straight.forest.is_empty()


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    Trainer(small_cfg(total_steps=5), on_checkpoint=Checkpoint(ckpt).save).fit(SYN.batches(64))
    with pytest.raises(ValueError, match="different config.*rho"):
        Checkpoint(ckpt).resume(Trainer(small_cfg(total_steps=5, rho=0.5)))


def test_save_load_round_trip(tmp_path):
    model = Trainer(small_cfg(total_steps=25)).fit(SYN.batches(64))
    assert not model.forest.is_empty()
    save_hsae(model, tmp_path / "m")
    loaded = load_hsae(tmp_path / "m")
    assert loaded.cfg == model.cfg
    assert loaded.forest.equals(model.forest)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    x = next(SYN.batches(64, seed=9))
    for l in range(3):
        assert torch.equal(model.reconstruct(x, l), loaded.reconstruct(x, l))


def test_load_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.*model.safetensors"):
        load_hsae(tmp_path)


def test_decoder_rows_stay_unit_norm_and_thresholds_positive():
    trainer = Trainer(small_cfg(total_steps=15))
    model = trainer.fit(SYN.batches(64))
    for lv in model.levels:
        assert torch.allclose(lv.W_dec.norm(dim=1), torch.ones(lv.n_features), atol=1e-6)
        assert bool((lv.threshold > 0).all())


def test_threshold_gradient_matches_the_straight_through_definition():
    """dL/dtheta_i = sum_b dL/da_bi * (-theta_i / eps) * 1[|z_bi - theta_i| < eps/2]
    + lambda * (-1/eps) * #{b: |z_bi - theta_i| < eps/2} / B (Rajamanoharan et al. 2024b)."""
    gen = torch.Generator().manual_seed(0)
    eps, lam = 0.4, 0.3
    lv = JumpReLULevel(6, 9, eps, gen).double()
    with torch.no_grad():
        lv.threshold.copy_(0.3 + torch.rand(9, generator=gen, dtype=torch.float64))
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    target = torch.randn(40, 6, generator=gen, dtype=torch.float64)
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


def test_lr_schedule_warmup_then_cosine_to_zero():
    lrs = [lr_at(s, 100, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(100, 100, 1.0, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_bad_batch_shape_is_a_clear_error():
    trainer = Trainer(small_cfg())
    with pytest.raises(ValueError, match=r"batch of shape \(64, 8\).*\(64, 16\)"):
        trainer.train_step(torch.zeros(64, 8))


def test_data_running_out_is_a_clear_error():
    def three():
        yield from [torch.zeros(64, 16)] * 3
    with pytest.raises(RuntimeError, match="ran out after 3 of 40 steps"):
        Trainer(small_cfg()).fit(three())


def test_a_diverged_loss_names_its_step_and_is_never_checkpointed():
    """Issue 23: the loss's finiteness is read back every log_every steps and before every
    checkpoint (not every step: a host sync), and names the step it first failed at."""
    batches = [b.clone() for b, _ in zip(SYN.batches(64, seed=1), range(40))]
    batches[7][3, 2] = float("nan")
    saved = []
    t = Trainer(small_cfg(), log_every=5, checkpoint_every=2,
                on_checkpoint=lambda tr: saved.append(tr.step))
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 7; lower lr"):
        t.fit(batches)
    assert saved == [2, 4, 6] and t.step == 8  # step 8's checkpoint refused
    t = Trainer(small_cfg(), log_every=5)
    with pytest.raises(FloatingPointError, match=r"at step 7;"):
        for b in batches:
            t.train_step(b)
    assert t.step == 10  # read back at the next multiple of log_every


def test_a_failure_after_divergence_is_reported_as_the_divergence():
    watch = FiniteWatch("lower lr")
    watch.record(torch.tensor(1.0), 0)
    watch.check_from(RuntimeError("unrelated"))  # finite: nothing to add
    watch.record(torch.tensor(float("inf")), 1)
    watch.record(torch.tensor(float("nan")), 2)  # the first one is kept
    err = RuntimeError("a later step broke on NaN weights")
    with pytest.raises(FloatingPointError, match=r"loss became inf at step 1; lower lr") as e:
        watch.check_from(err)
    assert e.value.__cause__ is err


def test_a_loop_that_never_checks_is_checked_every_max_pending_losses():
    watch = FiniteWatch("lower lr")
    for step in range(FiniteWatch.MAX_PENDING - 2):
        watch.record(torch.tensor(1.0), step)
    watch.record(torch.tensor(float("nan")), FiniteWatch.MAX_PENDING - 2)  # not read back yet
    with pytest.raises(FloatingPointError, match=rf"at step {FiniteWatch.MAX_PENDING - 2};"):
        watch.record(torch.tensor(1.0), FiniteWatch.MAX_PENDING - 1)  # the cap: read back


def test_bfloat16_autocast_trains_with_fp32_thresholds():
    model = Trainer(small_cfg(total_steps=5, autocast_dtype="bfloat16")).fit(SYN.batches(64))
    assert all(lv.threshold.dtype == torch.float32 for lv in model.levels)
    assert all(lv.matmul_dtype == torch.bfloat16 for lv in model.levels)


def test_autocast_is_for_training_only_a_built_or_loaded_model_evaluates_in_fp32(tmp_path):
    """Issue 23: the config carries autocast_dtype into every saved model (the Matryoshka's
    groups inherit sae's), so a bf16 run evaluated every arm in bf16, the fp32-trained ones
    too; now only the Trainer sets it."""
    cfg = small_cfg(total_steps=3, autocast_dtype="bfloat16")
    assert all(lv.matmul_dtype is None for lv in HSAE(cfg).levels)
    model = Trainer(cfg).fit(SYN.batches(64))
    save_hsae(model, tmp_path / "m")
    loaded = load_hsae(tmp_path / "m")
    assert loaded.cfg.autocast_dtype == "bfloat16"
    assert all(lv.matmul_dtype is None for lv in loaded.levels)


def test_ghost_grads_reach_only_dead_features_encoders():
    """A feature that never fires gets encoder gradient only through ghost grads."""
    cfg = small_cfg(total_steps=3, dead_window_tokens=64, rho=0.0, swap_rate=0.0)
    trainer = Trainer(cfg)
    x = next(SYN.batches(64, seed=2))
    trainer.train_step(x)
    model = trainer.model
    lv = model.levels[2]
    with torch.no_grad():
        lv.threshold[0] = 1e6  # feature 0 can never fire
    dead = [torch.zeros(n, dtype=torch.bool) for n in cfg.level_sizes]
    dead[2][0] = True
    for with_ghost in (False, True):
        model.zero_grad()
        out = model(x, dead=dead if with_ghost else None)
        (out.mse.sum() + out.ghost).backward()
        g = lv.W_enc.grad[0].abs().sum()
        assert (g > 0) == with_ghost
    assert out.ghost > 0
