"""The Matryoshka BatchTopK SAE (issue 26's third arm, hsae_core/model/matryoshka.py) against
slow, obvious twins (explicit loops in float64), and trained on a stream with planted nested
structure (tests/synthetic.py, every node of a root-to-leaf path active)."""

from __future__ import annotations

import io

import pytest
import torch

from hsae_core.common.errors import ConfigError
from hsae_core.model import sparse_ops
from hsae_core.model.config import HSAEConfig
from hsae_core.model.matryoshka import (
    MatryoshkaConfig,
    MatryoshkaSAE,
    MatryoshkaTrainer,
    batch_topk_mask,
)
from tests.synthetic import SyntheticForest

# roots -> mids -> leaves: 8 / 24 / 72 nodes, each path adds every node's own direction
SYN = SyntheticForest.make(d=32, branching=(3, 3), n_roots=8, paths_per_token=2, seed=0,
                           leaf_only=False)


def small_model(k=2.5, groups=(4, 8, 16), d=8, seed=3) -> MatryoshkaSAE:
    """A float64 model with every parameter random (biases included), so each term counts."""
    model = MatryoshkaSAE(MatryoshkaConfig(d_model=d, group_sizes=groups, k=k, batch_size=12,
                                           seed=seed)).double()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
        model.normalize_decoder_()
        model.b_enc += 0.3  # enough positive pre-activations for BatchTopK to choose from
    return model


def slow_preacts(model, x) -> list[list[float]]:
    """ReLU((x - b_dec) W_enc^T + b_enc), one dot product at a time."""
    w, b, c = (t.detach().tolist() for t in (model.W_enc, model.b_enc, model.b_dec))
    return [[max(0.0, sum((xb[j] - c[j]) * w[i][j] for j in range(len(c))) + b[i])
             for i in range(len(b))] for xb in x.tolist()]


def slow_batch_topk(pre: list[list[float]], k: float) -> set[tuple[int, int]]:
    """The round(k B) largest entries of the whole batch, positive ones only."""
    entries = sorted(((v, r, i) for r, row in enumerate(pre) for i, v in enumerate(row)),
                     reverse=True)
    return {(r, i) for v, r, i in entries[:round(k * len(pre))] if v > 0}


def slow_prefix_mse(model, x, chosen) -> list[float]:
    """Per prefix: mean over tokens of ||x - (b_dec + sum of the prefix's chosen a_i d_i)||^2."""
    pre = slow_preacts(model, x)
    w_dec, b_dec = model.W_dec.detach().tolist(), model.b_dec.detach().tolist()
    out = []
    for m in model.cfg.prefix_sizes:
        total = 0.0
        for r, xb in enumerate(x.tolist()):
            recon = list(b_dec)
            for i in range(m):
                if (r, i) in chosen:
                    recon = [recon[j] + pre[r][i] * w_dec[i][j] for j in range(len(recon))]
            total += sum((xb[j] - recon[j]) ** 2 for j in range(len(recon)))
        out.append(total / len(pre))
    return out


def dense_loss(model, x, mask, weights) -> torch.Tensor:
    """The weighted prefix losses through plain dense autograd, the selection given."""
    f = torch.relu((x - model.b_dec) @ model.W_enc.t() + model.b_enc) * mask
    loss = 0
    for w, m in zip(weights, model.cfg.prefix_sizes):
        recon = f[:, :m] @ model.W_dec[:m] + model.b_dec
        loss = loss + w * (x - recon).pow(2).sum(1).mean()
    return loss


# ---------------------------------------------------------------------------- selection, losses
def test_batch_topk_selects_the_batchs_largest_entries_not_k_per_token():
    model = small_model(k=2.5)
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = slow_batch_topk(slow_preacts(model, x), 2.5)
    out = model(x)
    got = set(zip(out.code.pattern.rows.tolist(), out.code.pattern.cols.tolist()))
    assert got == want and len(got) == 30  # round(2.5 * 12), every one of them positive
    per_token = torch.bincount(out.code.pattern.rows, minlength=12)
    assert len(set(per_token.tolist())) > 1  # a batch budget, not k per token
    assert float(out.code.l0) == 2.5
    assert torch.equal(batch_topk_mask(model.preacts(x), 2.5), model.encode(x, True) > 0)


@pytest.mark.parametrize("dense_kernels", [False, True])
def test_prefix_losses_and_gradients_match_slow_reference(monkeypatch, dense_kernels):
    monkeypatch.setattr(sparse_ops, "DENSE_CUTOFF", 0.0 if dense_kernels else 1.1)
    model = small_model(k=2.5)
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    chosen = slow_batch_topk(slow_preacts(model, x), 2.5)
    out = model(x)
    assert out.mse.tolist() == pytest.approx(slow_prefix_mse(model, x, chosen), rel=1e-10)
    assert len(set(out.mse.tolist())) == 3  # three distinct prefixes, each with its latents
    for recon, dense in zip(out.recons, model.decode(model.encode(x, batch_topk=True))):
        assert torch.allclose(recon, dense, atol=1e-12)
    counts = [sum(lo <= i < hi for _, i in chosen) / 12 for lo, hi in model.groups()]
    assert out.group_l0.tolist() == pytest.approx(counts)

    weights = (1.0, 0.5, 2.0)
    (torch.tensor(weights, dtype=torch.float64) * out.mse).sum().backward()
    fast = [p.grad.clone() for p in (model.W_enc, model.b_enc, model.b_dec, model.W_dec)]
    model.zero_grad()
    mask = torch.zeros(12, 28, dtype=torch.float64)
    for r, i in chosen:
        mask[r, i] = 1.0
    dense_loss(model, x, mask, weights).backward()
    slow = [p.grad for p in (model.W_enc, model.b_enc, model.b_dec, model.W_dec)]
    for name, a, b in zip(("W_enc", "b_enc", "b_dec", "W_dec"), fast, slow):
        assert torch.allclose(a, b, atol=1e-10), name


def slow_aux(model, x, recon, dead, k_aux) -> float:
    """Per token, the top min(k_aux, n_dead) dead activations decode (no bias) the residual;
    summed squared error over the residual's summed variance."""
    pre = slow_preacts(model, x)
    w_dec = model.W_dec.detach().tolist()
    res = (x - recon).tolist()
    dead_ids = [i for i, dd in enumerate(dead.tolist()) if dd]
    kk = min(k_aux, len(dead_ids))
    err = 0.0
    for r in range(len(res)):
        top = sorted(((pre[r][i], i) for i in dead_ids), reverse=True)[:kk]
        rec = [sum(v * w_dec[i][j] for v, i in top) for j in range(len(res[r]))]
        err += sum((res[r][j] - rec[j]) ** 2 for j in range(len(rec)))
    mean = [sum(row[j] for row in res) / len(res) for j in range(len(res[0]))]
    var = sum((row[j] - mean[j]) ** 2 for row in res for j in range(len(mean)))
    return err / var


def test_aux_loss_uses_dead_latents_only_and_matches_slow_reference():
    model = small_model(k=2.5)
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    recon = model(x).recons[-1].detach()
    dead = torch.zeros(28, dtype=torch.bool)
    dead[[1, 5, 9, 17, 20, 27]] = True
    aux = model.aux_loss(x, recon, dead, aux_k=3)
    assert float(aux.detach()) == pytest.approx(slow_aux(model, x, recon, dead, 3), rel=1e-10)
    aux.backward()
    for p in (model.W_enc, model.W_dec, model.b_enc):
        assert float(p.grad[~dead].abs().max()) == 0.0  # live latents get nothing
        assert float(p.grad[dead].abs().max()) > 0
    with torch.no_grad():  # moving every live latent leaves the loss where it was
        model.W_enc[~dead] += 1.0
        model.W_dec[~dead] *= -1.0
        model.b_enc[~dead] += 5.0
    with torch.no_grad():
        assert float(model.aux_loss(x, recon, dead, 3)) == pytest.approx(float(aux), rel=1e-12)
        assert float(model.aux_loss(x, recon, torch.zeros(28, dtype=torch.bool), 3)) == 0.0


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("change,field,says", [
    (dict(group_sizes=()), "group_sizes", "non-empty list of positive integers"),
    (dict(group_sizes=(8, 0)), "group_sizes", "non-empty list of positive integers"),
    (dict(group_sizes=(8.5, 16)), "group_sizes", "a list of integers"),
    (dict(k=0), "k", "0 < k < the dictionary size (28)"),
    (dict(k=28), "k", "0 < k < the dictionary size (28)"),
    (dict(k=True), "k", "true/false is not a number"),
    (dict(k=0.01, batch_size=64), "k", "k * batch_size >= 1"),
    (dict(prefix_weights=(1.0, 1.0)), "prefix_weights", "3 non-negative numbers"),
    (dict(prefix_weights=(0, 0, 0)), "prefix_weights", "not all 0"),
    (dict(aux_k=-1), "aux_k", ">= 0"),
    (dict(threshold_momentum=1.0), "threshold_momentum", "in [0, 1)"),
    (dict(threshold_start_frac=1.0), "threshold_start_frac", "in [0, 1)"),
    (dict(grad_clip=-1.0), "grad_clip", ">= 0"),
    (dict(device="gpu"), "device", "cpu, cuda"),
])
def test_config_errors_name_the_field_the_value_and_what_is_allowed(change, field, says):
    base = dict(d_model=8, group_sizes=(4, 8, 16), k=2.0, batch_size=16)
    with pytest.raises(ConfigError) as err:
        MatryoshkaConfig(**{**base, **change})
    assert err.value.field == field
    assert f"MatryoshkaConfig.{field} = " in str(err.value) and says in str(err.value)


def test_config_from_hsae_matches_the_total_l0_and_round_trips():
    hsae = HSAEConfig(d_model=576, level_sizes=(512, 1024, 2048, 4096), target_l0=12.5,
                      batch_size=1024, total_steps=1000, dead_window_tokens=200_000, seed=4)
    cfg = MatryoshkaConfig.from_hsae(hsae, lr=1e-3)
    assert cfg.prefix_sizes == (512, 1536, 3584, 7680) and cfg.n_latents == 7680
    assert cfg.k == 50.0  # the HSAE's four levels together: 4 x 12.5 per token
    assert (cfg.batch_size, cfg.total_steps, cfg.seed, cfg.lr) == (1024, 1000, 4, 1e-3)
    assert MatryoshkaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown field.*'kk'"):
        MatryoshkaConfig.from_dict({**cfg.to_dict(), "kk": 3})
    assert cfg.autocast_dtype is None
    assert MatryoshkaConfig.from_hsae(hsae.replace(autocast_dtype="bfloat16")).autocast_dtype \
        == "bfloat16"  # the arms train in one precision


def test_bfloat16_autocast_is_the_trainers_alone_and_leaves_the_fp32_path_unchanged():
    """Issue 23: the encoder matmul under autocast in training only; selection on its
    pre-activations, everything after it fp32; the saved model's levels evaluate in fp32."""
    x = next(SYN.batches(256, seed=5))
    kw = dict(d_model=32, group_sizes=SYN.sizes, k=6.0, batch_size=256, total_steps=20,
              lr=3e-3, threshold_start_frac=0.5, seed=2)
    fp32 = MatryoshkaTrainer(MatryoshkaConfig(**kw))
    bf16 = MatryoshkaTrainer(MatryoshkaConfig(**kw, autocast_dtype="bfloat16"))
    assert fp32.model.matmul_dtype is None and bf16.model.matmul_dtype == torch.bfloat16
    assert MatryoshkaSAE(bf16.cfg).matmul_dtype is None  # a model built to evaluate: fp32
    pre32, pre16 = fp32.model.preacts(x), bf16.model.preacts(x)
    assert pre16.dtype == torch.float32 and not torch.equal(pre32, pre16)
    assert torch.allclose(pre32, pre16, rtol=0.05, atol=0.05)  # bf16's 8 mantissa bits
    reference = ((x - fp32.model.b_dec) @ fp32.model.W_enc.t() + fp32.model.b_enc).clamp_min(0)
    assert torch.equal(pre32, reference)  # the fp32 path is the plain matmul
    bf16.fit(SYN.batches(256, seed=1))
    assert bf16.model.W_enc.dtype == torch.float32 and bf16.model.threshold.dtype == torch.float32
    assert all(lv.matmul_dtype is None for lv in bf16.model.group_levels())


# ----------------------------------------------------------------------------------- training
def train(prefix_weights=None, steps=300, seed=11):
    cfg = MatryoshkaConfig(d_model=32, group_sizes=SYN.sizes, k=6.0, batch_size=256,
                           total_steps=steps, lr=3e-3, dead_window_tokens=256 * 20,
                           threshold_momentum=0.9, threshold_start_frac=0.5, seed=seed,
                           prefix_weights=prefix_weights)
    records = []
    trainer = MatryoshkaTrainer(cfg, log_every=1, on_log=lambda step, r: records.append(r))
    trainer.fit(SYN.batches(256, seed=1))
    return trainer, records


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return train()


def test_training_reduces_loss_and_keeps_exactly_k_per_token_in_every_batch(trained):
    trainer, records = trained
    assert all(r["l0"] == 6.0 for r in records)  # BatchTopK: exactly 6 * 256 active each step
    first, last = records[0], records[-1]
    assert last["loss"] < 0.35 * first["loss"]
    fve = [last[f"prefix{g}/fve"] for g in range(3)]
    assert fve[0] < fve[1] < fve[2] and fve[2] > 0.85, fve
    assert sum(last[f"group{g}/l0"] for g in range(3)) == pytest.approx(6.0)
    norms = trainer.model.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_decoder_gradient_is_projected_orthogonal_to_the_rows_before_the_step():
    cfg = MatryoshkaConfig(d_model=32, group_sizes=(8, 24), k=4.0, batch_size=64,
                           total_steps=10, seed=2)
    trainer = MatryoshkaTrainer(cfg)
    w0 = trainer.model.W_dec.detach().clone()
    trainer.train_step(next(SYN.batches(64, seed=5)))
    m = trainer.optimizer.state[trainer.model.W_dec]["exp_avg"]  # (1 - beta1) * the gradient
    assert float((m * w0).sum(1).abs().max()) < 1e-6 * float(m.norm(dim=1).max())


def test_nested_prefixes_put_the_planted_roots_in_the_first_group(trained):
    """The first group must reconstruct alone, so it takes the most shared directions (the
    roots); trained on the last prefix only, the same 8 latents are arbitrary."""
    control, _ = train(prefix_weights=(0.0, 0.0, 1.0))
    x, _ = SYN.sample(2048, torch.Generator().manual_seed(99))

    @torch.no_grad()
    def first_group(model):
        roots = SYN.directions[0] @ model.W_dec[:8].detach().t()  # [8 roots, 8 latents]
        fve0 = 1 - (x - model.decode(model.encode(x))[0]).pow(2).sum() / (
            x - x.mean(0)).pow(2).sum()
        return float(roots.max(1).values.mean()), float(fve0)

    (cos_m, fve_m), (cos_c, fve_c) = first_group(trained[0].model), first_group(control.model)
    assert cos_m > cos_c + 0.15 and fve_m > fve_c + 0.3, (cos_m, cos_c, fve_m, fve_c)


def test_inference_threshold_reproduces_training_sparsity_on_held_out_tokens(trained):
    model = trained[0].model
    assert float(model.threshold) > 0
    x, _ = SYN.sample(4096, torch.Generator().manual_seed(123))  # never trained on
    inference = model.encode(x) > 0
    assert float(inference.sum(1).double().mean()) == pytest.approx(6.0, rel=0.05)
    batch = model.encode(x, batch_topk=True) > 0
    assert float((inference & batch).sum() / (inference | batch).sum()) > 0.95


def test_groups_and_prefixes_as_jumprelu_levels_reproduce_the_model(trained):
    model = trained[0].model
    x, _ = SYN.sample(1024, torch.Generator().manual_seed(7))
    codes = model.encode(x)
    groups = [lv.encode(x).dense() for lv in model.group_levels()]
    assert torch.allclose(torch.cat(groups, 1), codes, atol=1e-5)
    assert [(g > 0).sum() for g in groups] == [(codes[:, lo:hi] > 0).sum()
                                              for lo, hi in model.groups()]
    with torch.no_grad():
        for lv, want in zip(model.prefix_levels(), model.decode(codes)):
            assert torch.allclose(lv.decode(lv.encode(x)), want, atol=1e-4)
    with pytest.raises(RuntimeError, match="threshold is not estimated"):
        MatryoshkaSAE(model.cfg).encode(x)


def test_interrupted_and_resumed_run_is_bit_identical():
    cfg = MatryoshkaConfig(d_model=32, group_sizes=(8, 24), k=4.0, batch_size=64,
                           total_steps=30, lr=3e-3, dead_window_tokens=64 * 5, seed=2,
                           threshold_start_frac=0.3)
    straight = MatryoshkaTrainer(cfg).fit(SYN.batches(64, seed=5))
    first = MatryoshkaTrainer(cfg.replace(total_steps=30))
    for x in SYN.batches(64, seed=5):
        first.train_step(x)
        if first.step == 13:
            break
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = MatryoshkaTrainer(cfg)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    model = resumed.fit(SYN.batches(64, seed=5))
    for (name, a), b in zip(straight.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
