"""Corpora, packing and the split; bad input fails fast with a message naming the problem."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from hsae_core.common.errors import ConfigError
from hsae_core.data.config import ExtractConfig
from hsae_core.data.corpus import (
    CorpusError,
    check_corpus,
    document_split,
    embedded_wiki,
    iter_documents,
    pack_sequences,
)
from hsae_core.data.extract import extract_activations
from hsae_core.data.lm import ModelError, inspect_model
from tests.store_helpers import jsonl_corpus, tiny_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("inputs") / "model", max_positions=128)


@pytest.fixture(scope="module")
def config_only(model, tmp_path_factory):
    """The model folder without its weights: checks that pass here ran before any weight
    loading."""
    folder = tmp_path_factory.mktemp("no_weights")
    for f in (p for p in Path(model).iterdir() if p.suffix != ".safetensors"):
        shutil.copy(f, folder / f.name)
    return str(folder)


@pytest.mark.parametrize("field, value, allowed", [
    ("dtype", "float8", "one of ('float32', 'float16', 'bfloat16')"),
    ("layer", -1, "an integer >= 0"),
    ("context_len", 1, "an integer >= 2"),
    ("eval_fraction", 1.0, "a fraction in [0, 1)"),
    ("packing", "greedy", "one of ('pack', 'cut')"),
])
def test_config_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ConfigError,
                       match=re.escape(f"ExtractConfig.{field} = {value!r} is invalid: "
                                       f"expected {allowed}")):
        ExtractConfig(**{field: value})
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['layers'\]"):
        ExtractConfig.from_dict({"layers": 3})


@pytest.mark.parametrize("name, message", [
    ("/nonexistent/model.gguf", "no such file or folder"),
    ("./no_such_model_folder", "no such file or folder"),
])
def test_unknown_model(name, message):
    with pytest.raises(ModelError, match=message):
        inspect_model(name, 0, 16)


def test_non_gguf_file_and_missing_gguf_in_folder(tmp_path, config_only):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf file"):
        inspect_model(str(tmp_path / "weights.bin"), 0, 16)
    with pytest.raises(ModelError, match="gguf_file 'm.gguf' not found"):
        inspect_model(config_only, 0, 16, gguf_file="m.gguf")


def test_layer_and_context_checked_before_weights_load(config_only, tmp_path):
    corpus = jsonl_corpus(tmp_path / "c.jsonl", n_docs=5)
    with pytest.raises(ModelError,
                       match=r"layer 4 is out of range .* 4 blocks: choose 0 <= layer <= 3"):
        extract_activations(ExtractConfig(model=config_only, layer=4, corpus=corpus),
                            tmp_path / "s.zarr")
    with pytest.raises(ModelError,
                       match=r"context_len 1024 exceeds .*max_position_embeddings = 128"):
        extract_activations(ExtractConfig(model=config_only, layer=1, corpus=corpus),
                            tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "s.zarr.partial").exists()


def test_empty_or_missing_corpus_fails_before_model_load(config_only, tmp_path):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "  "}) + "\n\n")
    (tmp_path / "empty_dir").mkdir()
    for corpus, message in [(tmp_path / "empty.jsonl", "holds no non-empty documents"),
                            (tmp_path / "missing.txt", "no such file or folder"),
                            (tmp_path / "empty_dir", "holds no .txt/.jsonl/.parquet files")]:
        cfg = ExtractConfig(model=config_only, layer=1, corpus=str(corpus), context_len=32)
        with pytest.raises(CorpusError, match=message):
            extract_activations(cfg, tmp_path / "s.zarr")
    with pytest.raises(CorpusError, match=r"no column 'body'; columns are \['text', 'topic'\]"):
        check_corpus(jsonl_corpus(tmp_path / "c.jsonl", n_docs=3), text_column="body")


def test_local_corpus_kinds(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("first line\n\nsecond line\n")
    (folder / "b.jsonl").write_text(json.dumps({"body": "third", "kind": "x"}) + "\n")
    pq.write_table(pa.table({"body": ["fourth", ""], "kind": ["y", "z"]}), folder / "c.parquet")
    (folder / "notes.md").write_text("ignored")
    docs = list(iter_documents(str(folder / "a.txt")))
    assert [(d.doc_id, d.text) for d in docs] == [(0, "first line"), (1, "second line")]
    docs = list(iter_documents(str(folder / "c.parquet"), text_column="body", label_column="kind"))
    assert [(d.text, d.label) for d in docs] == [("fourth", "y")]
    (folder / "a.txt").unlink()
    docs = list(iter_documents(str(folder), text_column="body", label_column="kind"))
    assert [(d.doc_id, d.text, d.label) for d in docs] == [(0, "third", "x"), (1, "fourth", "y")]


def test_embedded_wiki_keeps_topics():
    try:
        embedded_wiki()
    except CorpusError as missing:
        pytest.skip(f"asset not installed: {missing}")
    docs = list(iter_documents("embedded:wiki"))
    assert len(docs) == 10033 and docs[0].text.startswith("20th-century classical music")
    assert len({d.label for d in docs}) == 12


def test_packing_and_cutting():
    docs = [(0, np.arange(10, 15)), (1, np.arange(20, 23)), (2, np.arange(30, 42))]
    packed = list(pack_sequences(docs, context_len=6, bos=1, eos=2, packing="pack"))
    stream = np.concatenate([np.append(t, 2) for _, t in docs])
    assert [len(s.tokens) for s in packed] == [6, 6, 6, 6, 1 + len(stream) - 20]
    assert all(s.tokens[0] == 1 for s in packed) and [s.index for s in packed] == list(range(5))
    assert np.array_equal(np.concatenate([s.tokens[1:] for s in packed]), stream)
    owners = np.concatenate([[i] * (len(t) + 1) for i, t in docs])
    assert np.array_equal(np.concatenate([s.doc_ids[1:] for s in packed]), owners)
    cut = list(pack_sequences(docs, context_len=6, bos=1, eos=2, packing="cut"))
    assert [len(s.tokens) for s in cut] == [6, 4, 6, 6, 3]
    for s in cut:
        assert len(set(s.doc_ids.tolist())) == 1 and s.tokens[0] == 1 and 2 not in s.tokens
    assert np.array_equal(np.concatenate([s.tokens[1:] for s in cut]),
                          np.concatenate([t for _, t in docs]))


def test_document_split_is_seeded_and_proportional():
    ids = range(20000)
    evals = [document_split(i, 0.1, seed=0) == "eval" for i in ids]
    assert 0.09 < np.mean(evals) < 0.11
    assert evals == [document_split(i, 0.1, seed=0) == "eval" for i in ids]
    assert evals != [document_split(i, 0.1, seed=1) == "eval" for i in ids]
    assert not any(document_split(i, 0.0, seed=0) == "eval" for i in ids)


def test_hugging_face_streaming_path(tmp_path):
    """The hub branch (``datasets`` streaming), fed a local dataset folder since the hub is
    unreachable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hsae_core.data.corpus import _hf_records

    (tmp_path / "ds" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["one two", "three"], "topic": ["x", "y"]}),
                   tmp_path / "ds" / "data" / "train-00000-of-00001.parquet")
    rows = list(_hf_records(str(tmp_path / "ds"), "text", "topic", None, "train"))
    assert rows == [("one two", "x"), ("three", "y")]
    with pytest.raises(CorpusError, match=r"no column 'body'"):
        list(_hf_records(str(tmp_path / "ds"), "body", None, None, "train"))
