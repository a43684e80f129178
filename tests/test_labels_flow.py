"""A document label column flows from the corpus into the store and to the semantic scores
(issue 14): a .jsonl corpus, a Hugging Face dataset saved with ``save_to_disk`` (a ClassLabel
column keeps its class names), a hub-style dataset folder read by ``datasets`` streaming, and a
corpus without labels, for which topic coherence is reported unavailable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hsae_core.data.config import ExtractConfig
from hsae_core.data.corpus import CorpusError, _hf_records, iter_documents
from hsae_core.data.extract import extract_activations
from hsae_core.evaluation.compute import eval_labels, format_table
from tests.store_helpers import LABELS, documents, jsonl_corpus, tiny_llama

CLASSES = ["World", "Sports", "Business", "Sci/Tech"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("labels") / "model", max_positions=64)


def extract(model, corpus, out, **kw):
    cfg = ExtractConfig(model=model, layer=1, corpus=corpus, context_len=32, batch_size=4,
                        max_tokens=None, eval_fraction=0.3, chunk_bytes=2048,
                        shard_bytes=16384, **kw)
    return extract_activations(cfg, out, progress=False)


def stored_labels(store) -> list[str | None]:
    arr = store.group["documents/label"]
    names = arr.attrs["label_names"]
    return [names[i] if i >= 0 else None for i in arr[:]]


def eval_docs_and_labels(store) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    docs = torch.from_numpy(np.unique(store.array("eval", "doc_ids")[:]).astype(np.int64))
    labels, n = eval_labels(store, docs)
    return docs, labels, n


def test_jsonl_label_column_reaches_the_store_and_the_eval_documents(model, tmp_path):
    corpus = jsonl_corpus(tmp_path / "c.jsonl", n_docs=30)
    store = extract(model, corpus, tmp_path / "s.zarr", label_column="topic")
    truth = [d["topic"] for d in map(json.loads, open(corpus))]
    assert stored_labels(store) == truth
    docs, labels, n = eval_docs_and_labels(store)
    names = store.group["documents/label"].attrs["label_names"]
    assert n == len(LABELS) and docs.numel() > 0
    assert [names[i] for i in labels.tolist()] == [truth[d] for d in docs.tolist()]


def saved_dataset(folder, n_docs: int, as_dict: bool = False):
    import datasets

    rows = documents(n_docs, seed=3)
    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=CLASSES)})
    labels = [(i * 7) % len(CLASSES) for i in range(n_docs)]
    ds = datasets.Dataset.from_dict({"text": [r["text"] for r in rows], "label": labels},
                                    features=feats)
    (datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}) if as_dict
     else ds).save_to_disk(str(folder))
    return [CLASSES[i] for i in labels]


def test_saved_hugging_face_dataset_keeps_class_names_in_the_store(model, tmp_path):
    truth = saved_dataset(tmp_path / "ds", n_docs=24)
    store = extract(model, str(tmp_path / "ds"), tmp_path / "s.zarr", label_column="label")
    assert stored_labels(store) == truth
    assert set(store.group["documents/label"].attrs["label_names"]) == set(CLASSES)
    docs, labels, n = eval_docs_and_labels(store)
    names = store.group["documents/label"].attrs["label_names"]
    assert n == len(CLASSES)
    assert [names[i] for i in labels.tolist()] == [truth[d] for d in docs.tolist()]


def test_saved_dataset_dict_split_and_missing_column_are_named(tmp_path):
    truth = saved_dataset(tmp_path / "dd", n_docs=10, as_dict=True)
    docs = list(iter_documents(str(tmp_path / "dd"), label_column="label",
                               dataset_split="test"))
    assert [d.label for d in docs] == truth[:3]
    with pytest.raises(CorpusError, match=r"no split 'validation'.*\['test', 'train'\]"):
        list(iter_documents(str(tmp_path / "dd"), dataset_split="validation"))
    with pytest.raises(CorpusError, match=r"no column 'topic'; columns are \['text', 'label'\]"):
        list(iter_documents(str(tmp_path / "dd"), label_column="topic"))


def test_streamed_hub_dataset_maps_class_label_ids_to_names(tmp_path):
    """A hub-style dataset folder (README dataset card with a class_label feature, parquet
    data) read through the ``datasets`` streaming branch used for hub names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "hub" / "data").mkdir(parents=True)
    names = "\n".join(f"          '{i}': {c}" for i, c in enumerate(CLASSES))
    (tmp_path / "hub" / "README.md").write_text(
        "---\ndataset_info:\n  features:\n  - name: text\n    dtype: string\n"
        f"  - name: label\n    dtype:\n      class_label:\n        names:\n{names}\n---\n")
    pq.write_table(pa.table({"text": ["one", "two", "three"], "label": [3, 0, 1]}),
                   tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    rows = list(_hf_records(str(tmp_path / "hub"), "text", "label", None, "train"))
    assert rows == [("one", "Sci/Tech"), ("two", "World"), ("three", "Sports")]


def test_a_corpus_without_labels_reports_topic_coherence_unavailable(model, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(d["text"] for d in documents(20)) + "\n")
    store = extract(model, str(corpus), tmp_path / "s.zarr")
    assert store.group["documents/label"].attrs["label_names"] == []
    assert set(store.group["documents/label"][:].tolist()) == {-1}
    docs, labels, n = eval_docs_and_labels(store)
    assert labels is None and n == 0
    group = {"mean": {"doc_cooccurrence": 0.5}, "level0": {}, "level1": {}, "pair0": {}}
    table = format_table({"hsae": group, "posthoc": group, "doc_labels": 0})
    assert "topic coherence: unavailable" in table and "extract.label_column" in table
    assert "unavailable" not in format_table({"hsae": group, "posthoc": group, "doc_labels": 3})
