"""Issue 7: SAELens export of every level (HSAE and baseline), loaded back with SAELens's own
loader, and the SAEBench adapter's arithmetic.

sae-lens is in the ``dev`` extra (it installs beside our pins without changing any of them);
where it is missing the SAELens test skips and says so.
"""

from __future__ import annotations

import json

import pytest
import torch

from hsae_core.interop.saelens import ExportMetadata, export_saelens
from hsae_core.model.config import HSAEConfig
from hsae_core.model.posthoc import posthoc_forest
from hsae_core.model.trainer import Trainer
from tests.synthetic import SyntheticForest

SYN = SyntheticForest.make(d=16, branching=(2, 2), n_roots=4, seed=3)
SCALE = 0.37
META = ExportMetadata(model_name="google/gemma-2-2b", hook_layer=12, context_size=1024,
                      activation_scale=SCALE, dataset_path="JeanKaddour/minipile")


@pytest.fixture(scope="module")
def models():
    base = dict(d_model=16, level_sizes=SYN.sizes, target_l0=2.0, batch_size=64, total_steps=25,
                update_interval=10, lr=3e-3, bandwidth=0.05, seed=7)
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
