"""The seed study (issue 22): how much of a result is training noise? Every headline metric of
each arm (the HSAE, the post-hoc baseline and, where a run's metrics.json has it, issue 26's
Matryoshka) and every paired difference of the HSAE with another arm (HSAE - post-hoc, HSAE -
Matryoshka) over several training seeds at the embedded default, with an interval that covers
both sources of noise, and the verdict that ends ``make repro``.

**Runs.** Each seed is a DVC experiment ``seed-<s>`` that changes ``sae.seed`` alone and stops
after compute-metrics (``dvc exp run -n seed-<s> -S sae.seed=<s> compute-metrics``). The seed
drives everything random in training, for every arm: the initialisation (``HSAE.__init__``;
the Matryoshka's through ``MatryoshkaConfig.from_hsae``), the perturbation's swap draws and
dead-feature resampling (``Trainer``: ``seed + 1``, ``seed + 2``), the train reader's data order
(``train_on_store`` and the Matryoshka's training pass ``cfg.seed`` to ``TrainActivations``,
whose order is fixed by ``(seed, epoch)``) and the post-hoc forests' token streams
(``build-posthoc-trees``: the baseline's ``cfg.seed``; the Matryoshka's groups carry the same).
The extraction, the eval documents and the jackknife's grouping of documents (``metrics.seed``)
stay those of the reference run, so every seed is scored on the same documents with the same
replicates. The committed reference run is the seed ``params.yaml`` holds (0): it is read from
the commit, not re-run.

**Combined interval.** For a metric with per-seed values ``x_1..x_n`` (mean ``m``, sample sd
``s``) and per-seed 95% document intervals ``[lo_i, hi_i]`` (compute-metrics' bias-corrected
jackknife over eval documents, hsae_core.evaluation.bootstrap):

    se_doc = mean_i (hi_i - lo_i) / (2 * 1.96)
    m +- t_{n-1, 0.975} * sqrt(s^2 / n + se_doc^2)

The eval documents are the same for every seed, so their noise is common to all seeds: it does
not average out over seeds (its variance enters whole, not divided by n) and the across-seed
spread ``s`` does not contain it (``s^2 / n`` is the seeds' share). Each run keeps only its
interval's ends, not its jackknife replicates, so a two-level resampling over seeds and
documents is not available; the normal-theory sum of the two variances is. Student's t with
n - 1 degrees of freedom (the seeds' share's; the document share's are many) makes it wider
than a normal interval when the seeds dominate and is the conservative choice of the
Welch-Satterthwaite degrees of freedom.

**Lead.** A paired difference is a lead only when its combined interval excludes 0 and its sign
is the same (and not zero) in every seed: the direction holds for every training seed, not only
on average. Whether the lead favours the HSAE follows from the metric's direction
(:data:`METRICS`: lower Hamming, higher P, FVE, coherence and co-occurrence are better; L0 is a
target, neither), the same rule for HSAE - post-hoc and HSAE - Matryoshka (:data:`DIFF_GROUPS`).

**Groups a run lacks.** A run whose metrics.json has no ``matryoshka`` / ``diff_matryoshka``
block (one from before issue 26) gives those groups no values: with no seed having them they are
absent from the study (no rows, no NaN), and :func:`study` lists in ``incomplete`` a group that
only some seeds have.

**Verdict.** A new run (``make repro``; another CPU is another floating-point order, which moves
training like another seed) is *inside* when its value lies within the 95% prediction interval
for one more seed, ``m +- t_{n-1, 0.975} * s * sqrt(1 + 1/n)``, or within the seeds' min-max
where that is wider. The document interval does not enter: the run is scored on the same
documents as the seeds, so document noise does not separate it from them. A run outside is not
wrong by itself (1 in 20 metrics lands outside by chance); many outside, or a difference whose
sign flips, says this machine's run is not the study's.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd

from hsae_core.pipeline.experiments import (
    Experiment,
    ExperimentError,
    exp_run_command,
    flatten,
    fmt,
)

#: Experiment names: seed-<s>.
PREFIX = "seed-"
#: The params key the study varies.
SEED_KEY = "sae.seed"
#: The seeds of the study: 0 is the committed reference run, 1..4 new runs.
SEEDS = (0, 1, 2, 3, 4)
#: The study's runs stop after this stage (nothing after it reads the seed's metrics).
TARGET = "compute-metrics"
#: (key in metrics.json's ``mean`` groups and ``diff``, label, direction: +1 higher is better,
#: -1 lower is better, 0 neither).
METRICS = (
    ("hamming", "Hamming", -1),
    ("hamming_per_parent", "Hamming per parent", -1),
    ("p_pc", "P(p|c) macro", 1),
    ("p_pc_pooled", "P(p|c) pooled", 1),
    ("p_pc_min", "P(p|c) restricted", 1),
    ("p_cp", "P(c|p) macro", 1),
    ("p_cp_pooled", "P(c|p) pooled", 1),
    ("p_cp_min", "P(c|p) restricted", 1),
    ("fve", "FVE", 1),
    ("l0", "L0", 0),
    ("topic_coherence", "topic coherence", 1),
    ("doc_cooccurrence", "document co-occurrence", 1),
)
#: The arms: metrics.json's ``<arm>.mean`` blocks.
MODELS = ("hsae", "posthoc", "matryoshka")
#: The paired differences (metrics.json's flat blocks): group -> (first, second) arm of
#: ``first - second``; a lead favours the first or the second by the metric's direction.
DIFF_GROUPS = {"diff": ("hsae", "posthoc"), "diff_matryoshka": ("hsae", "matryoshka")}
#: The models' groups and the paired differences, in the tables' order.
GROUPS = (*MODELS, *DIFF_GROUPS)
GROUP_LABELS = {"hsae": "HSAE", "posthoc": "post-hoc", "matryoshka": "Matryoshka",
                "diff": "HSAE - post-hoc", "diff_matryoshka": "HSAE - Matryoshka"}
#: Per run: what must be the same in every seed for the document noise to be common.
EVAL_KEYS = ("eval_tokens", "eval_documents", "doc_labels")
#: z of a two-sided 95% interval: a percentile interval's width is about 2 * 1.96 se.
Z95 = 1.959963984540054


def run_name(seed: int) -> str:
    return f"{PREFIX}{seed}"


def runs(seeds=SEEDS, reference_seed: int | None = 0, params: dict | None = None
         ) -> list[tuple[str, dict[str, object]]]:
    """``(experiment name, -S overrides)`` of the seeds to run, in order. The reference seed
    (the committed run's ``sae.seed``) is left out: the commit is that seed's run, unless
    ``params`` (shared overrides: a smaller project, a test) makes the study's configuration
    differ from the commit's."""
    shared = params or {}
    return [(run_name(s), {**shared, SEED_KEY: s}) for s in seeds
            if params or s != reference_seed]


def run_command(name: str, overrides: dict[str, object], queue: bool = False) -> list[str]:
    """``dvc exp run -n NAME -S sae.seed=S compute-metrics``: no export, evidence, judge or
    report (the study reads metrics/metrics.json only)."""
    return exp_run_command(name, overrides, queue=queue, target=TARGET)


def budget(new_runs: int = len(SEEDS) - 1, train_s: float = 300.0, posthoc_s: float = 60.0,
           metrics_s: float = 480.0, matryoshka: bool = True,
           matryoshka_s: float = 300.0) -> dict[str, float]:
    """Estimated CPU wall time (seconds) of ``new_runs`` seeds on the 2-core reference machine:
    each retrains the HSAE and the baseline (~5 min each at 1000 steps), rebuilds the post-hoc
    forest (~1 min) and computes the metrics with 1000 jackknife rows (~8 min, measured with
    two arms); with ``matryoshka`` (the pipeline has issue 26's train-matryoshka) also trains
    the Matryoshka (~5 min) and builds its groups' forest (``posthoc_s``). The extraction is the
    committed run's and is never redone."""
    out = {"train_hsae": new_runs * train_s, "train_baseline": new_runs * train_s}
    if matryoshka:
        out["train_matryoshka"] = new_runs * matryoshka_s
    out["posthoc"] = new_runs * posthoc_s
    if matryoshka:
        out["matryoshka_forest"] = new_runs * posthoc_s
    out["metrics"] = new_runs * metrics_s
    out["total"] = sum(out.values())
    return out


# ----- the study's numbers ------------------------------------------------------------------

def seed_runs(commits: list[Experiment], exps: list[Experiment], seeds=SEEDS) -> list[dict]:
    """One entry per seed of ``seeds`` that has a run: the experiment ``seed-<s>``, else the
    committed run (``commits``: the revisions the experiments started from) when its
    ``sae.seed`` is ``s``. Each: ``{"seed", "name", "source", "params" (flattened, without
    sae.seed), "eval" (EVAL_KEYS), "values": {"<group>.<key>": [value, lo, hi]}}``.
    :class:`ExperimentError` when the runs differ in anything but the seed (another
    configuration, another eval split), which would make the spread something else."""
    by_seed: dict[int, tuple[Experiment, str]] = {}
    for exp in commits:
        seed = flatten(exp.params).get(SEED_KEY)
        if exp.metrics and seed in seeds and seed not in by_seed:
            by_seed[int(seed)] = (exp, "reference")
    for exp in exps:
        seed = flatten(exp.params).get(SEED_KEY)
        if exp.metrics and exp.name == run_name(seed) and seed in seeds:
            by_seed[int(seed)] = (exp, "experiment")
    out = []
    for seed in sorted(by_seed):
        exp, source = by_seed[seed]
        params = {k: v for k, v in flatten(exp.params).items() if k != SEED_KEY}
        out.append({"seed": seed, "name": exp.name, "source": source, "rev": exp.rev,
                    "params": params, "eval": {k: exp.metrics.get(k) for k in EVAL_KEYS},
                    "values": values_of(exp.metrics)})
    _check_same(out)
    return out


def values_of(metrics: dict) -> dict[str, list[float | None]]:
    """``{"<group>.<key>": [value, lo, hi]}`` of metrics.json for every :data:`METRICS` key of
    every group the run has (None where it lacks a metric: topic coherence without document
    labels); a group whose block metrics.json lacks (the Matryoshka before issue 26) has no
    keys."""
    out = {}
    for group in GROUPS:
        if not metrics.get(group):
            continue
        source = metrics[group]
        source = source if group in DIFF_GROUPS else source.get("mean") or {}
        for key, _, _ in METRICS:
            out[f"{group}.{key}"] = [source.get(key), source.get(f"{key}_lo"),
                                     source.get(f"{key}_hi")]
    return out


def _check_same(entries: list[dict]) -> None:
    if not entries:
        return
    first = entries[0]
    for e in entries[1:]:
        keys = sorted(k for k in set(first["params"]) | set(e["params"])
                      if first["params"].get(k) != e["params"].get(k))
        if keys:
            raise ExperimentError(
                f"{e['name']} and {first['name']} differ in more than {SEED_KEY}: "
                + ", ".join(f"{k} ({first['params'].get(k)!r} vs {e['params'].get(k)!r})"
                            for k in keys[:8]) + ": the seed study compares runs of one "
                "configuration (remove the other experiments, or run the study from the "
                "commit that holds its reference run)")
        if e["eval"] != first["eval"]:
            raise ExperimentError(f"{e['name']} was scored on another eval split than "
                                  f"{first['name']} ({e['eval']} vs {first['eval']})")


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile (``p`` in (0.5, 1)): bisection on the CDF, whose density is
    integrated with Simpson's rule (error < 1e-8 for df >= 1; scipy is a test tool only)."""
    if not 0.5 < p < 1 or df <= 0:
        raise ValueError(f"t_quantile wants 0.5 < p < 1 and df > 0, got p={p}, df={df}")
    log_c = (math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi))

    def cdf(x: float) -> float:
        t = np.linspace(0.0, x, 4001)
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))
        return 0.5 + (x / 12000) * (f[0] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum() + f[-1])

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def summarize(values: list[float], los: list[float | None] | None = None,
              his: list[float | None] | None = None) -> dict:
    """Mean, across-seed sd (n - 1), min, max, the document standard error (mean over seeds of
    the 95% document interval's width / 3.92) and the combined 95% interval ``mean +- t_{n-1,
    0.975} sqrt(sd^2 / n + se_doc^2)`` of one metric over seeds (module docstring). With one
    seed there is no spread: sd, the interval and t are NaN. Without document intervals
    (``metrics.bootstrap: 0``: no jackknife rows) se_doc is 0: the interval is the seeds'
    alone."""
    n = len(values)
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n >= 2 else math.nan
    widths = [h - l for l, h in zip(los or [], his or []) if l is not None and h is not None]
    se_doc = statistics.fmean(widths) / (2 * Z95) if widths else 0.0
    t = t_quantile(0.975, n - 1) if n >= 2 else math.nan
    half = t * math.sqrt(sd ** 2 / n + se_doc ** 2)
    return {"n": n, "mean": mean, "sd": sd, "min": min(values), "max": max(values),
            "se_doc": se_doc, "t": t, "lo": mean - half, "hi": mean + half}


def is_lead(values: list[float], summary: dict) -> bool:
    """The lead rule: the combined interval excludes 0 and every seed has the same sign."""
    if not summary["n"] >= 2 or math.isnan(summary["lo"]):
        return False
    excludes = summary["lo"] > 0 or summary["hi"] < 0
    same_sign = all(v > 0 for v in values) or all(v < 0 for v in values)
    return excludes and same_sign


def study(entries: list[dict]) -> dict:
    """The study's result from :func:`seed_runs`' entries: ``{"seeds", "runs", "params",
    "eval", "metrics": {"<group>.<key>": {group, key, label, direction, values: {seed: v},
    n, mean, sd, min, max, se_doc, t, lo, hi[, lead, favours]}}, "leads", "groups",
    "incomplete"}``. Per metric only the seeds that have it count (topic coherence needs
    document labels); a group no seed has is left out (``groups``: those present), one only
    some seeds have is summarised over those and named in ``incomplete`` (group -> the seeds
    without it)."""
    if not entries:
        raise ExperimentError("no seed of the study has metrics yet")
    out: dict[str, dict] = {}
    none = [None, None, None]
    for group in GROUPS:
        for key, label, direction in METRICS:
            name = f"{group}.{key}"
            have = [(e["seed"], *e["values"].get(name, none)) for e in entries
                    if e["values"].get(name, none)[0] is not None]
            if not have:
                continue
            seeds, vals, los, his = (list(x) for x in zip(*have))
            row = {"group": group, "key": key, "label": label, "direction": direction,
                   "values": {str(s): v for s, v in zip(seeds, vals)}} | summarize(vals, los,
                                                                                    his)
            if group in DIFF_GROUPS:
                row["lead"] = is_lead(vals, row)
                row["favours"] = _favours(row, direction) if row["lead"] else None
            out[name] = row
    groups = [g for g in GROUPS if any(r["group"] == g for r in out.values())]
    incomplete = {}
    for g in groups:
        lacking = [e["seed"] for e in entries
                   if not any(k.startswith(f"{g}.") and v[0] is not None
                              for k, v in e["values"].items())]
        if lacking:
            incomplete[g] = lacking
    return {"method": METHOD, "seeds": [e["seed"] for e in entries],
            "runs": [{k: e[k] for k in ("seed", "name", "source", "rev")} for e in entries],
            "params": entries[0]["params"], "eval": entries[0]["eval"], "metrics": out,
            "leads": [k for k, r in out.items() if r.get("lead")], "groups": groups,
            "incomplete": incomplete}


METHOD = ("combined 95% interval: mean +- t_{n-1,0.975} * sqrt(sd^2/n + se_doc^2), sd the "
          "across-seed sd, se_doc the mean over seeds of (hi - lo) / 3.92 of the 95% "
          "document interval (the jackknife over eval documents; the documents are the same "
          "for every seed); lead: the combined interval excludes 0 and every seed has the same "
          "sign")


def _favours(row: dict, direction: int) -> str | None:
    """The arm a lead favours: the difference's first arm when its sign is the metric's
    better direction, else its second; None for a target (L0)."""
    if direction == 0:
        return None
    first, second = DIFF_GROUPS[row["group"]]
    return first if (row["mean"] > 0) == (direction > 0) else second


# ----- tables -------------------------------------------------------------------------------

def frame(result: dict) -> pd.DataFrame:
    """One row per metric and group of :func:`study`: group, metric, the per-seed values
    (``seed <s>``), n, mean, sd, min, max, se_doc, the combined interval (lo, hi) and, for the
    differences, lead and favours. Numbers at full precision (the CSV)."""
    seeds = [str(s) for s in result["seeds"]]
    rows = []
    for name, r in result["metrics"].items():
        row = {"group": r["group"], "metric": r["key"], "label": r["label"]}
        row |= {f"seed {s}": r["values"].get(s, math.nan) for s in seeds}
        row |= {k: r[k] for k in ("n", "mean", "sd", "min", "max", "se_doc", "lo", "hi")}
        row |= {"lead": bool(r.get("lead", False)), "favours": r.get("favours")}
        rows.append(row)
    return pd.DataFrame(rows)


def shown(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`frame` formatted for reading: every number of a row to the same decimals (two
    significant digits of its interval's half-width), the interval as ``[lo, hi]``, min-max in
    one cell, and the lead."""
    seeds = [c for c in table.columns if c.startswith("seed ")]
    rows = []
    for _, r in table.iterrows():
        f = _row_format(r["hi"] - r["mean"], r["mean"])
        cells = {"model": GROUP_LABELS[r["group"]], "metric": r["label"]}
        cells |= {c: f(r[c]) for c in seeds}
        cells |= {"mean": f(r["mean"]), "sd (seeds)": f(r["sd"]),
                  "min to max": f"{f(r['min'])} to {f(r['max'])}",
                  "combined 95%": f"[{f(r['lo'])}, {f(r['hi'])}]",
                  "doc se": f(r["se_doc"])}
        favours = r["favours"] if isinstance(r["favours"], str) else None
        cells["lead"] = (("yes: " + GROUP_LABELS[favours] if favours else "yes")
                         if r["lead"] else ("no" if r["group"] in DIFF_GROUPS else ""))
        rows.append(cells)
    return pd.DataFrame(rows)


def _row_format(half: float, scale: float):
    """A formatter with the decimals that show two significant digits of ``half`` (4
    significant digits of ``scale`` when there is no width)."""
    if not half or math.isnan(half):
        return lambda v: fmt(v)
    decimals = min(8, max(0, 1 - math.floor(math.log10(abs(half)))))
    return lambda v: "-" if v is None or math.isnan(v) else f"{v:.{decimals}f}"


# ----- the verdict of one run ---------------------------------------------------------------

def band(row: dict) -> tuple[float, float]:
    """Where one more seed's value is expected: the 95% prediction interval ``mean +- t_{n-1,
    0.975} sd sqrt(1 + 1/n)``, widened to the seeds' min-max where that is wider."""
    n, mean, sd = row["n"], row["mean"], row["sd"]
    if n < 2 or math.isnan(sd):
        return row["min"], row["max"]
    half = t_quantile(0.975, n - 1) * sd * math.sqrt(1 + 1 / n)
    return min(mean - half, row["min"]), max(mean + half, row["max"])


def verdict(result: dict, metrics: dict, params: dict | None = None
            ) -> tuple[pd.DataFrame, list[str]]:
    """This run's ``metrics`` (metrics.json) against the seed study ``result``: one row per
    metric of the study with this run's value, the seeds' mean and min-max, the band
    (:func:`band`) and ``inside`` / ``outside`` (``-`` where the run lacks the metric), and
    notes on what makes the comparison unfair: ``params`` (this run's params.yaml, nested)
    differing from the study's in more than the seed, another eval split."""
    mine = values_of(metrics)
    rows = []
    for name, r in result["metrics"].items():
        value = mine.get(name, [None])[0]
        lo, hi = band(r)
        inside = None if value is None else lo <= value <= hi
        f = _row_format((hi - lo) / 2, r["mean"])
        rows.append({"model": GROUP_LABELS[r["group"]], "metric": r["label"],
                     "this run": f(value) if value is not None else "-",
                     "seeds mean": f(r["mean"]),
                     "seeds min to max": f"{f(r['min'])} to {f(r['max'])}",
                     "expected (95%)": f"[{f(lo)}, {f(hi)}]",
                     "verdict": "-" if inside is None else ("inside" if inside else
                                                            "OUTSIDE")})
    notes = []
    if params is not None:
        flat = {k: v for k, v in flatten(params).items() if k != SEED_KEY}
        study_params = result.get("params") or {}
        keys = sorted(k for k in set(flat) | set(study_params)
                      if flat.get(k) != study_params.get(k))
        if keys:
            notes.append("this run's params differ from the study's in " + ", ".join(
                f"{k} ({study_params.get(k)!r} -> {flat.get(k)!r})" for k in keys[:8])
                + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
                + ": the study measured another configuration")
    if len(result["seeds"]) < 2:
        notes.append("the study has one seed: no spread to compare with (inside means equal)")
    extra = sorted({name.split(".")[0] for name in mine} - {r["group"] for r in
                                                            result["metrics"].values()},
                   key=GROUPS.index)
    if extra:
        notes.append("this run has " + ", ".join(GROUP_LABELS[g] for g in extra) + ", which "
                     "the study has not measured: not judged (re-run the seed study)")
    run_eval = {k: metrics.get(k) for k in EVAL_KEYS}
    if result.get("eval") and run_eval != result["eval"]:
        notes.append(f"this run's eval split differs from the study's ({run_eval} vs "
                     f"{result['eval']}): document noise no longer cancels; re-run the study")
    return pd.DataFrame(rows), notes


__all__ = ["DIFF_GROUPS", "GROUPS", "GROUP_LABELS", "METHOD", "METRICS", "MODELS", "PREFIX",
           "SEEDS", "SEED_KEY", "TARGET", "band", "budget", "frame", "is_lead", "run_command",
           "run_name", "runs", "seed_runs", "shown", "study", "summarize", "t_quantile",
           "values_of", "verdict"]
