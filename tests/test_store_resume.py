"""An interrupted extraction resumes to the byte-identical store; finished stores are never
lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hsae_core.data.config import ExtractConfig
from hsae_core.data.extract import extract_activations
from hsae_core.data.store import StoreError, partial_path
from tests.store_helpers import jsonl_corpus, tiny_llama


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {"model": tiny_llama(root / "model"),
            "corpus": jsonl_corpus(root / "corpus.jsonl", n_docs=80)}


def config(assets, **kw) -> ExtractConfig:
    base = dict(model=assets["model"], layer=1, corpus=assets["corpus"], label_column="topic",
                context_len=40, batch_size=3, max_tokens=3000, eval_fraction=0.3,
                chunk_bytes=2048, shard_bytes=16384, shuffle_shards=2)
    return ExtractConfig(**(base | kw))


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def interrupt_after(k: int, log: list):
    def on_shard(split: str, shard: int) -> None:
        log.append((split, shard))
        if len(log) == k:
            raise Interrupted(f"killed after {k} shards")
    return on_shard


@pytest.mark.parametrize("k", [3, 40])  # mid-window in train (33 shards); inside eval (15 shards)
def test_resume_yields_the_uninterrupted_store(assets, tmp_path, k):
    cfg = config(assets)
    every, first, second = [], [], []
    reference = extract_activations(cfg, tmp_path / "ref.zarr", progress=False,
                                    on_shard=lambda split, shard: every.append((split, shard)))
    assert len(every) == 33 + 15
    with pytest.raises(Interrupted):
        extract_activations(cfg, tmp_path / "run.zarr", progress=False,
                            on_shard=interrupt_after(k, first))
    assert not (tmp_path / "run.zarr").exists()
    progress = json.loads((partial_path(tmp_path / "run.zarr") / "progress.json").read_text())
    assert sum(progress["rows"].values()) > 0
    resumed = extract_activations(cfg, tmp_path / "run.zarr", progress=False,
                                  on_shard=lambda split, shard: second.append((split, shard)))
    # The resumed run starts at the interrupted window, not at the beginning.
    assert second[0] in first and second[0] != ("train", 0) and len(second) < len(every)
    assert sorted(set(first) | set(second)) == sorted(every)
    assert files(resumed.path) == files(reference.path)
    assert not partial_path(tmp_path / "run.zarr").exists()
    assert reference.n_rows("train") + reference.n_rows("eval") == 3000


def test_resume_with_other_settings_is_refused(assets, tmp_path):
    with pytest.raises(Interrupted):
        extract_activations(config(assets), tmp_path / "s.zarr", progress=False,
                            on_shard=interrupt_after(2, []))
    with pytest.raises(StoreError, match=r"other settings \(context_len\)"):
        extract_activations(config(assets, context_len=32), tmp_path / "s.zarr", progress=False)


def test_finished_store_is_kept(assets, tmp_path):
    out = tmp_path / "done.zarr"
    extract_activations(config(assets, max_tokens=600), out, progress=False)
    before = files(out)
    with pytest.raises(StoreError, match="already exists"):
        extract_activations(config(assets, max_tokens=600), out, progress=False)
    with pytest.raises(Interrupted):  # a failed overwrite leaves the finished store untouched
        extract_activations(config(assets, max_tokens=900), out, overwrite=True, progress=False,
                            on_shard=interrupt_after(2, []))
    assert files(out) == before
    extract_activations(config(assets, max_tokens=900), out, overwrite=True, progress=False)
    assert files(out) != before and not (tmp_path / "done.zarr.old").exists()
