"""Topic coherence of parent-child links per topic, for a finished pipeline run.

    python benchmarks/topic_coherence_by_topic.py [--root .]
        [--out results/topic_coherence_by_topic.json]

Reads ``<root>/params.yaml`` (section ``metrics``), ``data/activations.zarr``,
``data/normalization.json``, ``data/hsae`` and ``data/posthoc`` as compute-metrics does, and
only reads there. Per model: one eval pass (``count_model`` over ``eval_batches``), the per-link
topic coherence on the full eval sample (``semantic_replicates`` with unit weights and
compute-metrics' SemanticConfig: ``link_min_docs``, ``seed``), each scored link assigned to the
topic its PARENT's eval documents fall in most often (``top_labels``' first entry; "(no label)"
when none of them carries a label). Per topic: eval documents, scored links pooled over level
pairs, links with a defined coherence, and the mean coherence computed as compute-metrics
computes its mean (per pair the mean over links with a defined coherence, then the mean over
pairs that have one; ``coherence_pooled``: over the pooled links). The "all" row is asserted to
equal the library's ``mean/topic_coherence`` and compared with ``metrics/metrics.json`` when
that file exists. Writes the JSON atomically and prints a Markdown table.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsae_core.common import fsio  # noqa: E402
from hsae_core.data.normalize import resolve_scale  # noqa: E402
from hsae_core.data.store import StoreInfo, open_store  # noqa: E402
from hsae_core.evaluation.bootstrap import doc_weights  # noqa: E402
from hsae_core.evaluation.compute import (  # noqa: E402
    MetricsConfig,
    eval_batches,
    eval_labels,
    json_safe,
)
from hsae_core.evaluation.evaluate import count_model  # noqa: E402
from hsae_core.evaluation.semantic import (  # noqa: E402
    SemanticConfig,
    doc_indicator,
    semantic_replicates,
)
from hsae_core.model.hsae import HSAE  # noqa: E402
from hsae_core.pipeline.io import load_for_store  # noqa: E402
from hsae_core.pipeline.params import load_params, section_config  # noqa: E402
from hsae_core.site.semantic_view import top_labels  # noqa: E402

MODELS = ("hsae", "posthoc")
NO_LABEL = "(no label)"
#: |ours - library| allowed for the "all" mean (the same float64 values, summed in another order).
TOL = 1e-9

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def group_by_topic(pairs: list[tuple[list[int], list[float]]], topics: list[str]) -> dict:
    """Per topic (``topics[t]``; -1: :data:`NO_LABEL`) and ``"all"``, from per pair the parent
    topic and topic coherence (NaN: undefined) of each scored link: ``links`` (scored, pooled
    over pairs), ``links_coherent`` (with a defined coherence), ``coherence`` (per pair the mean
    over the coherent links, then the mean over the pairs that have one: compute-metrics'
    ``mean/topic_coherence``), ``coherence_pooled`` (the mean over the pooled coherent links)
    and ``pair<l>`` (per pair: links, links_coherent, coherence)."""
    keys = sorted({int(t) for topic, _ in pairs for t in topic}, key=lambda t: (t < 0, t))
    out = {}
    for key in [*keys, None]:  # None: every link
        per_pair, pooled, scored = [], [], 0
        for topic, coh in pairs:
            vals = [c for t, c in zip(topic, coh) if key is None or int(t) == key]
            ok = [c for c in vals if not math.isnan(c)]
            per_pair.append({"links": len(vals), "links_coherent": len(ok),
                             "coherence": _mean(ok)})
            pooled += ok
            scored += len(vals)
        means = [p["coherence"] for p in per_pair if not math.isnan(p["coherence"])]
        name = "all" if key is None else topics[key] if key >= 0 else NO_LABEL
        out[name] = {"links": scored, "links_coherent": len(pooled), "coherence": _mean(means),
                     "coherence_pooled": _mean(pooled)}
        out[name] |= {f"pair{l}": p for l, p in enumerate(per_pair)}
    return out


def model_topics(model: HSAE, store: StoreInfo, scale: float, cfg: MetricsConfig,
                 names: list[str]) -> tuple[dict, np.ndarray, float]:
    """One model: :func:`group_by_topic` of its scored links, the eval documents' labels, and
    the library's full-sample ``mean/topic_coherence``."""
    counts = count_model(model.to(cfg.device), eval_batches(store, scale, cfg))
    docs = counts.documents()
    labels, n_labels = eval_labels(store, docs)
    sem = SemanticConfig(cfg.link_min_docs, seed=cfg.seed)
    reps, links = semantic_replicates(counts, doc_weights(docs.numel(), 0, cfg.seed), labels,
                                      n_labels, sem)
    pairs = []
    for pair, link in enumerate(links):
        top = top_labels(doc_indicator(counts, pair), labels, n_labels, sem.min_docs, k=1)
        topic = [top[p][0][0] if top[p] else -1 for p in link["parents"]]
        pairs.append((topic, [float(c) for c in link["topic_coherence"]]))
    return group_by_topic(pairs, names), labels.numpy(), float(reps["mean/topic_coherence"][0])


def by_topic(root: Path) -> dict:
    """Every number of the report, for the pipeline run in ``root``."""
    cfg = section_config(load_params(root / "params.yaml"), "metrics", MetricsConfig)
    store_path = root / "data" / "activations.zarr"
    info = open_store(store_path)
    names = [str(n) for n in info.group["documents/label"].attrs.get("label_names", [])]
    if not names:
        raise ValueError(f"{store_path} has no document labels: topic coherence is unavailable")
    scale = resolve_scale(root / "data" / "normalization.json", info)
    models = load_for_store({m: root / "data" / m for m in MODELS}, info.d_model, store_path,
                            cfg.device)
    reported = root / "metrics" / "metrics.json"
    reported = fsio.read_json(reported) if reported.is_file() else {}
    out: dict = {"root": str(root), "link_min_docs": cfg.link_min_docs, "seed": cfg.seed,
                 "eval_tokens": cfg.eval_tokens, "labels": names, "models": {}, "check": {}}
    doc_labels = None
    for name in MODELS:
        topics, labels, library = model_topics(models[name], info, scale, cfg, names)
        if doc_labels is not None and not np.array_equal(doc_labels, labels):
            raise AssertionError("the two models' eval passes saw different documents")
        doc_labels = labels
        ours = topics["all"]["coherence"]
        if not (math.isclose(ours, library, rel_tol=0, abs_tol=TOL)
                or (math.isnan(ours) and math.isnan(library))):
            raise AssertionError(f"{name}: all-topic mean {ours} != the library's {library}")
        saved = reported.get(name, {}).get("mean", {}).get("topic_coherence")
        out["models"][name] = topics
        out["check"][name] = {"all": ours, "library_mean": library, "metrics_json": saved,
                              "metrics_json_match": None if saved is None
                              else math.isclose(ours, saved, rel_tol=0, abs_tol=1e-6)}
    out["eval_documents"] = int(doc_labels.size)
    out["eval_docs"] = {names[t]: int((doc_labels == t).sum()) for t in range(len(names))}
    if (doc_labels < 0).any():
        out["eval_docs"][NO_LABEL] = int((doc_labels < 0).sum())
    out["eval_docs"]["all"] = int(doc_labels.size)
    return out


def table(result: dict) -> pd.DataFrame:
    """One row per topic (label order, then :data:`NO_LABEL` if any, then ``all``)."""
    rows = list(result["eval_docs"])
    rows += [k for m in MODELS for k in result["models"][m] if k not in rows]
    rows.remove("all")
    rows.append("all")

    def cell(model: str, topic: str, key: str):
        return result["models"][model].get(topic, {}).get(key, 0 if key == "links" else math.nan)

    return pd.DataFrame({
        "topic": rows,
        "eval docs": [result["eval_docs"].get(t, 0) for t in rows],
        "HSAE links": [cell("hsae", t, "links") for t in rows],
        "HSAE coherence": [cell("hsae", t, "coherence") for t in rows],
        "post-hoc links": [cell("posthoc", t, "links") for t in rows],
        "post-hoc coherence": [cell("posthoc", t, "coherence") for t in rows],
    })


def markdown(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(frame.columns) + " |"
    lines = [head, "|---|" + "---:|" * (len(frame.columns) - 1)]
    for row in frame.itertuples(index=False):
        cells = [f"{v:.4f}" if isinstance(v, float) and not math.isnan(v)
                 else "n/a" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@app.command()
def main(root: Path = typer.Option(Path("."), help="repository root of a finished run"),
         out: Path = typer.Option(Path("results/topic_coherence_by_topic.json"),
                                  help="result JSON (written atomically)")) -> None:
    try:
        result = by_topic(root.resolve())
    except (ValueError, FileNotFoundError) as err:  # StoreError, ConfigError: ValueErrors
        print(f"topic_coherence_by_topic: {err}", file=sys.stderr)
        raise typer.Exit(2) from err
    fsio.write_json(out, json_safe(result))  # a temporary file renamed into place
    print(markdown(table(result)))
    print(f"\nlinks: scored links pooled over level pairs, by their parent's most frequent "
          f"document label; coherence: mean over pairs of each pair's mean (as metrics.json's "
          f"mean.topic_coherence); link_min_docs {result['link_min_docs']}, "
          f"{result['eval_documents']} eval documents")
    for name, check in result["check"].items():
        if check["metrics_json_match"] is False:
            print(f"warning: {name} all = {check['all']:.6f} but metrics.json says "
                  f"{check['metrics_json']:.6f} (stale metrics or other params)", file=sys.stderr)
    print(f"wrote {out}")


if __name__ == "__main__":
    app()
