"""The streaming evidence collector (Appendix C) against a brute-force selection over the full
activation matrix of a real small store; the activation-proportional draw; save/load; render."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hsae_core.data.config import ExtractConfig
from hsae_core.data.extract import extract_activations
from hsae_core.data.normalize import estimate_normalization
from hsae_core.data.reader import EvalActivations
from hsae_core.evaluation.evidence import (
    PAD,
    EvidenceConfig,
    choose,
    collect_evidence,
    load_evidence,
    render,
    sample_keys,
    save_evidence,
)
from hsae_core.model.config import HSAEConfig
from hsae_core.model.hsae import HSAE
from tests.store_helpers import jsonl_corpus, tiny_llama


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evidence")
    cfg = ExtractConfig(model=tiny_llama(root / "model", d_model=32, n_layers=2), layer=0,
                        corpus=jsonl_corpus(root / "corpus.jsonl", n_docs=500, max_words=16),
                        context_len=32, batch_size=16, max_tokens=None, eval_fraction=0.15,
                        chunk_bytes=4096, shard_bytes=65536)
    store = extract_activations(cfg, root / "store.zarr", progress=False)
    scale = estimate_normalization(store).scale
    model = HSAE(HSAEConfig(d_model=32, level_sizes=(8, 16, 48), target_l0=3.0, batch_size=64,
                            total_steps=10, dead_window_tokens=0))
    x = next(iter(EvalActivations(store, scale, batch_size=512))).activations
    # level 0 stays dense (half its features fire)
    for lv, l0 in zip(model.levels[1:], (3.0, 1.5)):
        lv.init_thresholds_(x, l0)
    return store, scale, model


def dense_activations(model, store, scale, batch_size):
    """Every level's full [tokens, n_l] activation matrix, encoded in the collector's batches."""
    mats = [[] for _ in model.levels]
    for batch in EvalActivations(store, scale, batch_size=batch_size):
        with torch.no_grad():
            for l, lv in enumerate(model.levels):
                mats[l].append(lv.encode(batch.activations).dense().numpy())
    return [np.concatenate(m) for m in mats]


def brute_force(dense, seq, cfg):
    """The slow, obvious twin: per feature, sort its whole column, then choose greedily."""
    out = []
    for l, a in enumerate(dense):
        cen = np.full((a.shape[1], cfg.n_top + cfg.n_sampled), PAD, dtype=np.int64)
        for f in range(a.shape[1]):
            rows = np.flatnonzero(a[:, f] > 0)
            vals = a[rows, f].astype(np.float64)
            taken: list[int] = []
            top = choose(rows[np.lexsort((rows, -vals))], seq, cfg.n_top, cfg.buffer, taken)
            keys = sample_keys(cfg.seed, l, np.full(len(rows), f), rows, vals)
            smp = choose(rows[np.lexsort((rows, -keys))], seq, cfg.n_sampled, cfg.buffer, taken)
            cen[f, :len(top)] = top
            cen[f, cfg.n_top: cfg.n_top + len(smp)] = smp
        out.append(cen)
    return out


@pytest.mark.parametrize("batch_size", [37, 1000])
def test_streaming_matches_brute_force(setup, batch_size):
    store, scale, model = setup
    cfg = EvidenceConfig(n_top=4, n_sampled=3, buffer=3, batch_size=batch_size, seed=5)
    levels = collect_evidence(model, lambda: EvalActivations(store, scale, batch_size=batch_size),
                              cfg)
    dense = dense_activations(model, store, scale, batch_size)
    seq = store.array("eval", "sequence_ids")[:]
    tok = store.array("eval", "token_ids")[:]
    doc = store.array("eval", "doc_ids")[:]
    n_rows = len(seq)
    assert n_rows > 500 and len(np.unique(seq)) > 20 and len(np.unique(doc)) > len(np.unique(seq))
    want = brute_force(dense, seq, cfg)
    for l, (ev, a, cen) in enumerate(zip(levels, dense, want)):
        np.testing.assert_array_equal(ev.rows, cen, err_msg=f"level {l}")
        np.testing.assert_array_equal(ev.n_fired, (a > 0).sum(0))
        np.testing.assert_allclose(ev.sum_act, a.astype(np.float64).sum(0), rtol=1e-6)
        np.testing.assert_array_equal(ev.max_act, a.max(0))
        assert (ev.rows[:, : cfg.n_top] >= 0).sum() > 0 and (ev.rows[:, cfg.n_top:] >= 0).sum() > 0
        for f in range(a.shape[1]):
            for e in range(cfg.n_top + cfg.n_sampled):
                c = ev.rows[f, e]
                if c < 0:
                    assert (ev.token_ids[f, e] == PAD).all() and (ev.acts[f, e] == 0).all()
                    continue
                for j, r in enumerate(range(c - cfg.buffer, c + cfg.buffer + 1)):
                    inside = 0 <= r < n_rows and seq[r] == seq[c] and doc[r] == doc[c]
                    assert ev.token_ids[f, e, j] == (tok[r] if inside else PAD)
                    assert ev.acts[f, e, j] == (a[r, f] if inside else 0.0)
                assert ev.acts[f, e, cfg.buffer] > 0
        # chosen windows of a feature never lie within `buffer` of each other in one sequence
        for f in range(a.shape[1]):
            got = [int(r) for r in ev.rows[f] if r >= 0]
            assert all(seq[p] != seq[q] or abs(p - q) > cfg.buffer
                       for i, p in enumerate(got) for q in got[:i])
    # the dense level has many firing positions, so every feature got all its examples
    assert (levels[0].rows >= 0).all()


def test_sampling_proportional_to_activation():
    acts = np.array([1.0, 2.0, 7.0])
    firsts = np.zeros(3)
    for seed in range(6000):
        keys = sample_keys(seed, 0, np.zeros(3, dtype=np.int64), np.arange(3), acts)
        firsts[np.argmax(keys)] += 1
    np.testing.assert_allclose(firsts / firsts.sum(), acts / acts.sum(), atol=0.02)


def test_save_load_render(setup, tmp_path):
    store, scale, model = setup
    cfg = EvidenceConfig(n_top=2, n_sampled=1, buffer=2)
    levels = collect_evidence(model, lambda: EvalActivations(store, scale, batch_size=256), cfg)
    vocab = [f" t{i}" for i in range(300)]
    save_evidence(levels, tmp_path / "ev", vocab=vocab, meta={"source": "test"}, cfg=cfg)
    back = load_evidence(tmp_path / "ev")
    assert back.index["window"] == 5 and back.index["levels"][2]["n_features"] == 48
    for a, b in zip(levels, back.levels):
        for k, v in a.arrays().items():
            np.testing.assert_array_equal(v, getattr(b, k))
    f = int(np.flatnonzero(levels[2].rows[:, 0] >= 0)[0])
    texts = back.examples(2, f)
    assert len(texts) == int((levels[2].rows[f] >= 0).sum()) and all("<<" in t for t in texts)
    assert render(["a", " b", " c", "\n", "d"], [0, 1, 2, 0, 3]) == "a<< b c>>↵<<d>>"
    with pytest.raises(FileNotFoundError, match="collect_evidence"):
        load_evidence(tmp_path / "missing")
