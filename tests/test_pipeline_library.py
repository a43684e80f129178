"""The library behind the pipeline stages: resumable training with curves, streaming evaluation
against a dense recomputation, and the spliced next-token loss."""

from __future__ import annotations

import json

import pytest
import torch

from hsae_core.data.config import ExtractConfig
from hsae_core.data.extract import extract_activations
from hsae_core.data.normalize import estimate_normalization
from hsae_core.data.reader import EvalActivations, TrainActivations
from hsae_core.evaluation.evaluate import evaluate_hsae
from hsae_core.evaluation.splice import (
    SplicedLoss,
    batched_by_length,
    eval_sequences,
    load_full_lm,
)
from hsae_core.model.config import HSAEConfig
from hsae_core.model.hsae import HSAE
from hsae_core.model.posthoc import posthoc_forest
from hsae_core.model.trainer import Trainer
from hsae_core.pipeline.checkpoint import Checkpoint, usable_checkpoint
from hsae_core.pipeline.train_run import LiveCurves, TrainRunConfig, curve_rows, train_on_store
from tests.pipeline_helpers import micro_assets


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("library")
    model, corpus = micro_assets(root / "assets")
    cfg = ExtractConfig(model=model, layer=1, corpus=corpus, context_len=32, max_tokens=3000,
                        eval_fraction=0.2, chunk_bytes=4096, shard_bytes=65536)
    info = extract_activations(cfg, root / "act.zarr", progress=False)
    return info, estimate_normalization(info).scale


def config(**kw) -> HSAEConfig:
    return HSAEConfig(d_model=64, level_sizes=(8, 16, 32), target_l0=3.0, batch_size=64,
                      total_steps=30, update_interval=10, dead_window_tokens=0, **kw)


def test_resumed_training_equals_uninterrupted_with_the_same_curves(store, tmp_path):
    info, scale = store
    cfg, run = config(), TrainRunConfig(checkpoint_every=10, log_every=5)
    full = train_on_store(cfg, info, scale, checkpoint=tmp_path / "a.pt", curves=tmp_path / "a",
                          run=run)

    # what a run killed after its step-10 checkpoint leaves behind: the checkpoint and curves to
    # step 15
    reader = TrainActivations(info, scale, batch_size=64, seed=cfg.seed, epochs=None,
                              max_tokens=30 * 64, drop_last=True)
    killed = Trainer(cfg, log_every=5, on_log=LiveCurves(tmp_path / "b", 3))
    for step, x in enumerate(reader):
        killed.train_step(x)
        if step + 1 == 10:
            Checkpoint(tmp_path / "b.pt").save(killed)
        if step + 1 == 15:
            break
    resumed = train_on_store(cfg, info, scale, checkpoint=tmp_path / "b.pt", curves=tmp_path / "b",
                             run=run)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.forest.equals(full.forest)
    curves = curve_rows(tmp_path / "b", "hsae")
    assert curves == curve_rows(tmp_path / "a", "hsae")
    assert [r["step"] for r in curves] == list(range(5, 31, 5))
    assert set(curves[0]) == {"step", "loss", "lr"} | {
        f"level{l}/{q}" for l in range(3)
        for q in ("l0", "fve", "mse", "lambda", "dead", "l0_unreachable",
                   *(("pc", "with_parent") if l else ()))}
    # the files DVCLive wrote: the latest values (`dvc exp show`) and one TSV per quantity
    latest = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert latest["step"] == 30 and latest["train"]["hsae"]["level2"]["l0"] == curves[-1][
        "level2/l0"]
    tsv = tmp_path / "b" / "plots" / "metrics" / "train" / "hsae" / "level1" / "fve.tsv"
    assert tsv.read_text().splitlines()[0].split("\t") == ["step", "fve"]

    # a checkpoint of another config is not resumed from: it is replaced by a fresh run
    other = train_on_store(config(lr=1e-3), info, scale, checkpoint=tmp_path / "b.pt",
                           curves=tmp_path / "b", run=run)
    assert not torch.equal(other.levels[0].W_enc, full.levels[0].W_enc)
    assert [r["step"] for r in curve_rows(tmp_path / "b", "hsae")] == list(range(5, 31, 5))

    # nor is a finished checkpoint of the same config written by other code (a `dvc repro`
    # after a code change must retrain, not hand back the old run)
    state = torch.load(tmp_path / "a.pt", weights_only=False)
    assert usable_checkpoint(tmp_path / "a.pt", cfg) == 30
    state["code"] = "another version"
    torch.save(state, tmp_path / "a.pt")
    assert usable_checkpoint(tmp_path / "a.pt", cfg) == 0
    assert not (tmp_path / "a.pt").exists()


def test_streaming_evaluation_matches_a_dense_recomputation(store):
    info, scale = store
    model = HSAE(config())
    batches = [b.activations for b in EvalActivations(info, scale, batch_size=100)]
    x_all = torch.cat(batches)
    with torch.no_grad():
        for lv in model.levels:
            lv.init_b_dec_(x_all)
            lv.init_thresholds_(x_all, 3.0)
    model.forest = posthoc_forest(model, "encoder", 0.2, "partial")
    res = evaluate_hsae(model, iter(batches))
    n = x_all.shape[0]
    assert res["tokens"] == n
    for l, lv in enumerate(model.levels):
        with torch.no_grad():
            pre = x_all @ lv.W_enc.t() + lv.b_enc
            dense = torch.where(pre > lv.threshold, pre, torch.zeros_like(pre))
            recon = dense @ lv.W_dec + lv.b_dec
        assert res[f"level{l}"]["l0"] == pytest.approx(float((dense > 0).sum()) / n, rel=1e-6)
        assert res[f"level{l}"]["dead_frac"] == pytest.approx(
            float(((dense > 0).sum(0) == 0).double().mean()))
        fve, start = [], 0
        for xb in batches:  # FVE centres each token on its own batch's mean
            rb = recon[start: start + len(xb)].double()
            fve.append(1 - (xb.double() - rb).pow(2).sum(1)
                       / (xb.double() - xb.double().mean(0)).pow(2).sum(1))
            start += len(xb)
        assert res[f"level{l}"]["fve"] == pytest.approx(float(torch.cat(fve).mean()), rel=1e-4,
                                                        abs=1e-5)
    assert res["pair0"]["children_assigned"] == model.forest.n_assigned(0)


def test_eval_sequences_and_splice(store):
    info, _ = store
    bos = int(info.attrs["bos_token_id"])
    seqs = list(eval_sequences(info, 10 ** 9, block=50))  # blocks cut sequences apart
    stored = info.array("eval", "token_ids")[:]
    assert sum(int((s != bos).sum()) for s in seqs) == len(stored)
    assert all(s[0] == bos for s in seqs)
    assert torch.equal(torch.cat([torch.from_numpy(s[s != bos]) for s in seqs]),
                       torch.from_numpy(stored).long())
    few = list(eval_sequences(info, 40))
    assert sum(int((s != bos).sum()) for s in few) >= 40 and len(few) < len(seqs)

    lm = load_full_lm(info.attrs["model"])
    loss = SplicedLoss(lm, int(info.attrs["layer"]), bos)
    for ids in batched_by_length(iter(seqs[:6]), 4):
        loss.add(ids, {"clean": None, "identity": lambda h: h, "zero": torch.zeros_like})
    got = loss.losses()
    assert got["identity"] == pytest.approx(got["clean"], rel=1e-5)
    assert abs(got["zero"] - got["clean"]) > 1e-3  # the hook really replaces block 1's output
