"""The scale study (issue 14): does the HSAE's consistency lead over the post-hoc forest grow
with training tokens, toward the paper's 41% lower Hamming at 100M tokens (Table 1)?

Each run is a DVC experiment on the embedded model that changes only the training length
(``sae.total_steps``) and the paper's ``rho`` (0.01, and 0.1), on one larger extraction shared by
every run (``STUDY_PARAMS``: 1.14M tokens, of which 9% of the documents and tokens form a ~103k
eval split as large as the reference run's), so the longest run still sees the train tokens at
most ~4 times. Everything else stays at ``params.yaml``'s values: warm-up, resampling and the
sparsity controller's schedule scale with the run; the hierarchy update interval and the dead
window stay fixed in steps and tokens. The study's compute-metrics draws 200 bootstrap replicates
(the reference: 1000) and skips the spliced next-token loss, which the study does not read.

The third arm (issue 26): where a run's metrics.json has the Matryoshka's block and HSAE -
Matryoshka (``matryoshka``, ``diff_matryoshka``), its row carries them like ``posthoc`` and
``diff``, and the tables add them (:data:`MATRYOSHKA_GROUPS`); results collected before it
(results/scale_study.json) lack them and their tables stay as they were. The Matryoshka trains
on ``sae.total_steps`` too, so it is trained once per length, as the baseline is.

Runs are executed one after another in the workspace, ordered by length, so DVC re-uses the
extraction for every run and each length's baseline for both values of rho (its ``dvc.lock``
entry is unchanged); DVC's queue would start each run from the committed reference in its own
folder and re-train the baseline every time (persisted checkpoint outputs have no run cache).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from hsae_core.pipeline.experiments import exp_run_command, experiments, to_markdown

#: Overrides shared by every run of the study (on top of params.yaml).
STUDY_PARAMS: dict[str, object] = {
    "extract.max_tokens": 1_140_000,
    "extract.eval_fraction": 0.09,
    "metrics.bootstrap": 200,
    "metrics.lm_loss_tokens": 0,
}
#: Experiment names: scale-<steps>-rho<rho>.
PREFIX = "scale-"
#: Training lengths in steps of sae.batch_size (1024) tokens: 0.51M, 1.02M, 4.10M tokens (8x).
STEPS = (500, 1000, 4000)
#: The paper's rho, and the ablation that moved the metrics most in the reference run.
RHOS = (0.01, 0.1)
#: The paper's training length (§4: 100M tokens), where the trend is extrapolated to.
PAPER_TOKENS = 100_000_000
#: (key in metrics.json's model groups, label) read by the table, the figure and the fit.
METRICS = (
    ("hamming", "Hamming"),
    ("p_pc_pooled", "P(p|c) pooled"),
    ("p_pc", "P(p|c) macro"),
    ("topic_coherence", "topic coherence"),
    ("doc_cooccurrence", "doc co-occurrence"),
    ("fve", "FVE"),
    ("l0", "L0"),
)

#: Keys kept per model in a row: the metrics and the semantic scores' random controls.
KEPT = {k for k, _ in METRICS} | {"topic_coherence_random", "doc_cooccurrence_random"}
#: Groups of a row: every run has the first three (:data:`MATRYOSHKA_GROUPS` where the run's
#: metrics.json has them).
GROUPS = ("hsae", "posthoc", "diff")
#: The third arm's groups: its means and HSAE - Matryoshka (issue 26).
MATRYOSHKA_GROUPS = ("matryoshka", "diff_matryoshka")


def run_name(steps: int, rho: float) -> str:
    return f"{PREFIX}{steps}-rho{rho:g}"


def runs(steps=STEPS, rhos=RHOS, params: dict | None = None
         ) -> list[tuple[str, dict[str, object]]]:
    """``(experiment name, -S overrides)`` in run order (length-major: both rho values of a
    length run back to back, sharing that length's baseline). ``params`` replaces
    :data:`STUDY_PARAMS` (a smaller project, a test)."""
    shared = STUDY_PARAMS if params is None else params
    return [(run_name(n, rho), {**shared, "sae.total_steps": n, "rho": rho})
            for n in steps for rho in rhos]


def run_command(name: str, overrides: dict[str, object], queue: bool = False) -> list[str]:
    """``dvc exp run`` of one run, stopping after compute-metrics (no export, evidence, judge or
    report: the study reads metrics/metrics.json only)."""
    return exp_run_command(name, overrides, queue=queue, target="compute-metrics")


def budget(extract_tok_s: float = 760.0, step_s: float = 0.265, metrics_s: float = 240.0,
           posthoc_s: float = 60.0, steps=STEPS, rhos=RHOS,
           matryoshka: bool = True) -> dict[str, float]:
    """Estimated CPU wall time (seconds) of the study on the 2-core reference machine, from the
    reference run's rates: extraction ~760 tokens/s (its log: 338k tokens in 10 min 19 s),
    ~0.265 s per step for either model,
    compute-metrics and the post-hoc forest per run / per length. With ``matryoshka`` (the
    pipeline's train-matryoshka, issue 26) also the Matryoshka's training and its groups' forest
    per length, assumed at the baseline's rates (compute-metrics' third model is not counted)."""
    extract = STUDY_PARAMS["extract.max_tokens"] / extract_tok_s
    hsae = sum(steps) * len(rhos) * step_s
    baseline = sum(steps) * step_s
    out = {"extract": extract, "train_hsae": hsae, "train_baseline": baseline,
           "posthoc": posthoc_s * len(steps), "metrics": metrics_s * len(steps) * len(rhos)}
    if matryoshka:
        out["train_matryoshka"] = baseline
        out["matryoshka_forest"] = posthoc_s * len(steps)
    out["total"] = sum(out.values())
    return out


def study_rows(exp_show: list[dict], metrics_file: str = "metrics/metrics.json",
               params_file: str = "params.yaml") -> list[dict]:
    """One row per finished study experiment (named ``scale-...``) with metrics in ``dvc exp
    show --json``: name, steps, tokens, rho,
    epochs, and for each of ``METRICS`` the HSAE's and the post-hoc forest's value with interval
    and the paired difference (``{"hsae": {...}, "posthoc": {...}, "diff": {...}}``; also
    ``"matryoshka"`` and ``"diff_matryoshka"`` where the run's metrics have them), sorted by
    rho then steps."""
    rows = [_row(e.name, e.params, e.metrics)
            for e in experiments(exp_show, PREFIX, params_file, metrics_file) if e.metrics]
    return sorted(rows, key=lambda r: (r["rho"], r["steps"]))


def _row(name: str, params: dict, metrics: dict) -> dict:
    sae, extract = params["sae"], params["extract"]
    tokens = int(sae["total_steps"]) * int(sae["batch_size"])
    row = {"name": name, "steps": int(sae["total_steps"]), "tokens": tokens,
           "rho": float(params["rho"]), "max_tokens": int(extract["max_tokens"]),
           "eval_tokens": metrics.get("eval_tokens"),
           "train_tokens": None}  # the run log's (stages.scale_study collect)
    for group in GROUPS + MATRYOSHKA_GROUPS:
        if group not in metrics and group in MATRYOSHKA_GROUPS:
            continue  # a run from before the third arm
        source = metrics[group] if group.startswith("diff") else metrics[group]["mean"]
        row[group] = {k: v for k, v in source.items() if _base(k) in KEPT}
    return row


def groups(rows: list[dict]) -> tuple[str, ...]:
    """The groups the tables show: :data:`GROUPS`, and :data:`MATRYOSHKA_GROUPS` when any row
    has them (a row without them shows ``-``)."""
    has = any(g in r for r in rows for g in MATRYOSHKA_GROUPS)
    return GROUPS + (MATRYOSHKA_GROUPS if has else ())


def _base(key: str) -> str:
    return key[:-3] if key.endswith(("_lo", "_hi")) else key


def relative_gap(row: dict, key: str = "hamming", other: str = "posthoc") -> float:
    """(HSAE - post-hoc) / post-hoc of one metric: the paper's Table 1 gives -41% for Hamming
    (21.3 vs 36.1) at 100M tokens. ``other="matryoshka"``: (HSAE - Matryoshka) / Matryoshka
    (NaN where the row has no Matryoshka)."""
    diff = "diff" if other == "posthoc" else f"diff_{other}"
    if diff not in row or other not in row:
        return math.nan
    return row[diff][key] / row[other][key]


def trend(rows: list[dict], key: str = "hamming", at: int = PAPER_TOKENS,
          target: float = -0.41, other: str = "posthoc") -> dict[str, float]:
    """Least-squares line of ln(HSAE / post-hoc) against log10(training tokens) over ``rows``
    (one rho): a power law of the ratio, the simplest curve three lengths can pin down that keeps
    the gap above -100%. Returns its slope, the gap it predicts at ``at`` tokens and the tokens
    at which it reaches ``target`` (the paper's -41% Hamming); its error grows with the distance
    extrapolated. ``other="matryoshka"``: the ratio HSAE / Matryoshka instead."""
    x = np.log10([r["tokens"] for r in rows])
    y = np.log([1.0 + relative_gap(r, key, other) for r in rows])
    slope, intercept = np.polyfit(x, y, 1)
    reach = (math.log(1.0 + target) - intercept) / slope if slope else math.nan
    return {"slope_per_decade": float(slope), "intercept": float(intercept),
            "at_tokens": at, "predicted": float(math.exp(intercept + slope * math.log10(at)) - 1),
            "target": target, "tokens_at_target": float(10 ** reach)}


def frame(rows: list[dict]) -> pd.DataFrame:
    """The rows as a frame at full precision (the CSV): one row per run with name, rho, steps,
    tokens, train tokens, epochs, for each of ``METRICS`` ``<key>_<group>`` with ``_lo`` /
    ``_hi`` (groups hsae, posthoc, diff; then matryoshka and diff_matryoshka where a row has
    them: :func:`groups`), and the relative Hamming gap (``hamming_gap_matryoshka``: against the
    Matryoshka)."""
    names = groups(rows)
    out = []
    for r in rows:
        epochs = r["tokens"] / r["train_tokens"] if r.get("train_tokens") else math.nan
        row = {"name": r["name"], "rho": r["rho"], "steps": r["steps"], "tokens": r["tokens"],
               "train_tokens": r.get("train_tokens"), "epochs": epochs}
        for key, _ in METRICS:
            for group in names:
                for end in ("", "_lo", "_hi"):
                    row[f"{key}_{group}{end}"] = r.get(group, {}).get(f"{key}{end}", math.nan)
        row["hamming_gap"] = relative_gap(r)
        if MATRYOSHKA_GROUPS[0] in names:
            row["hamming_gap_matryoshka"] = relative_gap(r, other="matryoshka")
        out.append(row)
    return pd.DataFrame(out)


def shown(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`frame` for reading: one row per run, HSAE / post-hoc [interval] per metric (L0
    included: Hamming grows with it) and the relative Hamming gap; where the frame has the
    Matryoshka, HSAE / post-hoc / Matryoshka and a second gap, HSAE against the Matryoshka."""
    metrics = METRICS[:5] + METRICS[6:]
    arms = ("hsae", "posthoc") + (("matryoshka",) if "hamming_matryoshka" in table else ())
    out = []
    for _, r in table.iterrows():
        cells = {"rho": f"{r['rho']:g}", "train tokens": f"{r['tokens'] / 1e6:.2f}M",
                 "epochs": f"{r['epochs']:.2f}"}
        for key, label in metrics:
            cells[label] = " / ".join(_cell(r, key, arm) for arm in arms)
        cells["Hamming gap"] = _pct(r["hamming_gap"])
        if "hamming_gap_matryoshka" in table:
            cells["Hamming gap vs Matryoshka"] = _pct(r["hamming_gap_matryoshka"])
        out.append(cells)
    return pd.DataFrame(out)


def format_table(rows: list[dict]) -> str:
    """Markdown of :func:`shown`."""
    return to_markdown(shown(frame(rows)))


def _pct(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:+.1f}%"


def _cell(r: pd.Series, key: str, group: str) -> str:
    v, lo, hi = (r.get(f"{key}_{group}{end}") for end in ("", "_lo", "_hi"))
    if v is None or math.isnan(v):
        return "-"
    f = (lambda x: f"{x:.2f}") if abs(v) >= 1 else (lambda x: f"{x:.3f}")
    return f(v) + ("" if lo is None or hi is None or math.isnan(lo) or math.isnan(hi)
                   else f" [{f(lo)}, {f(hi)}]")


__all__ = ["GROUPS", "MATRYOSHKA_GROUPS", "METRICS", "PAPER_TOKENS", "RHOS", "STEPS",
           "STUDY_PARAMS", "budget", "format_table", "frame", "groups", "relative_gap",
           "run_command", "runs", "shown", "study_rows", "trend"]
