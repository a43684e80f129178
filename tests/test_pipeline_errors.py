"""Each pipeline stage stops on bad input with exit code 2 and a message naming the key or file
and the fix, before any heavy work (stages run in process through their Typer apps)."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from stages import (
    build_posthoc_trees,
    compute_metrics,
    extract_activations,
    normalize,
    train_baselines,
    train_hsae,
)
from tests.pipeline_helpers import micro_assets, micro_params

runner = CliRunner()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A micro project with its store, normalisation, a trained HSAE and post-hoc baseline."""
    root = tmp_path_factory.mktemp("errors")
    params = micro_params(*micro_assets(root / "assets"))
    params["sae"] |= {"total_steps": 10}
    params["metrics"] |= {"lm_loss_tokens": 0}
    write(root, params)
    paths = paths_of(root)
    for app, args in ((extract_activations.app, ["--out", paths["store"]]),
                      (normalize.app, ["--store", paths["store"], "--out", paths["norm"]]),
                      (train_hsae.app, train_args(paths, "hsae")),
                      (train_baselines.app, train_args(paths, "baseline")),
                      (build_posthoc_trees.app, posthoc_args(paths))):
        result = runner.invoke(app, ["--params", str(root / "params.yaml"), *args])
        assert result.exit_code == 0, result.output
    return root, params


def paths_of(root):
    return {k: str(root / v) for k, v in {"store": "act.zarr", "norm": "norm.json", "hsae": "hsae",
                                         "baseline": "baseline", "posthoc": "posthoc",
                                         "metrics": "metrics.json", "table": "table.md"}.items()}


def train_args(paths, name):
    out = paths.get(name, paths["hsae"] + "-" + name)
    return ["--store", paths["store"], "--normalization", paths["norm"], "--out", out,
            "--checkpoint", out + ".pt", "--curves", out + "-curves"]


def posthoc_args(paths):
    return ["--baseline", paths["baseline"], "--store", paths["store"], "--normalization",
            paths["norm"], "--out", paths["posthoc"]]


def metrics_args(paths):
    return ["--hsae", paths["hsae"], "--posthoc", paths["posthoc"], "--store", paths["store"],
            "--normalization", paths["norm"], "--out", paths["metrics"], "--table", paths["table"]]


def write(root, params):
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_with(root, params, app, args):
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    write(bad, params)
    return runner.invoke(app, ["--params", str(bad / "params.yaml"), *args])


def changed(params, section, **values):
    return {**params, section: params[section] | values}


def expect_error(result, *fragments):
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, text


def test_training_stages_name_the_bad_key(project):
    root, params = project
    paths = paths_of(root)
    for app, name in ((train_hsae.app, "hsae"), (train_baselines.app, "baseline")):
        args = train_args(paths, name + "-bad")
        expect_error(run_with(root, changed(params, "sae", lrr=1e-3), app, args), "sae.lrr",
                     "known keys")
        expect_error(run_with(root, changed(params, "sae", lr=-1.0), app, args), "sae.lr = -1.0",
                     "positive")
        expect_error(run_with(root, changed(params, "sae", level_sizes=[16, 8]), app, args),
                     "level_sizes", "strictly increasing")
        expect_error(run_with(root, changed(params, "sae", batch_size=10 ** 6), app, args),
                     "fewer than one batch", "sae.batch_size")
        expect_error(run_with(root, changed(params, "train", log_every=0), app, args),
                     "train.log_every = 0")
        expect_error(run_with(root, {**params, "trian": {}}, app, args),
                     "unknown top-level key(s) 'trian'", "did you mean 'train'")
        missing = ["--store", str(root / "nowhere.zarr")] + args[2:]
        expect_error(run_with(root, params, app, missing), "no activation store")
        no_norm = args[:2] + ["--normalization", str(root / "none.json")] + args[4:]
        expect_error(run_with(root, params, app, no_norm), "no normalisation file",
                     "stages.normalize")
    args = train_args(paths, "hsae-bad")
    expect_error(run_with(root, changed(params, "hierarchy", tree="oak"), train_hsae.app, args),
                 "hierarchy.tree = 'oak'", "one of")
    expect_error(run_with(root, changed(params, "hierarchy", rhoo=0.1), train_hsae.app, args),
                 "hierarchy.rhoo")


def test_posthoc_and_metrics_stages_name_the_bad_input(project):
    root, params = project
    paths = paths_of(root)
    args = posthoc_args(paths)
    expect_error(run_with(root, changed(params, "hierarchy", similarity="cosine"),
                          build_posthoc_trees.app, args),
                 "hierarchy.similarity = 'cosine'")
    expect_error(run_with(root, changed(params, "posthoc", coactivation_tokens=0),
                          build_posthoc_trees.app, args),
                 "posthoc.coactivation_tokens = 0")
    no_model = ["--baseline", str(root / "act.zarr")] + args[2:]
    expect_error(run_with(root, params, build_posthoc_trees.app, no_model), "is not a saved HSAE")

    args = metrics_args(paths)
    expect_error(run_with(root, changed(params, "metrics", batch_size=1),
                          compute_metrics.app, args),
                 "metrics.batch_size = 1")
    expect_error(run_with(root, changed(params, "metrics", eval_token=5),
                          compute_metrics.app, args),
                 "metrics.eval_token")
    no_model = ["--hsae", str(root / "missing")] + args[2:]
    expect_error(run_with(root, params, compute_metrics.app, no_model), "is not a saved HSAE")
    result = runner.invoke(compute_metrics.app, ["--params", str(root / "params.yaml"), *args])
    assert result.exit_code == 0, result.output
    assert "mean hamming" in result.output


def test_data_stages_name_the_bad_key(project, tmp_path):
    root, params = project
    out = ["--out", str(tmp_path / "store.zarr")]
    expect_error(run_with(root, changed(params, "extract", layerr=3),
                          extract_activations.app, out), "layerr")
    expect_error(run_with(root, changed(params, "extract", layer=99),
                          extract_activations.app, out),
                 "layer 99 is out of range")
    args = ["--store", str(root / "act.zarr"), "--out", str(tmp_path / "norm.json")]
    expect_error(run_with(root, changed(params, "normalize", n_tokens=0), normalize.app, args),
                 "NormalizeConfig.n_tokens = 0")


def test_committed_params_files_are_valid(monkeypatch):
    """params.yaml (the embedded default) and configs/paper.yaml pass every stage's checks
    (paper.yaml names CUDA: this test lends the check a GPU)."""
    import torch

    from hsae_core.pipeline.params import hsae_config, load_params, validate_params
    from stages.check_params import SECTIONS
    from tests.pipeline_helpers import REPO

    for path, d_model in ((REPO / "params.yaml", 576), (REPO / "configs" / "paper.yaml", 2304)):
        p = load_params(path)
        if path.parent.name == "configs":
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
            monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        assert validate_params(p, SECTIONS) == []
        assert (hsae_config(p, d_model).n_levels == 4
                and hsae_config(p, d_model, independent=True).is_independent)
    assert hsae_config(p, d_model).rho == 0.01 and hsae_config(p, d_model).swap_rate == 0.05


def test_models_that_do_not_read_the_store_width_are_refused(tmp_path):
    from hsae_core.model.config import HSAEConfig
    from hsae_core.model.hsae import HSAE
    from hsae_core.pipeline.io import load_for_store, save_hsae
    save_hsae(HSAE(HSAEConfig(d_model=8, level_sizes=(4, 8), target_l0=2)), tmp_path / "m")
    assert set(load_for_store({"hsae": tmp_path / "m"}, 8, "store.zarr")) == {"hsae"}
    with pytest.raises(ValueError,
                       match="hsae model has d_model 8, store store.zarr holds d = 16"):
        load_for_store({"hsae": tmp_path / "m"}, 16, "store.zarr")
