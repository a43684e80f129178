"""The embedded default end to end: the real SmolLM2 GGUF over the wiki corpus (METHOD §6)."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch

from hsae_core.data.config import ExtractConfig
from hsae_core.data.corpus import CorpusError, embedded_wiki, iter_documents
from hsae_core.data.extract import extract_activations
from hsae_core.data.lm import ModelError, embedded_gguf
from hsae_core.data.reader import EvalActivations
from hsae_core.data.store import from_storage


def test_smollm2_gguf_on_wiki(tmp_path):
    try:
        embedded_gguf(), embedded_wiki()
    except (ModelError, CorpusError) as missing:
        pytest.skip(f"asset not installed: {missing}")
    cfg = ExtractConfig(layer=3, context_len=128, batch_size=2, max_tokens=400, eval_fraction=0.1,
                        dtype="bfloat16")
    store = extract_activations(cfg, tmp_path / "smollm2.zarr", progress=False)
    assert store.attrs["model"] == "embedded:smollm2" and store.attrs["n_layers"] == 30
    assert store.d_model == 576 and store.attrs["n_tokens"] == {"train": 360, "eval": 40}
    train = from_storage(store.array("train")[:], "bfloat16")
    norms = train.norm(dim=1)
    assert torch.isfinite(train).all()
    # The BOS row's norm is about 100x the others (METHOD §6); none is stored.
    assert (store.array("train", "token_ids")[:] != store.attrs["bos_token_id"]).all()
    assert norms.max() < 10 * norms.median()
    names, labels = (store.group["documents/label"].attrs["label_names"],
                     store.group["documents/label"][:])
    docs = list(islice(iter_documents("embedded:wiki"), store.attrs["n_documents"]))
    assert [names[code] for code in labels] == [d.label for d in docs]
    # the reader skips the rows flagged as attention sinks (METHOD §6; store attrs "outliers")
    sinks = store.attrs["outliers"]["rows"]["eval"]
    assert sinks == int(store.array("eval", "outlier")[:].sum())
    batch = next(iter(EvalActivations(store, 1.0, batch_size=40)))
    assert batch.activations.shape == (40 - sinks, 576)
    assert (np.diff(batch.positions.numpy()) == 1).any()
