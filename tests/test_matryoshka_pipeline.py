"""The Matryoshka arm in the pipeline (issue 26): its groups and prefixes saved as levels give
exactly the model's codes and prefix reconstructions; compute-metrics scores it with its groups'
L0 and hierarchy and its prefixes' FVE, and pairs it with the other two arms; its params section
is checked like every other; a killed run resumes to the same model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hsae_core.common.errors import ConfigError
from hsae_core.data.config import ExtractConfig
from hsae_core.data.extract import extract_activations
from hsae_core.data.normalize import estimate_normalization
from hsae_core.evaluation.compute import MetricsConfig, compute_metrics, format_table, headline
from hsae_core.evaluation.evaluate import count_model, replicate_metrics
from hsae_core.model.config import HSAEConfig
from hsae_core.model.matryoshka import MatryoshkaConfig, MatryoshkaTrainer
from hsae_core.model.posthoc import posthoc_forest
from hsae_core.pipeline.io import load_hsae, load_training
from hsae_core.pipeline.matryoshka_run import (
    MatryoshkaParams,
    matryoshka_config,
    save_matryoshka,
    train_matryoshka_on_store,
)
from hsae_core.pipeline.params import section_config
from hsae_core.pipeline.train_run import TrainRunConfig, curve_rows
from tests.pipeline_helpers import micro_assets, micro_params

D, GROUPS = 16, (8, 16, 32)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """The micro store of the pipeline tests (a tiny Llama's activations, d = 64)."""
    root = tmp_path_factory.mktemp("matryoshka")
    cfg = ExtractConfig(**micro_params(*micro_assets(root / "assets"))["extract"])
    info = extract_activations(cfg, root / "act.zarr", progress=False)
    norm = estimate_normalization(info)
    norm.save(root / "norm.json")
    return info, norm.scale


def trained(steps: int = 30, seed: int = 0) -> MatryoshkaTrainer:
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(40, D, generator=gen)
    cfg = MatryoshkaConfig(d_model=D, group_sizes=GROUPS, k=6.0, batch_size=64,
                           total_steps=steps, lr=3e-3, dead_window_tokens=0, seed=seed)
    trainer = MatryoshkaTrainer(cfg)

    def batches():
        while True:
            codes = torch.rand(64, 40, generator=gen) * (torch.rand(64, 40, generator=gen) < 0.1)
            yield codes @ basis

    trainer.fit(batches())
    return trainer


def sae_config() -> HSAEConfig:
    return HSAEConfig(d_model=D, level_sizes=GROUPS, target_l0=2.0, batch_size=64,
                      total_steps=30)


def test_saved_groups_and_prefixes_are_the_model(tmp_path):
    trainer = trained()
    model = trainer.model
    dead = trainer.firing.dead(64 * 30)[0]
    records = save_matryoshka(model, sae_config(), tmp_path, dead, 64 * 30, trainer.step)
    groups, prefixes = load_hsae(tmp_path / "groups"), load_hsae(tmp_path / "prefixes")
    assert groups.cfg.level_sizes == GROUPS and prefixes.cfg.level_sizes == (8, 24, 56)
    assert groups.forest.is_empty() and prefixes.forest.is_empty()
    x = torch.randn(50, D, dtype=torch.float64)
    model = model.double()
    codes = model.encode(x)  # dense [50, 56] at the inference threshold
    recons = model.decode(codes)
    for g, (lo, hi) in enumerate(model.groups()):
        lv = groups.levels[g].double()
        code = lv.encode(x)
        mine = torch.zeros(50, hi - lo, dtype=torch.float64)
        mine[code.pattern.rows, code.pattern.cols] = code.vals
        torch.testing.assert_close(mine, codes[:, lo:hi], rtol=1e-6, atol=1e-6)
        pv = prefixes.levels[g].double()
        torch.testing.assert_close(pv.decode(pv.encode(x)), recons[g], rtol=1e-6, atol=1e-6)
    assert records["prefixes"]["dead_frac_train"][-1] == pytest.approx(float(dead.double().mean()))
    assert load_training(tmp_path / "groups")["threshold"] == pytest.approx(float(model.threshold))


def test_compute_metrics_scores_groups_with_prefix_fve_and_pairs_three_arms(tmp_path):
    trainer = trained()
    save_matryoshka(trainer.model, sae_config(), tmp_path, trainer.firing.dead(1)[0], 1, 30)
    groups, prefixes = load_hsae(tmp_path / "groups"), load_hsae(tmp_path / "prefixes")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(400, D, generator=gen) * 2
    groups.forest = posthoc_forest(groups, "encoder", 0.2, "partial", None, None)
    other = load_hsae(tmp_path / "groups")  # stands for the HSAE and the baseline
    other.forest = groups.forest

    class Store:  # compute_metrics reads eval batches through eval_batches(store, ...)
        pass

    import hsae_core.evaluation.compute as compute

    def batches(store, scale, cfg):
        for i in range(0, 400, 100):
            yield x[i:i + 100]

    original = compute.eval_batches
    compute.eval_batches = batches
    original_labels = compute.eval_labels
    compute.eval_labels = lambda store, docs: (None, 0)
    try:
        cfg = MetricsConfig(lm_loss_tokens=0, bootstrap=20, batch_size=100)
        metrics = compute_metrics({"hsae": other, "posthoc": other, "matryoshka": groups},
                                  Store(), 1.0, cfg, prefixes={"matryoshka": prefixes})
    finally:
        compute.eval_batches, compute.eval_labels = original, original_labels
    want_prefix = replicate_metrics(count_model(prefixes, (x[i:i + 100] for i in
                                                            range(0, 400, 100))), cfg.boot)
    want_groups = replicate_metrics(count_model(groups, (x[i:i + 100] for i in
                                                         range(0, 400, 100))), cfg.boot)
    mat = metrics["matryoshka"]
    for g in range(3):
        assert mat[f"level{g}"]["fve"] == pytest.approx(float(want_prefix[f"level{g}/fve"][0]))
        assert mat[f"level{g}"]["l0"] == pytest.approx(float(want_groups[f"level{g}/l0"][0]))
    assert mat["mean"]["fve"] == pytest.approx(float(want_prefix["mean/fve"][0]))
    assert mat["mean"]["hamming"] == pytest.approx(float(want_groups["mean/hamming"][0]))
    # prefix FVE differs from the group-alone FVE the levels would give
    assert mat["level2"]["fve"] != pytest.approx(float(want_groups["level2/fve"][0]))
    for diff, (a, b) in (("diff", ("hsae", "posthoc")),
                         ("diff_matryoshka", ("hsae", "matryoshka")),
                         ("diff_matryoshka_posthoc", ("matryoshka", "posthoc"))):
        for key in ("hamming", "fve", "l0"):
            assert metrics[diff][key] == pytest.approx(
                metrics[a]["mean"][key] - metrics[b]["mean"][key], abs=1e-12)
            assert metrics[diff][f"{key}_lo"] <= metrics[diff][f"{key}_hi"]
    head = headline(metrics)
    assert set(head) == {"hsae", "posthoc", "matryoshka", "delta", "delta_matryoshka"}
    assert head["delta_matryoshka"]["fve"] == metrics["diff_matryoshka"]["fve"]
    table = format_table(metrics)
    assert "| metric | hsae | posthoc | matryoshka | hsae - posthoc | hsae - matryoshka |" in table
    assert math.isfinite(mat["pair1"]["p_pc"])


def test_params_section_is_checked_and_matched_to_sae():
    sae = sae_config()
    arm = section_config({"matryoshka": {"lr": 1e-3}}, "matryoshka", MatryoshkaParams)
    cfg = matryoshka_config(sae, arm)
    assert cfg.group_sizes == GROUPS and cfg.k == 3 * 2.0 and cfg.lr == 1e-3
    assert cfg.batch_size == sae.batch_size and cfg.total_steps == sae.total_steps
    with pytest.raises(ConfigError, match=r"matryoshka\.lr"):
        section_config({"matryoshka": {"lr": -1}}, "matryoshka", MatryoshkaParams)
    with pytest.raises(ConfigError, match=r"matryoshka\.lrr"):
        section_config({"matryoshka": {"lrr": 1}}, "matryoshka", MatryoshkaParams)


def test_killed_run_resumes_to_the_same_model(tmp_path, small_store):
    store, scale = small_store
    sae = HSAEConfig(d_model=store.d_model, level_sizes=(8, 16), target_l0=2.0, batch_size=32,
                     total_steps=12, dead_window_tokens=0)
    cfg = matryoshka_config(sae, MatryoshkaParams(lr=3e-3))
    run = TrainRunConfig(checkpoint_every=4, log_every=2)
    straight = train_matryoshka_on_store(cfg, store, scale, checkpoint=tmp_path / "a.pt",
                                         curves=tmp_path / "a", run=run)

    class Killed(Exception):
        pass

    import hsae_core.pipeline.matryoshka_run as mr

    original = mr.MatryoshkaTrainer.train_step

    def step_then_maybe_die(self, x):
        out = original(self, x)
        if self.step == 10 and not getattr(step_then_maybe_die, "done", False):
            step_then_maybe_die.done = True
            raise Killed
        return out

    mr.MatryoshkaTrainer.train_step = step_then_maybe_die
    try:
        with pytest.raises(Killed):
            train_matryoshka_on_store(cfg, store, scale, checkpoint=tmp_path / "b.pt",
                                      curves=tmp_path / "b", run=run)
    finally:
        mr.MatryoshkaTrainer.train_step = original
    resumed = train_matryoshka_on_store(cfg, store, scale, checkpoint=tmp_path / "b.pt",
                                        curves=tmp_path / "b", run=run)
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
    rows_a, rows_b = curve_rows(tmp_path / "a", "matryoshka"), curve_rows(tmp_path / "b",
                                                                         "matryoshka")
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] == list(range(2, 13, 2))
    assert rows_b[-1]["prefix1/fve"] == pytest.approx(rows_a[-1]["prefix1/fve"])


def test_lr_benchmark_runs_at_toy_size(tmp_path, small_store):
    """benchmarks/matryoshka_lr.py (the sweep behind matryoshka.lr) on the micro store."""
    import importlib.util
    import yaml

    from tests.pipeline_helpers import REPO

    spec = importlib.util.spec_from_file_location("matryoshka_lr",
                                                  REPO / "benchmarks" / "matryoshka_lr.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    store, _ = small_store
    params = micro_params(*micro_assets(tmp_path / "assets"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rows = [bench.run(str(store.path), Path(store.path).parent / "norm.json",
                      tmp_path / "params.yaml", lr, 4) for lr in (1e-4, 3e-3)]
    for r in rows:
        assert r["steps"] == 4 and math.isfinite(r["objective"])
        assert r["objective"] == pytest.approx(sum(r[f"prefix{g}/mse"] for g in range(4)))
    assert rows[0]["lr"] == 1e-4 and rows[1]["lr"] == 3e-3


def test_forest_linking_benchmark_runs_at_toy_size(tmp_path, small_store):
    """benchmarks/forest_linking.py (the linking rule's diagnostic in docs/matryoshka.md) on
    a trained micro Matryoshka's groups: one row per similarity, the encoder row's forest the
    one build-posthoc-trees would build."""
    import importlib.util

    import yaml

    from hsae_core.model.posthoc import live_features
    from hsae_core.data.reader import TrainActivations
    from tests.pipeline_helpers import REPO

    spec = importlib.util.spec_from_file_location("forest_linking",
                                                  REPO / "benchmarks" / "forest_linking.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    store, scale = small_store
    params = micro_params(*micro_assets(tmp_path / "assets"))
    params["posthoc"] = {"coactivation_tokens": 640}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sae = HSAEConfig(d_model=store.d_model, level_sizes=(8, 16, 32), target_l0=2.0,
                     batch_size=64, total_steps=10, dead_window_tokens=0)
    trainer = train_matryoshka_on_store(matryoshka_config(sae, MatryoshkaParams(lr=3e-3)),
                                        store, scale, checkpoint=tmp_path / "c.pt",
                                        curves=tmp_path / "curves")
    save_matryoshka(trainer.model, sae, tmp_path / "m", trainer.firing.dead(640)[0], 640, 10)
    norm = Path(store.path).parent / "norm.json"
    rows = bench.link_table(str(tmp_path / "m" / "groups"), str(store.path), norm,
                            tmp_path / "params.yaml", 400)
    assert [r["similarity"] for r in rows] == ["encoder", "decoder", "coactivation"]
    for r in rows:
        assert 0 <= r["p_pc"] <= 1 and 0 <= r["parent_rate"] <= 1 and r["hamming"] >= 0
    groups = load_hsae(tmp_path / "m" / "groups")
    live = live_features(groups, TrainActivations(store, norm, batch_size=64, seed=1,
                                                  epochs=None, max_tokens=10 * 64))
    want = posthoc_forest(groups, "encoder", 0.2, "partial", None, live)
    assert rows[0]["children_assigned"] == [want.n_assigned(l) for l in range(2)]
