"""Extraction against a direct Hugging Face forward, with a tiny random Llama built in process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hsae_core.data.config import ExtractConfig
from hsae_core.data.corpus import Document, document_split, iter_documents, shuffle_documents
from hsae_core.data.extract import ExtractionError, extract_activations
from hsae_core.data.lm import load_lm
from hsae_core.data.store import from_storage
from tests.store_helpers import LABELS, jsonl_corpus, tiny_llama

LAYER, BATCH = 2, 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    return {"model": tiny_llama(root / "model"), "corpus": jsonl_corpus(root / "corpus.jsonl"),
            "root": root}


def config(assets, **kw) -> ExtractConfig:
    base = dict(model=assets["model"], layer=LAYER, corpus=assets["corpus"], label_column="topic",
                context_len=48, batch_size=BATCH, max_tokens=None, eval_fraction=0.25,
                chunk_bytes=2048, shard_bytes=16384)
    return ExtractConfig(**(base | kw))


@pytest.fixture(scope="module")
def store(assets):
    return extract_activations(config(assets), assets["root"] / "f32.zarr", progress=False)


def read_split(info, split: str) -> dict[str, np.ndarray]:
    cols = {c: info.array(split, c)[:]
            for c in ("token_ids", "doc_ids", "positions", "sequence_ids")}
    cols["activations"] = from_storage(info.array(split)[:], info.dtype).numpy()
    order = np.lexsort((cols["positions"], cols["sequence_ids"]))
    return {k: v[order] for k, v in cols.items()}


def sequences(cols: dict, bos: int) -> list[np.ndarray]:
    """Rebuild each sequence's tokens (BOS + stored positions) from a split sorted by
    (seq, pos)."""
    out = []
    for s in np.unique(cols["sequence_ids"]):
        sel = cols["sequence_ids"] == s
        assert (cols["positions"][sel] == np.arange(1, sel.sum() + 1)).all()
        out.append(np.concatenate([[bos], cols["token_ids"][sel]]))
    return out


@pytest.mark.parametrize("split", ["train", "eval"])
def test_rows_equal_hidden_states_forward(assets, store, split):
    """float32 rows are bit-identical to output_hidden_states[layer + 1] on the same batches."""
    full = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    cols = read_split(store, split)
    seqs = sequences(cols, bos=1)
    assert len(seqs) > BATCH
    want: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    for b in range(0, len(seqs), BATCH):
        batch = range(b, min(b + BATCH, len(seqs)))
        # equal lengths share a pass, as in extraction
        for length in {len(seqs[i]) for i in batch}:
            members = [i for i in batch if len(seqs[i]) == length]
            with torch.no_grad():
                out = full(torch.tensor(np.stack([seqs[i] for i in members])),
                           output_hidden_states=True)
            for j, i in enumerate(members):
                want[i] = out.hidden_states[LAYER + 1][j, 1:]
    want = torch.cat(want).numpy()
    assert np.array_equal(cols["activations"], want)


def test_truncated_forward_runs_only_blocks_up_to_layer(assets):
    lm = load_lm(assets["model"], LAYER, 48)
    assert len(lm.residual.base.layers) == LAYER + 1
    ran = []
    for name in ("norm", *(f"layers.{i}" for i in range(LAYER + 1))):
        lm.residual.base.get_submodule(name).register_forward_pre_hook(
            lambda m, a, n=name: ran.append(n))
    hidden = lm.residual(torch.tensor([[1, 5, 6, 7]]))
    assert hidden.shape == (1, 4, 64)
    assert ran == [f"layers.{i}" for i in range(LAYER + 1)]


def test_bos_excluded_and_ids_match_corpus(assets, store):
    tok = AutoTokenizer.from_pretrained(assets["model"])
    docs = list(shuffle_documents(iter_documents(assets["corpus"]), 16384, 0))
    assert [d.doc_id for d in docs] != sorted(d.doc_id for d in docs)
    for split in ("train", "eval"):
        cols = read_split(store, split)
        assert (cols["token_ids"] != tok.bos_token_id).all() and (cols["positions"] >= 1).all()
        # Packing: the split's documents, each followed by EOS, in the seeded document order.
        mine = [d for d in docs if document_split(d.doc_id, 0.25, 0) == split]
        stream = np.concatenate([tok(d.text, add_special_tokens=False)["input_ids"]
                                 + [tok.eos_token_id]
                                 for d in mine])
        owners = np.concatenate([[d.doc_id] * (len(tok(d.text)["input_ids"]) + 1) for d in mine])
        assert np.array_equal(cols["token_ids"], stream)
        assert np.array_equal(cols["doc_ids"], owners)
        assert store.n_rows(split) == len(stream)
    assert store.attrs["n_tokens"] == {s: store.n_rows(s) for s in ("train", "eval")}


def test_document_shuffle_exact_when_it_fits_buffered_beyond():
    docs = [Document(i, f"d{i}") for i in range(100)]
    exact = [d.doc_id for d in shuffle_documents(iter(docs), 100, 3)]
    assert sorted(exact) == list(range(100)) and exact != list(range(100))
    assert exact == [d.doc_id for d in shuffle_documents(iter(docs), 100, 3)]  # seeded
    assert exact != [d.doc_id for d in shuffle_documents(iter(docs), 100, 4)]
    streamed = [d.doc_id for d in shuffle_documents(iter(docs), 10, 3)]
    assert sorted(streamed) == list(range(100)) and streamed != list(range(100))
    # a document leaves the buffer only after it arrived: at most `buffer` places early
    assert all(pos >= doc - 10 for pos, doc in enumerate(streamed))
    assert [d.doc_id for d in shuffle_documents(iter(docs), 0, 3)] == list(range(100))


def test_truncated_extraction_of_a_topic_sorted_corpus_holds_every_topic(assets, tmp_path):
    """A corpus sorted by label (as embedded:wiki is), cut to a quarter of its tokens: the
    store's documents cover every label; in corpus order it would hold the first one only."""
    rows = sorted((json.loads(line) for line in open(assets["corpus"])),
                  key=lambda d: d["topic"])
    path = tmp_path / "sorted.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in rows))
    cfg = config(assets, corpus=str(path), max_tokens=600)
    info = extract_activations(cfg, tmp_path / "cut.zarr", progress=False)
    names = info.group["documents/label"].attrs["label_names"]
    label = info.group["documents/label"][:]
    seen = {names[label[d]] for s in ("train", "eval") for d in info.array(s, "doc_ids")[:]}
    assert seen == set(LABELS)
    ordered = extract_activations(config(assets, corpus=str(path), max_tokens=600,
                                         doc_shuffle_buffer=0),
                                  tmp_path / "ordered.zarr", progress=False)
    label = ordered.group["documents/label"][:]
    names = ordered.group["documents/label"].attrs["label_names"]
    seen = {names[label[d]] for s in ("train", "eval") for d in ordered.array(s, "doc_ids")[:]}
    assert len(seen) < len(LABELS)


def test_split_is_by_document_and_labels_kept(store):
    train = set(store.array("train", "doc_ids")[:].tolist())
    evals = set(store.array("eval", "doc_ids")[:].tolist())
    assert train and evals and not train & evals
    split = store.group["documents/split"][:]
    assert all(split[d] == 0 for d in train) and all(split[d] == 1 for d in evals)
    label = store.group["documents/label"]
    names = label.attrs["label_names"]
    assert sorted(names) == sorted(LABELS)
    docs = [json.loads(line) for line in open(store.attrs["corpus"])]
    assert [names[i] for i in label[:]] == [d["topic"] for d in docs]


def test_train_rows_shuffled_across_documents_eval_in_order(store):
    seq = store.array("train", "sequence_ids")[:]
    assert (np.diff(seq) < 0).any()
    ev = store.array("eval", "sequence_ids")[:]
    assert (np.diff(ev) >= 0).all()


def test_no_padding_batch_size_invariance(assets):
    """``cut`` sequences vary in length; nothing is padded, so rows match single-sequence
    passes."""
    stores = [read_split(extract_activations(config(assets, packing="cut", context_len=24,
                                                    batch_size=bs),
                                             assets["root"] / f"cut{bs}.zarr", progress=False),
                         "train")
              for bs in (1, 6)]
    assert len(np.unique(stores[0]["positions"])) > 2
    for key in ("token_ids", "doc_ids", "positions", "sequence_ids"):
        assert np.array_equal(stores[0][key], stores[1][key])
    # Equal-length sequences batched together may differ from a lone pass in the last float bit.
    np.testing.assert_allclose(stores[0]["activations"], stores[1]["activations"], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes_store_the_rounded_float32_rows(assets, store, dtype):
    half = extract_activations(config(assets, dtype=dtype), assets["root"] / f"{dtype}.zarr",
                               progress=False)
    assert half.attrs["dtype"] == dtype
    assert half.array("train").dtype == (np.uint16 if dtype == "bfloat16" else np.float16)
    assert half.array("train").attrs["logical_dtype"] == dtype
    got, ref = read_split(half, "eval"), read_split(store, "eval")
    want = torch.from_numpy(ref["activations"]).to(getattr(torch, dtype)).float().numpy()
    assert np.array_equal(got["activations"], want)


def test_non_finite_activations_name_the_rows(assets, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    with torch.no_grad():
        model.model.embed_tokens.weight[10].fill_(float("nan"))  # token "w6"
    model.save_pretrained(tmp_path / "nan_model")
    AutoTokenizer.from_pretrained(assets["model"]).save_pretrained(tmp_path / "nan_model")
    cfg = config(assets, model=str(tmp_path / "nan_model"))
    with pytest.raises(ExtractionError,
                       match=r"NaN or Inf activations in the train split .*sequence \d+, "
                             r"position \d+, document \d+"):
        extract_activations(cfg, tmp_path / "nan.zarr", progress=False)
    assert not (tmp_path / "nan.zarr").exists()
