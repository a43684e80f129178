"""benchmarks/topic_coherence_by_topic.py on a tiny finished run laid out like data/ (a labelled
synthetic store written with the extraction's writer, two small untrained models with post-hoc
forests): per-topic link counts add up to the scored links, the "all" row equals compute-metrics'
mean topic coherence, and every topic's numbers equal a brute-force recount from the store's
raw rows (document sets, parent topics and lift correlations by explicit loops)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from hsae_core.data.normalize import estimate_normalization
from hsae_core.data.store import Layout, StoreWriter, from_storage, open_store
from hsae_core.evaluation.compute import MetricsConfig, compute_metrics, json_safe
from hsae_core.evaluation.evaluate import active_mask
from hsae_core.model.config import HSAEConfig
from hsae_core.model.hsae import HSAE
from hsae_core.model.posthoc import posthoc_forest
from hsae_core.pipeline.io import load_hsae, save_hsae
from tests.store_helpers import LABELS

_spec = importlib.util.spec_from_file_location(
    "topic_coherence_by_topic",
    Path(__file__).resolve().parents[1] / "benchmarks" / "topic_coherence_by_topic.py")
tcbt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tcbt)

D, TOKENS, TRAIN_DOCS, EVAL_DOCS = 16, 12, 40, 90
METRICS = {"batch_size": 64, "lm_loss_tokens": 0, "bootstrap": 20, "link_min_docs": 4, "seed": 3}


def topical_store(path: Path):
    """Documents of 12 tokens in 3 topics (every 10th one unlabelled): a token is its topic's
    direction with a random magnitude (0 in a third of the tokens) plus noise."""
    rng = np.random.default_rng(0)
    dirs = np.linalg.qr(rng.standard_normal((D, D)))[0][:len(LABELS)] * 3.0
    n_docs = TRAIN_DOCS + EVAL_DOCS
    topic = np.arange(n_docs) % len(LABELS)
    label = np.where(np.arange(n_docs) % 10 == 9, -1, topic).astype(np.int32)
    layout = Layout(D, "float32", chunk_rows=64, shard_rows=256)
    writer = StoreWriter(path, layout, {"synthetic": True})
    for split, docs in (("train", np.arange(TRAIN_DOCS)),
                        ("eval", np.arange(TRAIN_DOCS, n_docs))):
        doc_ids = np.repeat(docs, TOKENS)
        amp = rng.exponential(1.0, len(doc_ids)) * (rng.random(len(doc_ids)) > 1 / 3)
        x = (dirs[topic[doc_ids]] * amp[:, None]
             + 0.5 * rng.standard_normal((len(doc_ids), D))).astype(np.float32)
        for start in range(0, len(x), layout.shard_rows):
            s = slice(start, start + layout.shard_rows)
            n = len(x[s])
            positions = np.tile(np.arange(1, TOKENS + 1, dtype=np.int32), n // TOKENS + 1)[:n]
            writer.write_shard(split, start, x[s], {
                "token_ids": np.zeros(n, np.int32), "doc_ids": doc_ids[s],
                "positions": positions,
                "sequence_ids": doc_ids[s], "outlier": np.zeros(n, np.uint8)})
        writer.mark(split, len(x), int(docs[-1]), done=True)
    writer.write_documents((np.arange(n_docs) >= TRAIN_DOCS).astype(np.uint8), label, LABELS)
    rows = {"train": TRAIN_DOCS * TOKENS, "eval": EVAL_DOCS * TOKENS}
    writer.commit({"model": "synthetic", "layer": 0, "hook": "synthetic", "d_model": D,
                   "n_layers": 1, "dtype": "float32", "storage_dtype": "float32",
                   "context_len": TOKENS, "corpus": "synthetic", "n_tokens": rows,
                   "n_documents": n_docs, "bos_token_id": 0, "eos_token_id": 0,
                   "bos_excluded": True, "shuffled": {"train": False, "eval": False},
                   "chunk_rows": layout.chunk_rows, "shard_rows": layout.shard_rows,
                   "extract_config": {}, "outliers": {"norm_ratio": None}})
    return open_store(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run in a repo root: params.yaml, data/{activations.zarr, normalization.json,
    hsae, posthoc} and metrics/metrics.json from compute_metrics."""
    root = tmp_path_factory.mktemp("tcbt")
    (root / "params.yaml").write_text(yaml.safe_dump({"metrics": METRICS}))
    store = topical_store(root / "data" / "activations.zarr")
    norm = estimate_normalization(store)
    norm.save(root / "data" / "normalization.json")
    for name, seed in (("hsae", 0), ("posthoc", 1)):
        model = HSAE(HSAEConfig(d_model=D, level_sizes=(8, 16, 32), target_l0=3.0,
                                threshold_init=0.3, seed=seed))
        model.forest = posthoc_forest(model, "encoder", 0.2, "partial")
        save_hsae(model, root / "data" / name)
    models = {m: load_hsae(root / "data" / m) for m in tcbt.MODELS}
    metrics = compute_metrics(models, store, norm.scale, MetricsConfig(**METRICS))
    (root / "metrics").mkdir()
    (root / "metrics" / "metrics.json").write_text(json.dumps(json_safe(metrics)))
    out = root / "results" / "by_topic.json"
    res = CliRunner().invoke(tcbt.app, ["--root", str(root), "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return {"root": root, "store": store, "scale": norm.scale, "metrics": metrics,
            "result": json.loads(out.read_text()), "output": res.output, "models": models}


def brute(model, store, scale, min_docs: int, alpha: float = 1.0):
    """Per pair, per scored link: (parent's top label or -1, topic coherence or NaN), and the
    eval documents' labels, by explicit loops over the store's raw eval rows."""
    x = from_storage(store.array("eval")[:], store.dtype) * scale
    doc_of = store.array("eval", "doc_ids")[:]
    docs = np.unique(doc_of)
    label_of = store.group["documents/label"][:]
    labels = label_of[docs]
    T = len(LABELS)
    with torch.no_grad():
        _, actives = active_mask(model, x)
    fires = [np.array([a[doc_of == d].any(0).numpy() for d in docs]) for a in actives]  # [docs, n]
    base = np.array([(labels == t).sum() for t in range(T)], float)
    base /= base.sum()

    def per_label(f):
        return np.array([(f & (labels == t)).sum() for t in range(T)], float)

    def lift(f):
        n = per_label(f)
        return (n + alpha * base) / (n.sum() + alpha) / base

    pairs = []
    for l, parent_of in enumerate(model.forest.parent_of):
        topic, coh = [], []
        for c, p in enumerate(parent_of.tolist()):
            fp, fc = fires[l][:, p], fires[l + 1][:, c]
            if p < 0 or fp.sum() < min_docs or fc.sum() < min_docs:
                continue
            n = per_label(fp)
            topic.append(int(np.argmax(n)) if n.sum() > 0 else -1)  # ties: the lower label
            a, b = lift(fp), lift(fc)
            coh.append(float(np.corrcoef(a, b)[0, 1]) if np.ptp(a) > 1e-9 and np.ptp(b) > 1e-9
                       else math.nan)
        pairs.append((topic, coh))
    return pairs, labels


def close(a, b, tol=1e-9) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= tol


def test_all_row_equals_compute_metrics_and_counts_add_up(run):
    res, metrics = run["result"], run["metrics"]
    for name in tcbt.MODELS:
        topics = res["models"][name]
        rows = {k: v for k, v in topics.items() if k != "all"}
        want = metrics[name]["mean"]["topic_coherence"]
        assert close(topics["all"]["coherence"], want), (name, topics["all"], want)
        assert res["check"][name]["metrics_json_match"] is True
        assert topics["all"]["links"] == metrics[name]["mean"]["links_scored"] > 10
        assert sum(v["links"] for v in rows.values()) == topics["all"]["links"]
        assert sum(v["links_coherent"] for v in rows.values()) == topics["all"]["links_coherent"]
        for l in range(2):
            pair = f"pair{l}"
            assert close(topics["all"][pair]["coherence"], metrics[name][pair]["topic_coherence"])
            assert topics["all"][pair]["links"] == metrics[name][pair]["links_scored"]
            assert sum(v[pair]["links"] for v in rows.values()) == topics["all"][pair]["links"]
        assert len(rows) >= 2  # the links spread over several topics
    assert sum(v for k, v in res["eval_docs"].items() if k != "all") == EVAL_DOCS
    assert res["eval_docs"]["all"] == res["eval_documents"] == EVAL_DOCS
    assert "| all | 90 |" in run["output"]


def test_every_topic_matches_a_brute_force_recount(run):
    res = run["result"]
    for name in tcbt.MODELS:
        pairs, labels = brute(run["models"][name], run["store"], run["scale"],
                              METRICS["link_min_docs"])
        got = res["models"][name]
        keys = {(LABELS[t] if t >= 0 else tcbt.NO_LABEL) for topic, _ in pairs for t in topic}
        assert set(got) == keys | {"all"}
        for key in [*keys, "all"]:
            per_pair = []
            links = coherent = 0
            pooled = []
            for l, (topic, coh) in enumerate(pairs):
                vals = [c for t, c in zip(topic, coh)
                        if key == "all" or (LABELS[t] if t >= 0 else tcbt.NO_LABEL) == key]
                ok = [c for c in vals if not math.isnan(c)]
                links, coherent, pooled = links + len(vals), coherent + len(ok), pooled + ok
                assert got[key][f"pair{l}"]["links"] == len(vals)
                assert close(got[key][f"pair{l}"]["coherence"],
                             sum(ok) / len(ok) if ok else None, 1e-9), (name, key, l)
                if ok:
                    per_pair.append(sum(ok) / len(ok))
            assert (got[key]["links"], got[key]["links_coherent"]) == (links, coherent)
            assert close(got[key]["coherence"],
                         sum(per_pair) / len(per_pair) if per_pair else None), (name, key)
            assert close(got[key]["coherence_pooled"],
                         sum(pooled) / len(pooled) if pooled else None), (name, key)
        for t, topic in enumerate(LABELS):
            assert res["eval_docs"][topic] == int((labels == t).sum())
        assert res["eval_docs"][tcbt.NO_LABEL] == int((labels < 0).sum()) > 0


def test_group_by_topic_on_a_hand_worked_case():
    nan = math.nan
    pairs = [([0, 0, 1, -1], [0.5, 0.1, nan, 0.9]), ([1, 1, 0], [0.2, 0.4, 1.0])]
    got = tcbt.group_by_topic(pairs, ["a", "b"])
    assert list(got) == ["a", "b", tcbt.NO_LABEL, "all"]
    assert (got["a"]["links"], got["a"]["links_coherent"]) == (3, 3)
    assert got["a"]["coherence"] == pytest.approx((0.3 + 1.0) / 2)
    assert got["a"]["coherence_pooled"] == pytest.approx(1.6 / 3)
    # b: pair 0's only link has no coherence, so b's mean is pair 1's alone
    assert (got["b"]["links"], got["b"]["links_coherent"]) == (3, 2)
    assert got["b"]["coherence"] == pytest.approx(0.3)
    assert (got["b"]["pair0"]["links"], got["b"]["pair0"]["links_coherent"]) == (1, 0)
    assert math.isnan(got["b"]["pair0"]["coherence"])
    assert got["all"]["links"] == 7
    assert got["all"]["coherence"] == pytest.approx(((0.5 + 0.1 + 0.9) / 3 + 1.6 / 3) / 2)
