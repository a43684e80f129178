"""Readers and normalisation on a real store written by extraction."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from hsae_core.data.config import ExtractConfig, NormalizeConfig
from hsae_core.data.extract import extract_activations
from hsae_core.data.normalize import Normalization, NormalizationError, estimate_normalization
from hsae_core.data.reader import EvalActivations, TrainActivations
from hsae_core.data.store import StoreError, open_store
from tests.store_helpers import jsonl_corpus, tiny_llama


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    cfg = ExtractConfig(model=tiny_llama(root / "model", d_model=32, n_layers=2), layer=0,
                        corpus=jsonl_corpus(root / "corpus.jsonl", n_docs=400, max_words=120),
                        context_len=64, batch_size=16, max_tokens=None, eval_fraction=0.1,
                        chunk_bytes=4096, shard_bytes=65536)
    return extract_activations(cfg, root / "store.zarr", progress=False)


def rows_of(store, split: str = "train") -> np.ndarray:
    return store.array(split)[:]


def as_set(rows: np.ndarray) -> list[bytes]:
    return sorted(r.tobytes() for r in np.ascontiguousarray(rows, dtype=np.float32))


def test_every_train_row_once_per_epoch(store):
    reader = TrainActivations(store, 1.0, batch_size=100, epochs=2, buffer_blocks=3,
                              block_rows=256)
    batches = list(reader)
    assert len(batches) == len(reader)
    n = store.n_rows("train")
    assert n % 100 and n > 5000
    per_epoch = -(-n // 100)
    assert [len(b) for b in batches] == ([100] * (per_epoch - 1) + [n % 100]) * 2
    assert all(b.dtype == torch.float32 and b.shape[1] == 32 for b in batches)
    epochs = [torch.cat(batches[:per_epoch]).numpy(), torch.cat(batches[per_epoch:]).numpy()]
    stored = as_set(rows_of(store))
    assert as_set(epochs[0]) == stored and as_set(epochs[1]) == stored
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch has its own order


def test_seeded_order_scale_cap_and_drop_last(store):
    kw = dict(batch_size=64, buffer_blocks=2, block_rows=128)
    a = torch.cat(list(TrainActivations(store, 2.0, seed=3, **kw)))
    b = torch.cat(list(TrainActivations(store, 2.0, seed=3, prefetch=4, **kw)))
    c = torch.cat(list(TrainActivations(store, 2.0, seed=4, **kw)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert as_set(a.numpy() / 2.0) == as_set(rows_of(store))
    n = store.n_rows("train")
    capped = list(TrainActivations(store, 1.0, epochs=None, max_tokens=2 * n + 7, **kw))
    assert sum(len(x) for x in capped) == 2 * n + 7
    assert len(capped) == len(TrainActivations(store, 1.0, epochs=None, max_tokens=2 * n + 7,
                                               **kw))
    dropped = list(TrainActivations(store, 1.0, drop_last=True, **kw))
    assert all(len(x) == 64 for x in dropped) and len(dropped) == n // 64
    assert len(TrainActivations(store, 1.0, drop_last=True, epochs=3, **kw)) == 3 * (n // 64)


def test_train_reader_memory_is_bounded(store):
    store_bytes = rows_of(store).nbytes
    reader = TrainActivations(store, 1.0, batch_size=64, buffer_blocks=2, block_rows=128,
                              prefetch=2)
    next(iter(reader))  # first use imports and caches codecs: not the reader's working memory
    tracemalloc.start()
    served = sum(len(b) for b in reader)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert served == store.n_rows("train")
    assert peak < store_bytes / 4, (peak, store_bytes)


def test_eval_batches_in_store_order_with_ids(store):
    batches = list(EvalActivations(store, 0.5, batch_size=300))
    assert len(batches) == len(EvalActivations(store, 0.5, batch_size=300))
    acts = torch.cat([b.activations for b in batches]).numpy()
    assert np.array_equal(acts, rows_of(store, "eval") * 0.5)
    for col in ("token_ids", "doc_ids", "positions", "sequence_ids"):
        got = torch.cat([getattr(b, col) for b in batches])
        assert got.dtype == torch.int64 and np.array_equal(got.numpy(),
                                                           store.array("eval", col)[:])
    capped = list(EvalActivations(store, 1.0, batch_size=300, max_tokens=450))
    assert [len(b.activations) for b in capped] == [300, 150]


def test_normalization_scale_gives_mean_squared_norm_d(store, tmp_path):
    norm = estimate_normalization(store, NormalizeConfig(n_tokens=10**9))
    assert norm.n_sample_tokens == store.n_rows("train")
    x = torch.cat(list(TrainActivations(store, norm.scale, batch_size=512))).double()
    assert (x * x).sum(1).mean().item() == pytest.approx(store.d_model, rel=1e-6)
    norm.save(tmp_path / "norm.json")
    assert Normalization.load(tmp_path / "norm.json") == norm
    assert TrainActivations(store, tmp_path / "norm.json").scale == norm.scale
    sampled = estimate_normalization(store, NormalizeConfig(n_tokens=1000, seed=1))
    assert 1000 <= sampled.n_sample_tokens < store.n_rows("train")
    assert sampled.scale == pytest.approx(norm.scale, rel=0.2)


def test_normalization_names_non_finite_rows(store, tmp_path):
    import shutil

    import zarr

    copy = tmp_path / "bad.zarr"
    shutil.copytree(store.path, copy)
    arr = zarr.open_group(copy, mode="r+")["train/activations"]
    row = arr[:5].copy()
    row[3, 7] = np.nan
    arr[:5] = row
    with pytest.raises(NormalizationError, match=r"NaN or Inf in train rows 3 "):
        estimate_normalization(copy, NormalizeConfig(n_tokens=10**9))


def test_store_for_another_model_or_layer_is_refused(store, tmp_path):
    with pytest.raises(StoreError, match=r"written for layer 0, but the config asks for layer 5"):
        TrainActivations(store.path, 1.0, layer=5)
    with pytest.raises(StoreError, match=r"written for model .*config asks for model 'other'"):
        open_store(store.path, model="other")
    other = Normalization(1.0, 1.0, store.d_model, 1, "other-model", 0, "float32", 1, 0)
    other.save(tmp_path / "other.json")
    with pytest.raises(StoreError, match="normalisation .* is for"):
        EvalActivations(store, tmp_path / "other.json")
    with pytest.raises(StoreError, match="no activation store"):
        open_store(tmp_path / "missing.zarr")


def test_prefetch_thread_stops_when_the_consumer_does(store):
    import threading

    batches = iter(TrainActivations(store, 1.0, batch_size=64, prefetch=2, epochs=None,
                                    max_tokens=10**9))
    assert next(batches).shape == (64, 32)
    assert any(t.name == "hsae-reader" for t in threading.enumerate())
    batches.close()
    assert not any(t.name == "hsae-reader" for t in threading.enumerate())
