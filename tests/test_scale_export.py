"""Issue 7: SAELens export of every level (HSAE and baseline), loaded back with SAELens's own
loader, and the SAEBench adapter's arithmetic; issue 26: every prefix of the Matryoshka SAE,
whose exported folder reconstructs as the Matryoshka's own prefix does.

sae-lens is in the ``dev`` extra (it installs beside our pins without changing any of them);
where it is missing the SAELens test skips and says so.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from hsae_core.interop.saelens import ExportMetadata, check_prefixes, export_saelens
from hsae_core.model.config import HSAEConfig
from hsae_core.model.hsae import HSAE
from hsae_core.model.matryoshka import MatryoshkaConfig, MatryoshkaTrainer
from hsae_core.model.posthoc import posthoc_forest
from hsae_core.model.trainer import Trainer
from tests.synthetic import SyntheticForest

SYN = SyntheticForest.make(d=16, branching=(2, 2), n_roots=4, seed=3)
SCALE = 0.37
META = ExportMetadata(model_name="google/gemma-2-2b", hook_layer=12, context_size=1024,
                      activation_scale=SCALE, dataset_path="JeanKaddour/minipile")


BASE = dict(d_model=16, level_sizes=SYN.sizes, target_l0=2.0, batch_size=64, total_steps=25,
            update_interval=10, lr=3e-3, bandwidth=0.05, seed=7)


@pytest.fixture(scope="module")
def models():
    base = BASE
    hsae = Trainer(HSAEConfig(**base)).fit(SYN.batches(64, seed=1))
    baseline = Trainer(HSAEConfig(**(base | dict(rho=0.0, swap_rate=0.0, update_interval=0)))).fit(
        SYN.batches(64, seed=1))
    # as build-posthoc-trees does
    baseline.forest = posthoc_forest(baseline, "encoder", 0.2, "partial", None)
    assert not hsae.forest.is_empty() and not baseline.forest.is_empty()
    return {"hsae": hsae, "baseline": baseline}


def ours(model, level: int, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our level on raw inputs: dense codes of ``SCALE * x`` and the reconstruction in raw
    units."""
    lv = model.levels[level]
    with torch.no_grad():
        code = lv.encode(SCALE * x_raw)
        return code.dense(), lv.decode(code) / SCALE


@pytest.mark.parametrize("kind", ["hsae", "baseline"])
def test_every_level_loads_in_saelens_and_matches_ours(tmp_path, models, kind):
    sae_lens = pytest.importorskip("sae_lens",
                                   reason="sae-lens is not installed (pip install -e '.[dev]')")
    model = models[kind]
    folders = export_saelens(model, tmp_path / kind, META, kind=kind)
    assert len(folders) == model.n_levels
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)) * 3.0 + 0.5
    for level, folder in enumerate(folders):
        sae = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
        assert type(sae).__name__ == "JumpReLUSAE"
        assert sae.cfg.d_sae == model.cfg.level_sizes[level] and sae.cfg.d_in == 16
        assert sae.cfg.metadata.hook_name == "blocks.12.hook_resid_post"
        assert (sae.cfg.metadata.model_name == "google/gemma-2-2b"
                and sae.cfg.metadata.context_size == 1024)
        codes, recon = ours(model, level, x)
        with torch.no_grad():
            theirs = sae.encode(x)
            assert (theirs > 0).sum() > 0
            torch.testing.assert_close(theirs * SCALE, codes, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(sae.decode(theirs), recon, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(sae(x), recon, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae))
    forest = json.loads((tmp_path / kind / "forest.json").read_text())
    assert ([p["parent_of"] for p in forest["pairs"]]
            == [p.tolist() for p in model.forest.parent_of])


def test_saebench_adapter_matches_ours(tmp_path, models):
    from hsae_core.interop.saebench import JumpReLULevelSAE

    folders = export_saelens(models["hsae"], tmp_path / "e", META)
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(1)) * 3.0
    for level, folder in enumerate(folders):
        sae = JumpReLULevelSAE.from_export(folder, device="cpu", dtype=torch.float32)
        assert sae.cfg.hook_layer == 12 and sae.cfg.d_sae == models["hsae"].cfg.level_sizes[level]
        assert sae.check_decoder_norms()
        codes, recon = ours(models["hsae"], level, x)
        with torch.no_grad():
            torch.testing.assert_close(sae.encode(x) * SCALE, codes, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(sae(x), recon, atol=1e-5, rtol=1e-5)


def test_export_refuses_a_bad_scale(tmp_path, models):
    with pytest.raises(ValueError, match="scale must be positive"):
        export_saelens(models["hsae"], tmp_path, ExportMetadata("m", 0, 8, activation_scale=0.0))


def test_export_stage_writes_loadable_levels_and_names_bad_inputs(tmp_path, models):
    from typer.testing import CliRunner

    from hsae_core.data.normalize import estimate_normalization
    from hsae_core.pipeline.io import save_hsae
    from stages.export_saelens import app
    from tests.test_scale_distributed import synthetic_store

    store = synthetic_store(tmp_path / "acts.zarr")
    norm = estimate_normalization(store)
    norm.save(tmp_path / "norm.json")
    save_hsae(models["hsae"], tmp_path / "hsae")
    save_hsae(models["baseline"], tmp_path / "posthoc")
    common = ["--store", str(store.path), "--normalization", str(tmp_path / "norm.json")]
    for kind, folder in (("hsae", "hsae"), ("baseline", "posthoc")):  # export-hsae/-baseline
        args = ["--model", str(tmp_path / folder), "--kind", kind, *common,
                "--out", str(tmp_path / "export" / kind)]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
    for kind, model in models.items():
        cfg = json.loads((tmp_path / "export" / kind / "level2" / "cfg.json").read_text())
        assert (cfg["d_sae"] == model.cfg.level_sizes[2]
                and cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post")
        assert cfg["metadata"]["hsae"]["activation_scale"] == pytest.approx(norm.scale)
        forest = json.loads((tmp_path / "export" / kind / "forest.json").read_text())
        assert forest["pairs"][1]["parent_of"] == model.forest.parent_of[1].tolist()
    bad = CliRunner().invoke(app, args[:1] + [str(tmp_path / "missing")] + args[2:])
    assert bad.exit_code == 2 and "is not a saved HSAE" in " ".join(bad.output.split())


# ----- the Matryoshka's prefixes (issue 26) -------------------------------------------------

def as_levels(levels) -> HSAE:
    """``levels`` as a saved-baseline-like HSAE with an empty forest: the format of
    data/matryoshka/{prefixes,groups} (hsae_core.pipeline.matryoshka_run.as_levels_model)."""
    cfg = HSAEConfig(**(BASE | dict(level_sizes=tuple(lv.n_features for lv in levels), rho=0.0,
                                    swap_rate=0.0, update_interval=0)))
    model = HSAE(cfg)
    with torch.no_grad():
        for mine, lv in zip(model.levels, levels):
            for name, p in lv.named_parameters():
                getattr(mine, name).copy_(p.detach())
    return model


@pytest.fixture(scope="module")
def matryoshka():
    cfg = MatryoshkaConfig(d_model=16, group_sizes=SYN.sizes, k=6.0, batch_size=64,
                           total_steps=30, lr=3e-3, dead_window_tokens=0, seed=7)
    mat = MatryoshkaTrainer(cfg).fit(SYN.batches(64, seed=1))
    assert float(mat.threshold) > 0 and not torch.allclose(mat.b_dec, torch.zeros(16))
    return {"model": mat, "prefixes": as_levels(mat.prefix_levels()),
            "groups": as_levels(mat.group_levels()),
            "training": {"step": 30, "tokens": 30 * 64, "dead_window_tokens": 0,
                         "threshold": float(mat.threshold), "k": cfg.k,
                         "dead_frac_train": [0.0] * len(SYN.sizes)}}


def matryoshka_prefix(mat, g: int, x_raw: torch.Tensor):
    """The Matryoshka's own prefix g on raw inputs: its first m_g codes of ``SCALE * x`` (raw
    units) and the reconstruction from its first g+1 groups (raw units)."""
    m = mat.cfg.prefix_sizes[g]
    codes = mat.encode(SCALE * x_raw)
    with torch.no_grad():
        return codes[:, :m] / SCALE, mat.decode(codes)[g] / SCALE


def test_matryoshka_prefixes_load_in_saelens_and_reconstruct_as_the_prefix(tmp_path,
                                                                            matryoshka):
    sae_lens = pytest.importorskip("sae_lens",
                                   reason="sae-lens is not installed (pip install -e '.[dev]')")
    mat, out = matryoshka["model"], tmp_path / "matryoshka"
    folders = export_saelens(matryoshka["prefixes"], out, META, kind="matryoshka",
                             training=matryoshka["training"])
    prefix_sizes = list(mat.cfg.prefix_sizes)
    assert [f.name for f in folders] == [f"prefix{g}" for g in range(len(SYN.sizes))]
    assert not (out / "forest.json").exists() and not any(out.glob("level*"))
    info = json.loads((out / "export.json").read_text())
    assert (info["kind"], info["prefix_sizes"], info["group_sizes"]) == (
        "matryoshka", prefix_sizes, list(SYN.sizes))
    assert info["forest"] is None and "first g+1 groups" in info["nested"]
    assert info["folders"] == [f.name for f in folders] and info["k"] == 6.0
    assert info["activation_scale"] == SCALE and info["hook_name"] == "blocks.12.hook_resid_post"
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(2)) * 3.0 + 0.5
    prev = None
    for g, folder in enumerate(folders):
        sae = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
        assert type(sae).__name__ == "JumpReLUSAE" and sae.cfg.d_sae == prefix_sizes[g]
        md = sae.cfg.metadata
        assert md.hook_name == "blocks.12.hook_resid_post" and md.model_name == META.model_name
        cfg = json.loads((folder / "cfg.json").read_text())["metadata"]["hsae"]
        assert (cfg["kind"], cfg["prefix"], cfg["prefix_sizes"], cfg["forest"]) == (
            "matryoshka", g, prefix_sizes, None)
        codes, recon = matryoshka_prefix(mat, g, x)
        with torch.no_grad():
            theirs = sae.encode(x)
            assert (theirs > 0).sum() > 0
            torch.testing.assert_close(theirs, codes, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(sae(x), recon, atol=1e-5, rtol=1e-5)
            out_g = sae(x)
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae))
        if prev is not None:  # nested: a longer prefix reconstructs better, never worse here
            assert (x - out_g).pow(2).sum() < (x - prev).pow(2).sum()
        prev = out_g


def test_matryoshka_export_refuses_the_groups_folder(tmp_path, matryoshka):
    assert check_prefixes(matryoshka["prefixes"]) == SYN.sizes
    with pytest.raises(ValueError, match="not a Matryoshka prefixes model.*data/matryoshka/"
                                         "prefixes"):
        export_saelens(matryoshka["groups"], tmp_path / "g", META, kind="matryoshka")
    with pytest.raises(ValueError, match="kind 'other'"):
        export_saelens(matryoshka["prefixes"], tmp_path / "o", META, kind="other")


def test_export_matryoshka_stage(tmp_path, matryoshka):
    """`python -m stages.export_saelens --kind matryoshka --model data/matryoshka/prefixes
    --out data/export/matryoshka` on saved folders: prefix folders, no forest, the groups
    folder refused by name."""
    from typer.testing import CliRunner

    from hsae_core.data.normalize import estimate_normalization
    from hsae_core.interop.saebench import JumpReLULevelSAE
    from hsae_core.pipeline.io import save_hsae
    from stages.export_saelens import app
    from tests.test_scale_distributed import synthetic_store

    store = synthetic_store(tmp_path / "acts.zarr")
    norm = estimate_normalization(store)
    norm.save(tmp_path / "norm.json")
    for name in ("prefixes", "groups"):
        save_hsae(matryoshka[name], tmp_path / "matryoshka" / name,
                  training=matryoshka["training"])
    out = tmp_path / "export" / "matryoshka"
    args = ["--kind", "matryoshka", "--model", str(tmp_path / "matryoshka" / "prefixes"),
            "--store", str(store.path), "--normalization", str(tmp_path / "norm.json"),
            "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "3 prefixes" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "prefix0", "prefix1",
                                                      "prefix2"]
    info = json.loads((out / "export.json").read_text())
    assert info["kind"] == "matryoshka" and info["k"] == matryoshka["training"]["k"]
    assert info["activation_scale"] == pytest.approx(norm.scale)
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(3)) * 3.0
    mat = matryoshka["model"]
    for g in range(len(SYN.sizes)):
        sae = JumpReLULevelSAE.from_export(out / f"prefix{g}", device="cpu")
        with torch.no_grad():
            recon = mat.decode(mat.encode(norm.scale * x))[g] / norm.scale
            torch.testing.assert_close(sae(x), recon, atol=1e-5, rtol=1e-5)
    from hsae_core.interop.saebench import saebench_selection  # SAEBench's list: every prefix

    chosen = saebench_selection(tmp_path / "export", ("matryoshka",), "cpu", torch.float32)
    assert [n for n, _ in chosen] == [f"matryoshka_prefix{g}_{m}" for g, m in
                                      enumerate(itertools.accumulate(SYN.sizes))]
    groups = args[:3] + [str(tmp_path / "matryoshka" / "groups")] + args[4:]
    bad = CliRunner().invoke(app, groups)
    text = " ".join(bad.output.split())
    assert bad.exit_code == 2 and "not a Matryoshka prefixes model" in text
    assert "data/matryoshka/prefixes" in text
