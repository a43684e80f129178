"""No silent wrong result, no lost artifact (issue 15): a checkpoint is resumed only on the data
it was trained on, a store missing a shard or holding NaN rows is refused naming them, a failing
stage leaves the finished checkpoint and curves alone, an unreadable checkpoint is moved aside,
and equal content is saved as equal bytes. (DVC's cache under hand-run stages:
tests/test_reliability_dvc.py.)"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from typer.testing import CliRunner

from hsae_core.common import fsio
from hsae_core.data.config import ExtractConfig
from hsae_core.data.extract import extract_activations
from hsae_core.data.normalize import estimate_normalization
from hsae_core.data.reader import EvalActivations, TrainActivations
from hsae_core.data.store import StoreError, open_store
from hsae_core.evaluation.evidence import EvidenceConfig, LevelEvidence, save_evidence
from hsae_core.interop.saelens import ExportMetadata, export_saelens
from hsae_core.model.config import HSAEConfig
from hsae_core.model.hsae import HSAE
from hsae_core.pipeline.io import load_hsae, save_hsae
from hsae_core.pipeline.train_run import TrainRunConfig, train_on_store
from stages import compute_metrics, train_hsae
from tests.pipeline_helpers import micro_assets, micro_params

runner = CliRunner()
RUN = TrainRunConfig(checkpoint_every=10, log_every=5)


def extract(root: Path, assets: Path, max_tokens: int):
    model, corpus = micro_assets(assets)
    cfg = ExtractConfig(model=model, layer=1, corpus=corpus, context_len=32, batch_size=8,
                        max_tokens=max_tokens, eval_fraction=0.2, chunk_bytes=4096,
                        shard_bytes=65536)
    info = extract_activations(cfg, root, progress=False)
    norm = estimate_normalization(info)
    norm.save(root.with_suffix(".json"))
    return info, norm.scale


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The micro store (d = 64: train rows in shards of 256) and one extracted with other
    settings."""
    root = tmp_path_factory.mktemp("reliability")
    return (extract(root / "act.zarr", root / "assets", 3000),
            extract(root / "other.zarr", root / "assets", 2600))


def config(**kw) -> HSAEConfig:
    return HSAEConfig(d_model=64, level_sizes=(8, 16, 32), target_l0=3.0, batch_size=64,
                      total_steps=20, update_interval=10, dead_window_tokens=0, **kw)


def same(a: HSAE, b: HSAE) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))


def copy_store(info, dest: Path) -> Path:
    shutil.copytree(info.path, dest)
    return dest


def set_rows(store: Path, split: str, rows: list[int], value: float) -> None:
    arr = zarr.open_group(store, mode="r+")[f"{split}/activations"]
    block = arr[: max(rows) + 1].copy()
    block[rows, 5] = value
    arr[: max(rows) + 1] = block


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- finding 1: a checkpoint records the data it was trained on --------------------------------

def test_finished_checkpoint_is_not_resumed_on_other_data(stores, tmp_path, capsys):
    (info, scale), (other, other_scale) = stores
    cfg, ckpt = config(), tmp_path / "hsae.pt"
    first = train_on_store(cfg, info, scale, checkpoint=ckpt, curves=tmp_path / "c", run=RUN)
    capsys.readouterr()
    again = train_on_store(cfg, info, scale, checkpoint=ckpt, curves=tmp_path / "c", run=RUN)
    assert "resuming from" in capsys.readouterr().out and same(again, first)

    # another extraction (max_tokens changed): the finished checkpoint is not handed back
    moved = train_on_store(cfg, other, other_scale, checkpoint=ckpt, curves=tmp_path / "c",
                           run=RUN)
    out = capsys.readouterr().out
    assert "resuming" not in out
    assert f"checkpoint {ckpt} is not resumed" in out and "another activation store" in out
    fresh = train_on_store(cfg, other, other_scale, checkpoint=tmp_path / "fresh.pt",
                           curves=tmp_path / "f", run=RUN)
    assert same(moved, fresh) and not same(moved, first)

    # the same store with another normalisation scale
    train_on_store(cfg, other, other_scale * 1.5, checkpoint=ckpt, curves=tmp_path / "c",
                   run=RUN)
    out = capsys.readouterr().out
    assert "resuming" not in out and "another normalisation scale" in out

    # the same attributes, other rows (rewritten by hand): the shard bytes differ
    changed = copy_store(info, tmp_path / "changed.zarr")
    set_rows(changed, "train", [0], 7.0)
    train_on_store(cfg, info, scale, checkpoint=ckpt, curves=tmp_path / "c", run=RUN)
    capsys.readouterr()
    train_on_store(cfg, str(changed), scale, checkpoint=ckpt, curves=tmp_path / "c", run=RUN)
    assert "another activation store" in capsys.readouterr().out


def test_finished_checkpoint_is_not_resumed_on_a_store_that_became_nan(stores, tmp_path):
    (info, scale), _ = stores
    cfg, ckpt = config(), tmp_path / "hsae.pt"
    train_on_store(cfg, info, scale, checkpoint=ckpt, curves=tmp_path / "c", run=RUN)
    bad = copy_store(info, tmp_path / "nan.zarr")
    set_rows(bad, "train", [3, 4], float("nan"))
    with pytest.raises(StoreError, match=r"NaN or Inf in train rows 3, 4 \(2 in"):
        train_on_store(cfg, str(bad), scale, checkpoint=ckpt, curves=tmp_path / "c", run=RUN)


# -- finding 2: a missing shard file is not read as zeros ----------------------------------------

def test_a_missing_shard_is_refused_naming_it(stores, tmp_path):
    (info, _), _ = stores
    broken = copy_store(info, tmp_path / "broken.zarr")
    (broken / "train" / "activations" / "c" / "2" / "0").unlink()
    for opening in (lambda: open_store(broken), lambda: TrainActivations(broken, 1.0),
                    lambda: estimate_normalization(broken)):
        with pytest.raises(StoreError, match=r"missing 1 shard file\(s\) of train/activations: "
                                             r"train/activations/c/2/0 \(rows from 512\)"):
            opening()
    eval_gone = copy_store(info, tmp_path / "eval.zarr")
    (eval_gone / "eval" / "activations" / "c" / "0" / "0").unlink()
    with pytest.raises(StoreError, match=r"eval/activations/c/0/0"):
        EvalActivations(eval_gone, 1.0)

    # at a URL, where DVC tracks nothing, the same check
    fs = fsspec_memory()
    url = "memory://reliability/broken.zarr"
    fs.put(str(broken), "/reliability/broken.zarr", recursive=True)
    with pytest.raises(StoreError, match=r"train/activations/c/2/0"):
        open_store(url)
    fs.rm("/reliability", recursive=True)


def fsspec_memory():
    import fsspec

    return fsspec.filesystem("memory")


# -- finding 3: NaN rows are named, in the eval split and in training ----------------------------

def test_nan_in_the_eval_split_stops_compute_metrics_naming_the_rows(stores, tmp_path):
    (info, _), _ = stores
    bad = copy_store(info, tmp_path / "nan.zarr")
    set_rows(bad, "eval", [5], float("inf"))
    set_rows(bad, "eval", [9], float("nan"))
    params = micro_params(*micro_assets(tmp_path / "assets"))
    params["metrics"] |= {"lm_loss_tokens": 0, "bootstrap": 0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    model = HSAE(HSAEConfig(d_model=64, level_sizes=(8, 16), target_l0=2))
    save_hsae(model, tmp_path / "hsae")
    save_hsae(model, tmp_path / "posthoc")
    args = ["--params", str(tmp_path / "params.yaml"), "--hsae", str(tmp_path / "hsae"),
            "--posthoc", str(tmp_path / "posthoc"), "--normalization",
            str(Path(info.path).with_suffix(".json")), "--out", str(tmp_path / "m.json"),
            "--table", str(tmp_path / "t.md")]
    result = runner.invoke(compute_metrics.app, args + ["--store", str(bad)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "NaN or Inf in eval rows 5, 9 (2 in the block of rows 0.." in text, text
    assert not (tmp_path / "m.json").exists()
    ok = runner.invoke(compute_metrics.app, args + ["--store", str(info.path)])
    assert ok.exit_code == 0, ok.output


def test_training_on_nan_rows_names_them_not_the_learning_rate(stores, tmp_path):
    (info, scale), _ = stores
    bad = copy_store(info, tmp_path / "nan.zarr")
    set_rows(bad, "train", [300, 700, 1100, 1500, 1900, 2300], float("nan"))  # one per shard
    # before the trainer's FloatingPointError ("lower lr"): the reader names the rows
    with pytest.raises(StoreError, match=r"NaN or Inf in train rows (3|7|11|15|19|23)00 \(1 in "
                                         r"the block of rows .*re-extract the store"):
        train_on_store(config(), str(bad), scale, checkpoint=tmp_path / "x.pt",
                       curves=tmp_path / "c", run=RUN)
    assert not (tmp_path / "x.pt").exists()


# -- findings 6 and 7: a failing stage keeps what is finished; an unreadable checkpoint ----------

@pytest.fixture()
def trained(stores, tmp_path):
    """A finished train-hsae run in ``tmp_path`` and the stage's arguments."""
    (info, _), _ = stores
    params = micro_params(*micro_assets(tmp_path / "assets"))
    params["sae"] |= {"level_sizes": [8, 16, 32], "total_steps": 20}
    norm = str(Path(info.path).with_suffix(".json"))
    args = ["--store", str(info.path), "--normalization", norm, "--out", str(tmp_path / "hsae"),
            "--checkpoint", str(tmp_path / "ckpt" / "hsae.pt"),
            "--curves", str(tmp_path / "curves")]
    result = train(tmp_path, params, args)
    assert result.exit_code == 0, result.output
    return tmp_path, params, args


def train(root: Path, params: dict, args: list[str]):
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return runner.invoke(train_hsae.app, ["--params", str(root / "params.yaml"), *args])


def test_a_failing_stage_keeps_the_finished_checkpoint_and_curves(trained):
    root, params, args = trained
    kept = files_of(root / "ckpt") | {f"curves/{k}": v
                                      for k, v in files_of(root / "curves").items()}
    curves = [k for k in kept if k.startswith("curves/")]  # DVCLive: metrics.json + TSVs
    assert len(kept["hsae.pt"]) > 200 and "curves/metrics.json" in curves and len(curves) > 10
    failing = [params | {"rho": float("inf")}]
    if not torch.cuda.is_available():
        failing.append(params | {"sae": params["sae"] | {"device": "cuda"}})
    for bad in failing:
        result = train(root, bad, args)
        assert result.exit_code != 0, result.output
        now = files_of(root / "ckpt") | {f"curves/{k}": v
                                         for k, v in files_of(root / "curves").items()}
        assert now == kept, result.output
    result = train(root, params, args)
    assert result.exit_code == 0, result.output
    assert f"resuming from {root / 'ckpt' / 'hsae.pt'} at step 20 of 20" in result.output


def test_an_unreadable_checkpoint_is_moved_aside_and_training_starts_afresh(trained):
    root, params, args = trained
    ckpt = root / "ckpt" / "hsae.pt"
    finished = load_hsae(root / "hsae")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # a checkpoint cut short (a full disk, a kill)
    result = train(root, params, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"checkpoint {ckpt} is unreadable" in text and f"moved it to {ckpt}.corrupt" in text
    assert (root / "ckpt" / "hsae.pt.corrupt").read_bytes() == data[: len(data) // 2]
    assert same(load_hsae(root / "hsae"), finished)  # retrained from step 0: the same run
    assert torch.load(ckpt, weights_only=False)["step"] == 20


# -- finding 15: equal content, equal bytes ------------------------------------------------------

def test_saved_models_exports_and_evidence_are_byte_identical(stores, tmp_path):
    (info, scale), _ = stores
    model = train_on_store(config(), info, scale, checkpoint=tmp_path / "a.pt",
                           curves=tmp_path / "c", run=RUN)
    again = train_on_store(config(), info, scale, checkpoint=tmp_path / "b.pt",
                           curves=tmp_path / "c", run=RUN)
    meta = ExportMetadata.from_store(info.attrs, scale)
    n = np.arange(3)
    ev = LevelEvidence(token_ids=np.ones((3, 4, 5), np.int32),
                       acts=np.zeros((3, 4, 5), np.float32),
                       rows=np.arange(12, dtype=np.int64).reshape(3, 4),
                       doc_ids=np.zeros((3, 4), np.int64), positions=np.zeros((3, 4), np.int32),
                       n_fired=n.astype(np.int64), sum_act=n.astype(np.float32),
                       max_act=n.astype(np.float32))
    digests = {}
    for i, m in enumerate([model, again] * 4):
        save_hsae(m, tmp_path / f"m{i}", training={"step": 20, "lambda": [0.5, 0.25]})
        export_saelens(m, tmp_path / f"e{i}", meta, kind="hsae")
        save_evidence([ev], tmp_path / f"v{i}", vocab=["a", "b"], meta={"source": "t"},
                      cfg=EvidenceConfig())
        digests[i] = {name: hashlib.sha256(data).hexdigest()
                      for kind in "mev" for name, data in
                      {f"{kind}/{k}": v for k, v in files_of(tmp_path / f"{kind}{i}").items()}
                      .items()}
    assert len(digests[0]) == 4 + 2 + 2 * 3 + 3
    assert all(d == digests[0] for d in digests.values())
    assert same(load_hsae(tmp_path / "m0"), model)


def test_a_model_folder_is_replaced_file_by_file_not_in_place(tmp_path):
    model = HSAE(HSAEConfig(d_model=8, level_sizes=(4, 8), target_l0=2))
    save_hsae(model, tmp_path / "m", training={"step": 1})
    (tmp_path / "m" / "notes.txt").write_text("keep")  # not the model's: left alone
    cached = {p.name: tmp_path / f"cache-{p.name}" for p in (tmp_path / "m").iterdir()}
    for name, link in cached.items():
        link.hardlink_to(tmp_path / "m" / name)  # what DVC's hardlink cache does
    before = {name: link.read_bytes() for name, link in cached.items()}
    with torch.no_grad():
        model.levels[0].b_dec += 1
    save_hsae(model, tmp_path / "m")  # without training.json now: the old one must not survive
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json", "forest.json", "model.safetensors", "notes.txt"]
    assert {name: link.read_bytes() for name, link in cached.items()} == before
    assert torch.equal(load_hsae(tmp_path / "m").levels[0].b_dec, model.levels[0].b_dec)
    assert not [p for p in tmp_path.rglob(".*")]  # no temporaries left


def test_atomic_writes_replace_files_and_leave_them_on_failure(tmp_path):
    target = tmp_path / "a.json"
    fsio.write_text(target, "old")
    link = tmp_path / "cache-copy"
    link.hardlink_to(target)  # what DVC's hardlink cache does
    fsio.write_json(target, {"new": 1})
    assert link.read_text() == "old" and fsio.read_json(target) == {"new": 1}
    with pytest.raises(RuntimeError):
        with fsio.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert fsio.read_json(target) == {"new": 1}
    folder = tmp_path / "f"
    with fsio.replacing_folder(folder) as tmp:
        (tmp / "x").write_text("1")
    (tmp_path / "x-link").hardlink_to(folder / "x")
    with pytest.raises(RuntimeError):
        with fsio.replacing_folder(folder) as tmp:
            (tmp / "y").write_text("2")
            raise RuntimeError("killed")
    assert files_of(folder) == {"x": b"1"}
    with fsio.replacing_folder(folder) as tmp:
        (tmp / "x").write_text("3")
    assert files_of(folder) == {"x": b"3"} and (tmp_path / "x-link").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "cache-copy", "f", "x-link"]


def test_nonfinite_rows_in_every_storage_dtype():
    from hsae_core.data.reader import nonfinite_rows
    from hsae_core.data.store import to_storage

    x = torch.ones(4, 3)
    x[1, 2], x[3, 0] = float("nan"), float("-inf")
    for dtype in ("float32", "float16", "bfloat16"):
        assert nonfinite_rows(to_storage(x, dtype), dtype).tolist() == [1, 3], dtype
    big = torch.full((2, 3), 3e38)  # finite float32 whose row sum would overflow
    assert nonfinite_rows(to_storage(big, "float32"), "float32").tolist() == []


def test_atomic_writes_at_urls():
    fs = fsspec_memory()
    url = "memory://reliability-urls/export"
    with fsio.replacing_folder(url) as tmp:
        fsio.write_text(fsio.join(tmp, "a/x.json"), "1")
        fsio.write_text(fsio.join(tmp, "b.json"), "2")
    with pytest.raises(RuntimeError):
        with fsio.replacing_folder(url) as tmp:
            fsio.write_text(fsio.join(tmp, "c.json"), "3")
            raise RuntimeError("killed")
    assert sorted(fs.find("/reliability-urls")) == ["/reliability-urls/export/a/x.json",
                                                     "/reliability-urls/export/b.json"]
    with fsio.replacing_folder(url) as tmp:
        fsio.write_text(fsio.join(tmp, "c.json"), "3")
    with fsio.atomic_path(fsio.join(url, "d.png")) as tmp:
        tmp.write_bytes(b"png")
    assert sorted(fs.find("/reliability-urls")) == ["/reliability-urls/export/c.json",
                                                     "/reliability-urls/export/d.png"]
    assert fsio.read_bytes(fsio.join(url, "d.png")) == b"png"
    fs.rm("/reliability-urls", recursive=True)
