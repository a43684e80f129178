"""The extract-activations and normalize stages, run through their Typer apps with a
params.yaml."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from stages import extract_activations, normalize
from tests.store_helpers import jsonl_corpus, tiny_llama


def test_stages_read_params_and_write_artifacts(tmp_path):
    params = tmp_path / "params.yaml"
    extract = {"model": tiny_llama(tmp_path / "model"), "layer": 1,
               "corpus": jsonl_corpus(tmp_path / "c.jsonl", n_docs=60), "context_len": 32,
               "max_tokens": 800, "eval_fraction": 0.2, "chunk_bytes": 4096, "shard_bytes": 32768}
    params.write_text(yaml.safe_dump({"extract": extract, "normalize": {"n_tokens": 300}}))
    store, norm = tmp_path / "act.zarr", tmp_path / "norm.json"
    runner = CliRunner()
    result = runner.invoke(extract_activations.app, ["--params", str(params), "--out", str(store)])
    assert result.exit_code == 0, result.output
    assert (json.loads((store / "zarr.json").read_text())["attributes"]["n_tokens"]
            == {"train": 640, "eval": 160})
    result = runner.invoke(normalize.app, ["--params", str(params), "--store", str(store),
                                           "--out", str(norm)])
    assert result.exit_code == 0, result.output
    assert json.loads(norm.read_text())["n_sample_tokens"] >= 300

    params.write_text(yaml.safe_dump({"extract": extract | {"layer": 2}}))
    result = runner.invoke(normalize.app, ["--params", str(params), "--store", str(store),
                                           "--out", str(norm)])
    assert result.exit_code == 2 and "written for layer 1" in result.output
    result = runner.invoke(extract_activations.app, ["--params", str(params), "--out", str(store),
                                                     "--dtype", "float64"])
    assert result.exit_code == 2 and "ExtractConfig.dtype = 'float64' is invalid" in result.output
