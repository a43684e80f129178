"""The paper's ablation family (Appendix F; METHOD §2) as DVC experiments, and their summary.

Each ablation is a set of ``params.yaml`` overrides, queued as ``dvc exp run --queue -n <name>
-S key=value ...``. ``rho`` and ``r`` (top-level keys) re-run the HSAE's side alone: train-hsae,
compute-metrics, export-hsae, evidence-hsae, judge-hsae and report. A ``hierarchy:`` change
(tree, similarity) also rebuilds the baseline's post-hoc forest and what follows from it; never
extraction or the baseline's training. The summary reads ``dvc exp show --json`` and tabulates
the reference run and every experiment, as a pandas DataFrame written as Markdown and CSV.

The third arm (issue 26): where an entry's metrics have ``diff_matryoshka`` (HSAE - Matryoshka,
paired), the table shows it beside the two arms' columns (:data:`MATRYOSHKA_COLUMNS`: the
point in the Markdown, the point and its 95% interval in the CSV); an entry from before the
Matryoshka shows ``-`` there. An HSAE ablation (``rho``, ``r``) re-runs the HSAE's side only, so
its ``matryoshka`` block is the reference run's and HSAE - Matryoshka moves with the HSAE alone.
"""

from __future__ import annotations

import pandas as pd

from hsae_core.pipeline.experiments import (
    commits,
    exp_run_command,
    experiments,
    flatten,
    fmt,
    get,
    to_markdown,
)

#: name -> overrides (paper Appendix F: constraint, perturbation, tree variants, similarity
#: metrics; plus sweeps of rho and r around the paper's 0.01 and 0.05).
ABLATIONS: dict[str, dict[str, object]] = {
    "no-constraint": {"rho": 0.0},
    "no-perturbation": {"r": 0.0},
    "fixed-tree": {"hierarchy.tree": "fixed"},
    "full-tree": {"hierarchy.tree": "full"},
    "binary-tree": {"hierarchy.tree": "binary"},
    "sim-decoder": {"hierarchy.similarity": "decoder"},
    "sim-coactivation": {"hierarchy.similarity": "coactivation"},
    **{f"rho-{v:g}": {"rho": v} for v in (0.001, 0.03, 0.1, 0.3)},
    **{f"r-{v:g}": {"r": v} for v in (0.01, 0.1, 0.2)},
}

#: (column, metric path in metrics/metrics.json) of the summary table.
COLUMNS = (
    ("Hamming", "hsae.mean.hamming"),
    ("P(p|c)", "hsae.mean.p_pc"),
    ("P(c|p)", "hsae.mean.p_cp"),
    ("FVE", "hsae.mean.fve"),
    ("L0", "hsae.mean.l0"),
    ("post-hoc Hamming", "posthoc.mean.hamming"),
    ("post-hoc P(p|c)", "posthoc.mean.p_pc"),
    ("post-hoc P(c|p)", "posthoc.mean.p_cp"),
)
#: (column, metric path) of HSAE - Matryoshka (issue 26), each with ``<column> lo`` / ``hi``
#: (its interval) in the CSV; kept apart from :data:`COLUMNS`, which rows saved before the third
#: arm (the report's ``--ablations``) hold in full.
MATRYOSHKA_COLUMNS = (
    ("HSAE - Matryoshka Hamming", "diff_matryoshka.hamming"),
    ("HSAE - Matryoshka P(p|c)", "diff_matryoshka.p_pc"),
    ("HSAE - Matryoshka P(p|c) pooled", "diff_matryoshka.p_pc_pooled"),
)
#: The interval columns of the CSV: (column, ``_lo`` / ``_hi`` suffix).
BOUNDS = (("lo", "_lo"), ("hi", "_hi"))


def queue_command(name: str, overrides: dict[str, object]) -> list[str]:
    """The ``dvc exp run --queue`` command line of one ablation."""
    return exp_run_command(name, overrides, queue=True)


def experiment_rows(exp_show: list[dict], metrics_file: str = "metrics/metrics.json",
                    params_file: str = "params.yaml") -> list[dict]:
    """One row per committed baseline revision and per finished experiment of ``dvc exp show
    --json`` (queued and running ones have no metrics of their own):
    ``{"name", "changed": {param: value differing from the baseline revision}, <COLUMNS>,
    <MATRYOSHKA_COLUMNS> and their "<column> lo" / "<column> hi">}`` (None where the metrics
    have no ``diff_matryoshka``)."""
    rows = []
    for commit in commits(exp_show, params_file, metrics_file):
        base = flatten(commit.params)
        started = [c for c in exp_show if c.get("rev") == commit.rev]  # its experiments
        for e in [commit] + experiments(started, None, params_file, metrics_file):
            params = flatten(e.params)
            row = {"name": e.name, "changed": {k: v for k, v in params.items()
                                               if base.get(k) != v}}
            row |= {col: get(e.metrics, path) for col, path in COLUMNS}
            for col, path in MATRYOSHKA_COLUMNS:
                row[col] = get(e.metrics, path)
                row |= {f"{col} {b}": get(e.metrics, path + end) for b, end in BOUNDS}
            rows.append(row)
    return rows


def _interval_columns() -> list[str]:
    return [f"{c} {b}" for c, _ in MATRYOSHKA_COLUMNS for b, _ in BOUNDS]


def frame(rows: list[dict]) -> pd.DataFrame:
    """:func:`experiment_rows` as a frame (the CSV): experiment, changed (``key=value, ...``;
    ``(reference)`` for a commit) and one column per :data:`COLUMNS` and
    :data:`MATRYOSHKA_COLUMNS` at full precision, then the latter's intervals (empty where a row
    has none: a row saved before the third arm)."""
    numeric = [c for c, _ in COLUMNS + MATRYOSHKA_COLUMNS] + _interval_columns()
    return pd.DataFrame([
        {"experiment": r["name"],
         "changed": ", ".join(f"{k}={v}" for k, v in sorted(r["changed"].items()))
         or "(reference)"} | {c: r.get(c) for c in numeric} for r in rows],
        columns=["experiment", "changed", *numeric]).astype({c: float for c in numeric})


def shown(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`frame` with its numbers to 4 significant digits (``-`` where missing), without the
    intervals (the CSV's)."""
    out = table.drop(columns=_interval_columns()).astype(object)
    for c, _ in COLUMNS + MATRYOSHKA_COLUMNS:
        out[c] = [fmt(v) for v in table[c]]
    return out


def format_rows(rows: list[dict]) -> str:
    """A markdown table of :func:`experiment_rows`."""
    return to_markdown(shown(frame(rows)))


__all__ = ["ABLATIONS", "COLUMNS", "MATRYOSHKA_COLUMNS", "experiment_rows", "format_rows",
           "frame", "queue_command", "shown"]
