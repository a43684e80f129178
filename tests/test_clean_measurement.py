"""Clean activations and dead features out of the forest (issue 13, METHOD §1, §4): planted
attention-sink rows are flagged, counted and never served, the scale is fitted on the rest; a
store written before the rule is refused; features that stopped firing take no part in a
hierarchy update or in the post-hoc forest; no update runs after the last gradient step."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from hsae_core.data.config import ExtractConfig, NormalizeConfig
from hsae_core.data.extract import extract_activations
from hsae_core.data.lm import load_lm
from hsae_core.data.normalize import estimate_normalization
from hsae_core.data.reader import EvalActivations, TrainActivations
from hsae_core.data.store import StoreError, from_storage, open_store
from hsae_core.model.config import HSAEConfig
from hsae_core.model.forest import UNASSIGNED
from hsae_core.model.hierarchy import assign_children, assign_forest
from hsae_core.model.hsae import HSAE
from hsae_core.model.posthoc import live_features, posthoc_forest
from hsae_core.model.trainer import Trainer
from tests.store_helpers import jsonl_corpus, tiny_llama
from tests.synthetic import SyntheticForest

SINK = 300.0  # the planted rows' norm factor


@pytest.fixture(scope="module")
def sink_store(tmp_path_factory):
    """A store from a tiny Llama whose residual at position 1 is blown up 300x in every
    sequence whose token at position 1 has an even id: planted attention sinks."""
    root = tmp_path_factory.mktemp("sinks")
    cfg = ExtractConfig(model=tiny_llama(root / "model"), layer=2,
                        corpus=jsonl_corpus(root / "c.jsonl", n_docs=80), context_len=48,
                        batch_size=4, max_tokens=None, eval_fraction=0.25, chunk_bytes=2048,
                        shard_bytes=16384)
    lm = load_lm(cfg.model, cfg.layer, cfg.context_len)
    inner = lm.residual

    def residual(ids: torch.Tensor) -> torch.Tensor:
        hidden = inner(ids).clone()
        sink = ids[:, 1] % 2 == 0
        hidden[sink, 1] *= SINK
        return hidden

    info = extract_activations(cfg, root / "store.zarr",
                               lm=dataclasses.replace(lm, residual=residual), progress=False)
    return info, cfg


def columns(info, split):
    cols = {c: info.array(split, c)[:] for c in ("token_ids", "positions", "outlier")}
    cols["x"] = from_storage(info.array(split)[:], info.dtype).double()
    return cols


def test_planted_sink_rows_are_flagged_and_counted(sink_store):
    info, cfg = sink_store
    assert info.attrs["format_version"] == 3
    assert info.attrs["outliers"]["norm_ratio"] == cfg.outlier_norm_ratio
    for split in ("train", "eval"):
        c = columns(info, split)
        planted = (c["positions"] == 1) & (c["token_ids"] % 2 == 0)
        assert planted.sum() > 3
        assert np.array_equal(c["outlier"].astype(bool), planted), split
        assert info.attrs["outliers"]["rows"][split] == int(planted.sum())
        assert info.n_clean(split) == info.n_rows(split) - int(planted.sum())


def test_scale_is_fitted_on_the_clean_rows(sink_store):
    info, _ = sink_store
    c = columns(info, "train")
    clean = c["x"][c["outlier"] == 0]
    norm = estimate_normalization(info, NormalizeConfig(n_tokens=10 ** 9))
    assert norm.n_sample_tokens == len(clean)
    assert norm.mean_squared_norm == pytest.approx(float(clean.pow(2).sum(1).mean()), rel=1e-9)
    with_sinks = float(c["x"].pow(2).sum(1).mean())
    assert with_sinks > 50 * norm.mean_squared_norm  # what the old rule fitted the scale to


def test_readers_never_serve_a_sink_row(sink_store):
    info, _ = sink_store
    c = columns(info, "train")
    limit = float(c["x"][c["outlier"] == 1].pow(2).sum(1).min())
    served = torch.cat(list(TrainActivations(info, 1.0, batch_size=16, seed=3, epochs=2)))
    assert served.shape[0] == 2 * info.n_clean("train")
    assert float(served.double().pow(2).sum(1).max()) < limit
    ev = list(EvalActivations(info, 1.0, batch_size=16))
    acts = torch.cat([b.activations for b in ev])
    assert acts.shape[0] == info.n_clean("eval")
    e = columns(info, "eval")
    assert torch.equal(acts.double(), e["x"][e["outlier"] == 0])
    assert torch.equal(torch.cat([b.positions for b in ev]),
                       torch.from_numpy(e["positions"][e["outlier"] == 0].astype(np.int64)))
    capped = sum(b.activations.shape[0] for b in EvalActivations(info, 1.0, batch_size=16,
                                                                 max_tokens=50))
    assert capped == 50


def test_a_store_written_before_the_rule_is_refused(sink_store, tmp_path):
    import shutil

    import zarr
    info, _ = sink_store
    old = tmp_path / "old.zarr"
    shutil.copytree(info.path, old)
    zarr.open_group(old, mode="r+").attrs["format_version"] = 1
    with pytest.raises(StoreError, match="format_version 1.*Re-extract"):
        open_store(old)


def test_dead_children_and_parents_take_no_part_in_an_assignment():
    gen = torch.Generator().manual_seed(0)
    cfg = HSAEConfig(d_model=16, level_sizes=(8, 32), target_l0=2, seed=1)
    model = HSAE(cfg)
    live = [torch.ones(8, dtype=torch.bool), torch.rand(32, generator=gen) < 0.6]
    live[0][[1, 4]] = False
    forest = assign_forest(model.levels, "encoder", 0.25, "partial", None, live)
    p = forest.parent_of[0]
    assert (p[~live[1]] == UNASSIGNED).all()  # a dead child has no parent
    assert not set(p[p >= 0].tolist()) & {1, 4}  # a dead parent has no child
    # the quantile is taken over live children: a quarter of them stay out
    assert int((p >= 0).sum()) == int(live[1].sum()) - int(np.floor(0.25 * int(live[1].sum())))
    full = assign_forest(model.levels, "encoder", 0.0, "binary", None, live)
    assert (full.parent_of[0][~live[1]] == UNASSIGNED).all()
    assert not set(full.parent_of[0].tolist()) & {1, 4}


def test_a_child_with_no_live_candidate_stays_unassigned():
    sims = torch.tensor([[0.9], [float("-inf")], [0.5]])
    cands = torch.tensor([[0], [1], [0]])
    assert assign_children(sims, cands, 2, 0.0).tolist() == [0, UNASSIGNED, 0]


def test_trainer_updates_leave_out_features_that_stopped_firing():
    syn = SyntheticForest.make(d=16, branching=(3,), n_roots=4, paths_per_token=1, seed=0)
    cfg = HSAEConfig(d_model=16, level_sizes=syn.sizes, target_l0=1.5, batch_size=64,
                     total_steps=40, update_interval=10, lr=3e-3, dead_window_tokens=0,
                     threshold_init=0.05, seed=0)
    trainer = Trainer(cfg)
    with torch.no_grad():  # silence two parents and three children from the start
        trainer.model.levels[0].threshold[[0, 2]] = 1e6
        trainer.model.levels[1].threshold[[1, 5, 7]] = 1e6
    updates = []
    trainer.on_log, trainer.log_every = (lambda step, rec: None), 1
    original = trainer.update_hierarchy

    def spy():
        live = trainer.live_features()
        forest = original()
        updates.append((trainer.step, live, forest))
        return forest
    trainer.update_hierarchy = spy
    trainer.fit(syn.batches(64, seed=2))
    assert [u[0] for u in updates] == [10, 20, 30]  # none after the last step (40)
    for _, live, forest in updates:
        assert not live[0][[0, 2]].any() and not live[1][[1, 5, 7]].any()
        p = forest.parent_of[0]
        assert (p[~live[1].cpu()] == UNASSIGNED).all()
        assert not set(p[p >= 0].tolist()) & set(torch.nonzero(~live[0]).flatten().tolist())
    assert trainer.n_updates == 3


def test_posthoc_forest_leaves_out_features_silent_on_the_window():
    syn = SyntheticForest.make(d=16, branching=(3,), n_roots=4, paths_per_token=1, seed=0)
    cfg = HSAEConfig(d_model=16, level_sizes=syn.sizes, target_l0=1.5, batch_size=64,
                     total_steps=30, rho=0.0, swap_rate=0.0, update_interval=0, lr=3e-3, seed=0)
    model = Trainer(cfg).fit(syn.batches(64, seed=2))
    with torch.no_grad():
        model.levels[0].threshold[3] = 1e6
        model.levels[1].threshold[[0, 6]] = 1e6
    live = live_features(model, itertools.islice(syn.batches(64, seed=5), 8))
    assert not live[0][3] and not live[1][[0, 6]].any()
    forest = posthoc_forest(model, "encoder", 0.2, "partial", None, live)
    p = forest.parent_of[0]
    assert (p[[0, 6]] == UNASSIGNED).all() and 3 not in p.tolist()


def test_dead_features_are_resampled_toward_badly_reconstructed_tokens():
    """The dead-feature remedy (config resample_interval): a feature silenced for the dead window
    gets a unit decoder row along a batch token, fires again right away, and restarts its
    counter and its Adam moments; live features are untouched."""
    syn = SyntheticForest.make(d=16, branching=(3,), n_roots=4, paths_per_token=1, seed=0)
    cfg = HSAEConfig(d_model=16, level_sizes=syn.sizes, target_l0=1.5, batch_size=64,
                     total_steps=40, rho=0.0, swap_rate=0.0, update_interval=0, lr=3e-3,
                     dead_window_tokens=640, resample_interval=20, threshold_init=0.05, seed=0)
    trainer = Trainer(cfg)
    with torch.no_grad():
        trainer.model.levels[1].threshold[[2, 9]] = 1e6  # silent from the start
    batches = syn.batches(64, seed=2)
    for _ in range(19):
        trainer.train_step(next(batches))
    lv = trainer.model.levels[1]
    before = {k: v.detach().clone() for k, v in lv.state_dict().items()}
    assert trainer.firing.since_fired[1][[2, 9]].min() >= cfg.dead_window_tokens
    x = next(batches)
    trainer.train_step(x)  # step 20: Adam step, then the resample
    assert trainer.resampled >= 2
    assert (lv.threshold[[2, 9]] < 1e3).all()
    assert torch.allclose(lv.W_dec[[2, 9]].norm(dim=1), torch.ones(2))
    assert (trainer.firing.since_fired[1][[2, 9]] == 0).all()
    sq = trainer.optimizer.state[lv.threshold]["exp_avg_sq"]
    assert sq[2] == sq[9] and sq[2] > 0
    live = trainer.firing.since_fired[1] < cfg.dead_window_tokens
    live[[2, 9]] = False
    moved = (lv.W_dec.detach() - before["W_dec"]).norm(dim=1)
    assert float(moved[live].max()) < 0.1  # one small Adam step, not a resample
    code = lv.encode(x)
    assert set(code.pattern.cols[code.active].tolist()) & {2, 9}  # they fire again
