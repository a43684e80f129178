"""The paper's ablation family (Appendix F; METHOD §2) as DVC experiments, and their summary.

Each ablation is a set of ``params.yaml`` overrides, queued as ``dvc exp run --queue -n <name>
-S key=value ...``. ``rho`` and ``r`` (top-level keys) re-run the HSAE's side alone: train-hsae,
compute-metrics, export-hsae, evidence-hsae, judge-hsae and report. A ``hierarchy:`` change
(tree, similarity) also rebuilds the baseline's post-hoc forest and what follows from it; never
extraction or the baseline's training. The summary reads ``dvc exp show --json`` and tabulates
the reference run and every experiment.
"""

from __future__ import annotations

import math

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


def queue_command(name: str, overrides: dict[str, object]) -> list[str]:
    """The ``dvc exp run --queue`` command line of one ablation."""
    cmd = ["dvc", "exp", "run", "--queue", "-n", name]
    for key, value in overrides.items():
        cmd += ["-S", f"{key}={value}"]
    return cmd


def _get(tree: dict, path: str):
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def experiment_rows(exp_show: list[dict], metrics_file: str = "metrics/metrics.json",
                    params_file: str = "params.yaml") -> list[dict]:
    """One row per committed baseline revision and per experiment of ``dvc exp show --json``:
    ``{"name", "changed": {param: value differing from the baseline revision}, <COLUMNS>}``."""
    rows = []
    for commit in exp_show:
        if commit.get("rev") == "workspace" or not commit.get("data"):
            continue
        base = _flatten((commit["data"].get("params", {}).get(params_file) or {}).get("data")
                        or {})
        entries = [(commit.get("name") or commit["rev"][:7], commit["data"])]
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("data"):
                    entries.append((rev.get("name") or rev["rev"][:7], rev["data"]))
        for name, data in entries:
            params = _flatten((data.get("params", {}).get(params_file) or {}).get("data") or {})
            metrics = (data.get("metrics", {}).get(metrics_file) or {}).get("data") or {}
            row = {"name": name, "changed": {k: v for k, v in params.items() if base.get(k) != v}}
            row |= {col: _get(metrics, path) for col, path in COLUMNS}
            rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    """A markdown table of :func:`experiment_rows`."""
    head = ["experiment", "changed"] + [c for c, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        changed = ", ".join(f"{k}={v}" for k, v in sorted(row["changed"].items())) or "(reference)"
        cells = [row["name"], changed] + [_fmt(row[c]) for c, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}" if abs(v) >= 10 else f"{v:.4f}"


__all__ = ["ABLATIONS", "COLUMNS", "experiment_rows", "format_rows", "queue_command"]
