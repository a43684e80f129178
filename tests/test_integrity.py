"""No silent corruption (issue 25), in process: a flipped byte in any chunk of the store is named
by split, column, shard file and rows on every read path (the stages included) instead of moving
the metrics; two middle train shards swapped change the checkpoint's data identity; a training
that diverges verifies the data before blaming the learning rate; a full disk is one line with
the path and the space needed; values a later stage would refuse, or that cannot fit in memory,
stop check-params; a params.yaml changed under a running DVC pipeline stops the next stage.
(The DVC-level findings, with real `dvc exp run` processes: tests/test_integrity_dvc.py.)"""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from hsae_core.common import fsio
from hsae_core.common.errors import ConfigError
from hsae_core.data.config import ExtractConfig
from hsae_core.data.extract import extract_activations
from hsae_core.data.normalize import estimate_normalization
from hsae_core.data.reader import EvalActivations, TrainActivations
from hsae_core.data.store import StoreError, open_store
from hsae_core.model.config import HSAEConfig
from hsae_core.model.hsae import HSAE
from hsae_core.pipeline import params as params_mod
from hsae_core.pipeline.checkpoint import data_identity
from hsae_core.pipeline.io import save_hsae
from hsae_core.pipeline.train_run import TrainRunConfig, train_on_store
from stages import check_params, compute_metrics, train_hsae
from tests.pipeline_helpers import REPO, env, micro_assets, micro_params

runner = CliRunner()
RUN = TrainRunConfig(checkpoint_every=10, log_every=5)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The micro store (d = 64; train: 2400 rows in 10 shards of 256, chunks of 16 rows)."""
    root = tmp_path_factory.mktemp("integrity")
    cfg = ExtractConfig(**micro_params(*micro_assets(root / "assets"))["extract"])
    info = extract_activations(cfg, root / "act.zarr", progress=False)
    norm = estimate_normalization(info)
    norm.save(root / "norm.json")
    return info, norm.scale, root


def copy_store(info, dest: Path) -> Path:
    shutil.copytree(info.path, dest)
    for f in dest.rglob("*"):  # a copy one may damage
        f.chmod(0o755 if f.is_dir() else 0o644)
    return dest


def flip(store: Path, split: str, chunk: int, n_values: int = 8) -> tuple[int, int]:
    """Give ``n_values`` float32 values of inner chunk ``chunk`` of ``split``'s activations a high
    byte of 0x4f (finite, about 1e9: the issue's fault), in place in the shard file, leaving
    the shard index and the chunk's stored crc32c alone. Returns the chunk's rows."""
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    rows, per_shard = attrs["chunk_rows"], attrs["shard_rows"] // attrs["chunk_rows"]
    shard, inner = divmod(chunk, per_shard)
    path = store / split / "activations" / "c" / str(shard) / "0"
    data = bytearray(path.read_bytes())
    index = np.frombuffer(bytes(data[-(16 * per_shard + 4):-4]), "<u8").reshape(-1, 2)
    offset = int(index[inner, 0])  # where the chunk's bytes start (its crc32c is after them)
    for i in range(n_values):
        data[offset + 4 * (7 * i) + 3] = 0x4F  # little-endian: byte 3 is the high one
    path.unlink()
    path.write_bytes(bytes(data))
    return chunk * rows, chunk * rows + rows - 1


# -- finding 1: flipped bytes are named, never read --------------------------------------------

def test_a_flipped_byte_is_named_on_every_read_path(store, tmp_path):
    info, scale, _ = store
    bad = copy_store(info, tmp_path / "bad.zarr")
    first, last = flip(bad, "train", 37)  # shard 2 (rows 512..767), its 6th chunk
    named = (r"corrupt data in train/activations \(1 chunk\(s\) whose crc32c does not match "
             rf"their bytes.*shard file train/activations/c/2/0: rows {first}\.\.{last}\. "
             r"Restore the store \(`dvc checkout .*re-extract")
    for read in (lambda: list(TrainActivations(bad, scale, batch_size=64)),
                 lambda: estimate_normalization(bad),  # samples every block of this small split
                 lambda: open_store(bad).array("train")[:]):
        with pytest.raises(StoreError, match=named):
            read()
    from hsae_core.data.integrity import verify_split

    assert verify_split(open_store(bad), "eval") == []
    problems = verify_split(open_store(bad), "train")
    assert len(problems) == 1 and f"rows {first}..{last}" in problems[0]

    first, last = flip(bad, "eval", 3)
    with pytest.raises(StoreError, match=rf"eval/activations.*c/0/0: rows {first}\."):
        list(EvalActivations(bad, scale, batch_size=100))
    err = pytest.raises(StoreError, lambda: open_store(bad).array("eval")[40:60]).value
    assert (err.split, err.column, err.rows) == ("eval", "activations", [(first, last)])

    # a shard index cut short, the documents table, an empty shard file (zarr: all zeros)
    cut = copy_store(info, tmp_path / "cut.zarr")
    f = cut / "train" / "token_ids" / "c" / "1"
    f.write_bytes(f.read_bytes()[:-9])
    with pytest.raises(StoreError, match=r"train/token_ids.*shard file "
                                                 r"train/token_ids/c/1: rows 256\.\.271, "):
        open_store(cut).array("train", "token_ids")[:]
    labels = cut / "documents" / "label" / "c" / "0"
    raw = bytearray(labels.read_bytes())
    raw[0] ^= 0x01
    labels.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="documents/label"):
        open_store(cut).group["documents/label"][:]
    (cut / "train" / "token_ids" / "c" / "1").write_bytes(b"")
    with pytest.raises(StoreError, match=r"shard file\(s\) of train/token_ids are shorter than "
                                         r"their index.*c/1 \(rows from 256: 0 bytes\)"):
        open_store(cut)


def test_stages_name_flipped_bytes_instead_of_moving_the_metrics(store, tmp_path):
    """The issue's fault: compute-metrics exited 0 with every FVE moved; train-hsae blamed the
    learning rate. Both stop (exit 2) naming the chunk."""
    info, _, root = store
    bad = copy_store(info, tmp_path / "bad.zarr")
    flip(bad, "eval", 2)
    flip(bad, "train", 21)
    params = micro_params(*micro_assets(root / "assets"))
    params["sae"] |= {"level_sizes": [8, 16], "total_steps": 20}
    params["metrics"] |= {"lm_loss_tokens": 0, "bootstrap": 0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    model = HSAE(HSAEConfig(d_model=64, level_sizes=(8, 16), target_l0=2))
    save_hsae(model, tmp_path / "hsae")
    save_hsae(model, tmp_path / "posthoc")
    result = runner.invoke(compute_metrics.app, [
        "--params", str(tmp_path / "params.yaml"), "--hsae", str(tmp_path / "hsae"),
        "--posthoc", str(tmp_path / "posthoc"), "--store", str(bad), "--normalization",
        str(root / "norm.json"), "--out", str(tmp_path / "m.json")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "eval/activations/c/0/0: rows 32..47" in text, text
    assert not (tmp_path / "m.json").exists()
    result = runner.invoke(train_hsae.app, [
        "--params", str(tmp_path / "params.yaml"), "--store", str(bad), "--normalization",
        str(root / "norm.json"), "--out", str(tmp_path / "out"), "--checkpoint",
        str(tmp_path / "c.pt"), "--curves", str(tmp_path / "curves")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "train/activations/c/1/0: rows 336..351" in text, text
    assert "lower" not in text and not (tmp_path / "out").exists()


# -- swapped middle shards: the checkpoint's data identity covers every shard ---------------------

def test_swapped_middle_shards_change_the_data_identity(store, tmp_path, capsys):
    """Two middle train shards swapped: every chunk still passes its checksum, but the rows
    moved, so a finished checkpoint must not be handed back (only the first and last shards
    were fingerprinted before)."""
    info, scale, _ = store
    swapped = copy_store(info, tmp_path / "swapped.zarr")
    folder = swapped / "train" / "activations" / "c"
    (folder / "4" / "0").rename(tmp_path / "x")
    (folder / "6" / "0").rename(folder / "4" / "0")
    (tmp_path / "x").rename(folder / "6" / "0")
    other = open_store(swapped)
    assert other.array("train")[1024:1030].tolist() == info.array("train")[1536:1542].tolist()
    cfg = HSAEConfig(d_model=64, level_sizes=(8, 16), target_l0=3.0, batch_size=64,
                     total_steps=20, update_interval=10, dead_window_tokens=0)
    train_on_store(cfg, info, scale, checkpoint=tmp_path / "c.pt", curves=tmp_path / "c",
                   run=RUN)
    capsys.readouterr()
    train_on_store(cfg, other, scale, checkpoint=tmp_path / "c.pt", curves=tmp_path / "c",
                   run=RUN)
    out = capsys.readouterr().out
    assert "resuming" not in out and "another activation store" in out
    assert data_identity(info, scale) != data_identity(other, scale)

    from hsae_core.data.integrity import shard_fingerprints, verify_split

    assert verify_split(other, "train") == []  # every chunk is intact: only the order changed
    before, after = (shard_fingerprints(s.array("train"), s.path) for s in (info, other))
    assert [i for i, (a, b) in enumerate(zip(before, after)) if a != b] == [4, 6]


# -- a diverged training verifies the data before it names a cause ------------------------------

def test_divergence_names_the_data_or_clears_it(store, tmp_path, monkeypatch):
    from hsae_core.pipeline import train_run

    info, scale, _ = store

    def diverge(self, batches):  # the trainer's own error, at once (no batch read yet)
        raise FloatingPointError("loss became nan at step 3; lower lr (now 0.003)")

    monkeypatch.setattr(train_run.Trainer, "fit", diverge)
    cfg = HSAEConfig(d_model=64, level_sizes=(8, 16), target_l0=3.0, batch_size=64,
                     total_steps=20, dead_window_tokens=0)
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 3.*verified clean "
                                                 r"\(every chunk's checksum and every row "
                                                 r"finite\), so the optimisation diverged: "
                                                 r"lower sae.lr"):
        train_on_store(cfg, info, scale, checkpoint=tmp_path / "a.pt", curves=tmp_path / "a")
    bad = copy_store(info, tmp_path / "bad.zarr")
    first, last = flip(bad, "train", 149)  # the split's last chunk (shard 9, 96 rows)
    with pytest.raises(FloatingPointError) as caught:
        train_on_store(cfg, str(bad), scale, checkpoint=tmp_path / "b.pt",
                       curves=tmp_path / "b")
    text = str(caught.value)
    assert text.startswith("hsae diverged on corrupt data: ") and "lower" not in text
    assert f"train/activations/c/9/0: rows {first}..{last}" in text


# -- a full disk: one line with the path and the space needed ---------------------------------

def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_path_and_the_space(store, tmp_path, monkeypatch):
    target = tmp_path / "out" / "a.json"
    fsio.write_text(target, "old")
    monkeypatch.setattr(Path, "write_bytes", enospc)
    with pytest.raises(OSError) as caught:
        fsio.write_json(target, {"x": "y" * 5000})
    text = str(caught.value)
    assert type(caught.value).__name__ == "DiskFullError" and caught.value.errno == errno.ENOSPC
    assert "\n" not in text
    assert text.startswith(f"no space left on the device writing {target}: it needs 5.0 KB, ")
    assert "free on" in text and target.read_text() == "old"  # the old file is untouched
    assert isinstance(caught.value, ValueError)  # stages report ValueErrors in one line
    monkeypatch.undo()

    def half_then_full(folder):
        (folder / "a.bin").write_bytes(b"x" * 3000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"writing .*/f: it needs more than the 3.0 KB "
                                                 r"written when the disk filled"):
        with fsio.replacing_folder(tmp_path / "f") as tmp:
            half_then_full(tmp)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".f.")]


def test_a_stage_on_a_full_disk_prints_one_line(store, tmp_path):
    """normalize writes its JSON after its checks, outside any handler: the process prints the
    one line, not a traceback (was: a raw OSError traceback)."""
    info, _, _ = store
    out = tmp_path / "norm.json"
    code = ("import errno, pathlib, sys\n"
            "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "pathlib.Path.write_bytes = full\n"
            "from stages.normalize import app\n"
            f"sys.argv = ['normalize', '--store', {str(info.path)!r}, '--out', {str(out)!r}]\n"
            "app()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(),
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: no space left on the device writing {out}: it needs ")
    assert not out.exists()


def test_a_full_disk_during_extraction_names_the_store(tmp_path, monkeypatch):
    from hsae_core.data.store import COLUMNS, Layout, StoreWriter

    writer = StoreWriter(tmp_path / "s.zarr", Layout(8, "float32", 16, 64), {"x": 1})
    arr = type(writer.group["train/activations"])
    monkeypatch.setattr(arr, "__setitem__", enospc)
    with pytest.raises(OSError, match=r"writing .*s.zarr.partial/train/activations: "
                                                 r"it needs 3.6 KB for this shard"):
        writer.write_shard("train", 0, np.zeros((64, 8), np.float32),
                           {c: np.zeros(64, t) for c, t in COLUMNS.items()})


# -- finding 4: limits checked before work ------------------------------------------------------

def check(tmp_path: Path, params: dict, store: Path | None):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = runner.invoke(check_params.app, [
        "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "checked"),
        "--store", str(store or tmp_path / "none.zarr")])
    return result.exit_code, " ".join(result.output.split())


def test_check_params_refuses_what_a_stage_would_refuse(store, tmp_path):
    info, _, root = store
    params = micro_params(*micro_assets(root / "assets"))
    params["extract"] |= {"max_tokens": 3000, "eval_fraction": 0.2}
    assert check(tmp_path, params, info.path) == (0, f"check-params: {tmp_path}/params.yaml is "
                                                     "valid")
    # the values: a level of 1e8 features (here 1e9, more than any machine's memory),
    # a batch of 1e9 rows
    n = 8 + 10**9
    need = 16 * (2 * n * 64 + 2 * n + 2 * 64) + 2 * 64 * n * 4  # Adam etc. + a batch, on d = 64
    code, text = check(tmp_path, params | {"sae": params["sae"] | {"level_sizes": [8, 10**9]}},
                       info.path)
    # one message: the stage needing most in full (here the report's batches), the others named
    assert code == 2 and text.count(" needs at least ") == 1, text
    assert re.search(rf"train-hsae (needs at least )?{need / 2**30:.1f} GiB", text), text
    assert "or sae.level_sizes, or use a device with more memory" in text
    assert "GiB of RAM available" in text and "train-baselines" in text
    code, text = check(tmp_path, params | {"sae": params["sae"] | {"level_sizes": [10**8]}},
                       info.path)
    assert code == 2 and "sae.level_sizes = [100000000] is invalid: the pipeline needs at " \
                         "least two levels" in text
    code, text = check(tmp_path, params | {"sae": params["sae"] | {"batch_size": 10**9}},
                       info.path)
    assert code == 2 and ("sae.batch_size = 1000000000 is more than the train split holds "
                          f"(2400 rows; store {info.path})") in text
    # no store yet (or one of other settings): bounded by extract.max_tokens
    code, text = check(tmp_path, params | {"sae": params["sae"] | {"batch_size": 2500}}, None)
    assert code == 2 and "can hold at most (2400 rows; no store yet" in text
    assert check(tmp_path, params | {"sae": params["sae"] | {"batch_size": 2400}}, None)[0] == 0
    other = params | {"extract": params["extract"] | {"max_tokens": 5000}}
    code, text = check(tmp_path, other | {"sae": params["sae"] | {"batch_size": 2500}},
                       info.path)
    assert code == 0, text  # the store will be re-extracted with 4000 train rows
    # the model's layers and context, an OpenAI judge without its key
    code, text = check(tmp_path, params | {"extract": params["extract"] | {"layer": 9}}, None)
    assert code == 2 and "layer 9 is out of range" in text
    judge = {"backend": "openai", "base_url": "http://localhost:1/v1",
             "api_key_env": "HSAE_TEST_UNSET_KEY"}
    code, text = check(tmp_path, params | {"judge": params["judge"] | judge}, info.path)
    assert code == 2 and "judge.api_key_env = 'HSAE_TEST_UNSET_KEY': that environment " in text


def test_memory_bound_against_the_device(monkeypatch):
    from hsae_core.pipeline import limits

    cfg = HSAEConfig(d_model=2304, level_sizes=(2048, 4096, 8192, 16384), target_l0=50,
                     batch_size=4096)
    need = {stage: sum(t[0] for t in terms)
            for stage, _, _, terms in limits.stage_memory(cfg, {}, 2304)}
    n, p = 30720, 2 * 30720 * 2304 + 2 * 30720 + 4 * 2304
    assert need["train-hsae"] == 4 * 4 * p + 2 * 4096 * n * 4
    monkeypatch.setattr(limits, "available_memory", lambda device: (need["train-hsae"] - 1, "x"))
    params = {"sae": {"level_sizes": [2048, 4096, 8192, 16384], "batch_size": 4096,
                      "target_l0": 50}}
    ex = ExtractConfig(model="some/hub-model", max_tokens=10**6)
    monkeypatch.setattr(limits, "data_sizes",
                        lambda *a: limits.DataSizes(10**6, 2304, True, "store"))
    found = limits.check_limits(params, {"extract": ex}, None)
    assert len(found) == 1 and found[0].startswith(
        f"train-hsae needs at least {need['train-hsae'] / 2**30:.1f} GiB on sae.device")
    monkeypatch.setattr(limits, "available_memory", lambda device: (need["train-hsae"], "x"))
    assert limits.check_limits(params, {"extract": ex}, None) == []


# -- finding 2, in process: params.yaml changed under a running DVC pipeline --------------------

def test_a_stage_refuses_params_changed_since_check_params(tmp_path, monkeypatch):
    params = {"rho": 0.5, "sae": {"lr": 3.0e-3, "level_sizes": [8, 16]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    lock = {"schema": "2.0", "stages": {"check-params": {"params": {"params.yaml": params}}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    monkeypatch.setattr(params_mod, "_LOADED", {})  # this process: the files it loaded
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "train-hsae")
    params_mod.load_params(tmp_path / "params.yaml")  # what check-params checked: runs
    # another `dvc exp run -S rho=0.4` wrote params.yaml while this one's training ran
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params | {"rho": 0.4}))
    with pytest.raises(ConfigError, match=r"params.yaml changed while hsae's training ran: "
                                          r"rho = 0.4 \(checked: 0.5\).*--queue"):
        params_mod.check_unchanged("hsae's training")
    with pytest.raises(ConfigError, match=r"params.yaml changed after check-params checked it, "
                                          r"while this pipeline ran: rho = 0.4 \(checked: "
                                          r"0.5\)\. Stage train-hsae does not run"):
        params_mod.load_params(tmp_path / "params.yaml")
    monkeypatch.delenv("DVC_STAGE")  # by hand, outside DVC: nothing to compare with
    assert params_mod.load_params(tmp_path / "params.yaml")["rho"] == 0.4
    params_mod.check_unchanged("x")
    monkeypatch.setenv("DVC_STAGE", "compute-metrics")  # YAML 1.1 / 1.2 spellings agree
    (tmp_path / "params.yaml").write_text("rho: 0.5\nsae:\n  lr: 3e-3\n  level_sizes: [8, 16]\n")
    params_mod.load_params(tmp_path / "params.yaml")
