"""The paper's figures as PNG + SVG (matplotlib, Agg): hierarchy metrics HSAE vs post-hoc
baseline (Figure 3; the Matryoshka arm as a third series where metrics.json has it),
ablations (Figures 4, 7, 9), the rho / r trade-off (Figure 8), UMAP of sibling features against
an unrelated one (Figures 5, 10), AutoInterp by branching (Figure 11) and the training curves
per level (HSAE beside the baseline, and the Matryoshka's prefixes and groups where logged).

Every function takes plain data (metrics dicts, ablation rows, judge pairs, arrays) and writes
``<out>/<stem>.png`` and ``.svg``. Where an input is missing, the figure is still written and
says what is missing and how to produce it, instead of failing.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hsae_core.common import fsio

HSAE_C, BASE_C, RAND_C, MISSING_C = "#e07b00", "#4c72b0", "#999999", "#dddddd"
MATR_C, MATR_LIGHT_C = "#2a9d8f", "#9fd8cf"  # the Matryoshka arm (issue 26)

#: metrics.json's blocks drawn in Figure 3 and fig_semantic: (block, colour, legend label); the
#: Matryoshka's only where metrics.json has its block
FIG3_SERIES = (("hsae", HSAE_C, "HSAE"), ("posthoc", BASE_C, "post-hoc baseline"),
               ("matryoshka", MATR_C, "Matryoshka"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "hsae"  # fixed SVG element ids (random by default)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, stem: str) -> list[Path]:
    """``<out>/<stem>.png`` and ``.svg``, each written to a temporary name and renamed into
    place (never rewritten in place); the SVG without a date, so equal figures are equal
    files."""
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    with fsio.atomic_path(paths[0]) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    with fsio.atomic_path(paths[1]) as tmp:
        fig.savefig(tmp, format="svg", bbox_inches="tight", metadata={"Date": None})
    _plt().close(fig)
    return paths


def _note(ax, text: str, width: int = 60) -> None:
    text = "\n".join(textwrap.fill(line, width) for line in text.splitlines())
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color="#8a4b00",
            transform=ax.transAxes, bbox={"boxstyle": "round", "fc": "#fff4e6", "ec": "#f5d2a8"})
    ax.set_xticks([])
    ax.set_yticks([])


def missing_figure(out: Path, stem: str, title: str, reason: str) -> list[Path]:
    """A figure that only states why it could not be drawn."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 2.6))
    ax.set_title(title, fontsize=10)
    _note(ax, reason)
    return _save(fig, out, stem)


def _aside(ax, text: str, width: int = 34) -> None:
    """A small explanatory text in a spare (axis-off) panel: not a warning."""
    ax.text(0.02, 0.95, textwrap.fill(text, width), ha="left", va="top", fontsize=8,
            color="#333333", transform=ax.transAxes)


def _ok(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----- Figure 3 -------------------------------------------------------------------------------

def judge_rates(pairs: Sequence[dict] | None) -> dict[str, dict]:
    """Yes rate per source (hsae, posthoc, matryoshka, random) over parseable verdicts
    (Appendix C)."""
    out: dict[str, dict] = {}
    for p in pairs or []:
        d = out.setdefault(p["source"], {"yes": 0, "no": 0, "unparseable": 0})
        d[p["verdict"] if p["verdict"] in d else "unparseable"] += 1
    for d in out.values():
        n = d["yes"] + d["no"]
        d["rate"] = d["yes"] / n if n else float("nan")
        d["n"] = n
    return out


def fig3_hierarchy(out: Path, metrics: dict | None, judge_pairs: Sequence[dict] | None,
                   judge_note: str | None = None) -> list[Path]:
    """Figure 3: (a) Hamming, (b) P(p|c), (c) P(c|p) per level pair and their mean, HSAE vs the
    post-hoc baseline (metrics/metrics.json), with 95% document-bootstrap intervals as error
    bars; below them the robust forms (Hamming per parent with children, P(p|c) and P(c|p)
    pooled over tokens); (d) the judge's Yes rate per source. Where ``metrics`` has a
    ``matryoshka`` block (the third arm: its nested groups as levels, its forest built post hoc
    like the baseline's), it is a third series; without one the figure is the two-arm one."""
    title = "Figure 3: hierarchy consistency, HSAE vs post-hoc baseline (95% intervals)"
    if not metrics or "hsae" not in metrics or "posthoc" not in metrics:
        return missing_figure(out, "fig3_hierarchy", title,
                              "metrics/metrics.json is missing: run `dvc repro compute-metrics`")
    series = [s for s in FIG3_SERIES if s[0] in metrics]
    width = 0.76 / len(series)
    if len(series) > 2:
        title = ("Figure 3: hierarchy consistency, HSAE vs post-hoc baseline vs Matryoshka "
                 "(95% intervals)")
    plt = _plt()
    fig, grid = plt.subplots(2, 4, figsize=(15, 6.8))
    pairs = sorted(int(k[4:]) for k in metrics["hsae"] if k.startswith("pair"))
    labels = [f"{p}\u2192{p + 1}" for p in pairs] + ["mean"]
    x = np.arange(len(labels))
    panels = ((grid[0, 0], "hamming", "(a) Hamming distance \u2193"),
              (grid[0, 1], "p_pc", "(b) P(parent | child) \u2191"),
              (grid[0, 2], "p_cp", "(c) P(child | parent) \u2191"),
              (grid[1, 0], "hamming_per_parent", "Hamming per parent with children \u2193"),
              (grid[1, 1], "p_pc_pooled", "P(parent | child), pooled \u2191"),
              (grid[1, 2], "p_cp_pooled", "P(child | parent), pooled \u2191"))
    for ax, key, name in panels:
        for k, (model, color, label) in enumerate(series):
            groups = [metrics[model].get(f"pair{p}", {}) for p in pairs]
            groups.append(metrics[model].get("mean", {}))
            vals = np.array([g.get(key) if _ok(g.get(key)) else np.nan for g in groups])
            lo = np.array([g.get(f"{key}_lo") if _ok(g.get(f"{key}_lo")) else np.nan
                           for g in groups])
            hi = np.array([g.get(f"{key}_hi") if _ok(g.get(f"{key}_hi")) else np.nan
                           for g in groups])
            err = np.nan_to_num(np.vstack([vals - lo, hi - vals]), nan=0.0).clip(min=0)
            bars = ax.bar(x + (k - (len(series) - 1) / 2) * width, vals, width, color=color,
                          label=label, yerr=err, capsize=2, error_kw={"elinewidth": 0.8})
            ax.bar_label(bars, fmt="%.3g", fontsize=7 if len(series) < 3 else 5.5, padding=2)
        ax.set_xticks(x, labels)
        ax.set_xlabel("level pair")
        ax.set_title(name, fontsize=10)
        # room for the legend above the bars
        ax.set_ylim(0, ax.get_ylim()[1] * (1.25 if len(series) < 3 else 1.3))
        ax.legend(fontsize=7, loc="upper left", ncol=len(series),
                  **({} if len(series) < 3 else {"columnspacing": 0.8, "handlelength": 1.2}))
    grid[1, 3].axis("off")
    if len(series) > 2:
        _aside(grid[1, 3], "Matryoshka: the Matryoshka BatchTopK SAE (issue 26), its nested "
               "groups as the levels (a level pair is group l \u2192 group l+1), its forest built "
               "post hoc by the baseline's rule.")
    axes = grid[0]
    ax = axes[3]
    ax.set_title("(d) AutoInterp: judge's Yes rate \u2191", fontsize=10)
    rates = judge_rates(judge_pairs)
    if not rates:
        _note(ax, judge_note or ("no judge output yet (data/judge/pairs.jsonl): "
                                 "run the judge stage"), width=30)
    else:
        names = [s for s in ("hsae", "posthoc", "matryoshka", "random") if s in rates]
        colors = {"hsae": HSAE_C, "posthoc": BASE_C, "matryoshka": MATR_C, "random": RAND_C}
        bars = ax.bar(names, [rates[s]["rate"] for s in names], color=[colors[s] for s in names])
        ax.bar_label(bars, labels=[f"{rates[s]['rate']:.2f}\n(n={rates[s]['n']})" for s in names],
                     fontsize=7)
        ax.set_ylim(0, 1.15)
        judges = sorted({str(p.get("model")) for p in judge_pairs if p.get("model")})
        if judges:
            ax.set_xlabel("judge: " + ", ".join(judges), fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out, "fig3_hierarchy")


# ----- ablations (Figures 4, 7, 9) and the trade-off (Figure 8) --------------------------------

def fig_semantic(out: Path, metrics: dict | None) -> list[Path]:
    """Beside Figure 3: do links mean something? (a) topic coherence and (b) document
    co-occurrence of the HSAE's and the post-hoc forest's links, each beside frequency-matched
    random pairs of its own features, per level pair and on average, with 95% intervals
    (metrics/metrics.json, hsae_core.evaluation.semantic); the Matryoshka's links and random
    pairs as a third pair of series where metrics.json has its block."""
    title = "Semantic scores of links vs frequency-matched random pairs (95% intervals)"
    if not metrics or "doc_cooccurrence" not in metrics.get("hsae", {}).get("mean", {}):
        return missing_figure(out, "fig_semantic", title,
                              "no semantic scores in metrics/metrics.json: run "
                              "`dvc repro compute-metrics`")
    series = (("hsae", "", HSAE_C, "HSAE links"), ("hsae", "_random", "#f3c27f", "HSAE random"),
              ("posthoc", "", BASE_C, "post-hoc links"),
              ("posthoc", "_random", "#a9bcdd", "post-hoc random"))
    if "matryoshka" in metrics:
        series += (("matryoshka", "", MATR_C, "Matryoshka links"),
                   ("matryoshka", "_random", MATR_LIGHT_C, "Matryoshka random"))
    width = 0.8 / len(series)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12 if len(series) < 6 else 14, 3.8))
    pairs = sorted(int(k[4:]) for k in metrics["hsae"] if k.startswith("pair"))
    labels = [f"{p}\u2192{p + 1}" for p in pairs] + ["mean"]
    x = np.arange(len(labels))
    for ax, key, name in ((axes[0], "topic_coherence", "(a) topic coherence \u2191"),
                          (axes[1], "doc_cooccurrence", "(b) P(parent in doc | child) \u2191")):
        if key not in metrics["hsae"]["mean"]:
            _note(ax, "the corpus has no label column (extract.label_column): no topics")
            ax.set_title(name, fontsize=10)
            continue
        for k, (model, suffix, color, label) in enumerate(series):
            groups = [metrics[model].get(f"pair{p}", {}) for p in pairs]
            groups.append(metrics[model].get("mean", {}))
            m = key + suffix
            vals = np.array([g.get(m) if _ok(g.get(m)) else np.nan for g in groups])
            lo = np.array([g.get(f"{m}_lo") if _ok(g.get(f"{m}_lo")) else np.nan for g in groups])
            hi = np.array([g.get(f"{m}_hi") if _ok(g.get(f"{m}_hi")) else np.nan for g in groups])
            err = np.nan_to_num(np.vstack([vals - lo, hi - vals]), nan=0.0).clip(min=0)
            ax.bar(x + (k - (len(series) - 1) / 2) * width, vals, width, color=color,
                   label=label, yerr=err, capsize=2, error_kw={"elinewidth": 0.8})
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x, labels)
        ax.set_xlabel("level pair")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7, ncol=2 if len(series) < 6 else 3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out, "fig_semantic")


def _norm(v) -> str:
    try:
        return f"{float(v):g}"
    except (TypeError, ValueError):
        return str(v)


def find_row(rows: Sequence[dict], overrides: dict | None) -> dict | None:
    """The ablation row whose changed params equal ``overrides`` (None / {} = the reference)."""
    want = {k: _norm(v) for k, v in (overrides or {}).items()}
    for row in rows:
        if {k: _norm(v) for k, v in row.get("changed", {}).items()} == want:
            return row
    return None


HOW_TO_ABLATE = ("run the ablations (`python -m stages.ablations queue`, `dvc queue start -j 1`), "
                 "then `dvc exp show --json > metrics/ablations.json` "
                 "and `dvc repro -f -s report`")


def fig_ablation(out: Path, stem: str, title: str, rows: Sequence[dict] | None,
                 bars: Sequence[tuple[str, str, dict | None]]) -> list[Path]:
    """Hamming distance of each variant: ``bars`` = (label, column of the row, overrides).
    A variant without a finished experiment is drawn as an empty grey bar marked 'not run'."""
    if not rows:
        return missing_figure(out, stem, title, "no ablation results found:\n" + HOW_TO_ABLATE)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.5 + 1.4 * len(bars), 3.6))
    missing = []
    for k, (label, column, overrides) in enumerate(bars):
        row = find_row(rows, overrides)
        v = row.get(column) if row else None
        if _ok(v):
            color = (BASE_C if column.startswith("post-hoc")
                     else (HSAE_C if not overrides else "#f2b26b"))
            b = ax.bar([k], [v], color=color)
            ax.bar_label(b, fmt="%.3g", fontsize=8)
        else:
            ax.bar([k], [0], color=MISSING_C)
            ax.text(k, 0, "not run", ha="center", va="bottom", fontsize=8, color="#8a4b00",
                    rotation=90)
            missing.append(label.replace("\n", " "))
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("Hamming distance \u2193\n(mean over level pairs)")
    ax.set_title(title, fontsize=10)
    if missing:
        ax.set_xlabel(textwrap.fill("not run yet: " + ", ".join(missing), 70), fontsize=8,
                      color="#8a4b00")
    fig.tight_layout()
    return _save(fig, out, stem)


def fig8_tradeoff(out: Path, rows: Sequence[dict] | None,
                  reference: dict[str, float]) -> list[Path]:
    """Figure 8: FVE vs Hamming for the rho sweep and the r sweep (reference point included);
    ``reference`` = the reference run's {"rho": ..., "r": ...} (params.yaml's top-level keys)."""
    title = "Figure 8: consistency / fidelity trade-off"
    if not rows:
        return missing_figure(out, "fig8_tradeoff", title,
                              "no ablation results found:\n" + HOW_TO_ABLATE)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, name in ((axes[0], "rho", "(a) constraint weight \u03c1"),
                          (axes[1], "r", "(b) perturbation rate r")):
        pts = []
        ref = find_row(rows, {})
        if ref and _ok(ref.get("FVE")) and _ok(ref.get("Hamming")):
            pts.append((reference.get(key), ref["FVE"], ref["Hamming"]))
        for row in rows:
            changed = row.get("changed", {})
            if set(changed) == {key} and _ok(row.get("FVE")) and _ok(row.get("Hamming")):
                pts.append((float(changed[key]), row["FVE"], row["Hamming"]))
        ax.set_title(name, fontsize=10)
        if len(pts) < 2:
            _note(ax, f"{len(pts)} run(s) with only {key} changed: the sweep needs at least two.\n"
                  + HOW_TO_ABLATE)
            continue
        pts.sort(key=lambda p: (p[0] is None, p[0]))
        vals = np.array([p[0] if p[0] is not None else np.nan for p in pts], dtype=float)
        sc = ax.scatter([p[1] for p in pts], [p[2] for p in pts],
                        c=np.log10(np.maximum(vals, 1e-6)), cmap="viridis", s=50)
        for v, fve, ham in pts:
            ax.annotate(f"{v:g}" if v is not None else "ref", (fve, ham),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)
        fig.colorbar(sc, ax=ax, label=f"log10 {key}")
        ax.set_xlabel("fraction of variance explained (mean over levels) \u2192")
        ax.set_ylabel("Hamming distance \u2193")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out, "fig8_tradeoff")


# ----- training curves ------------------------------------------------------------------------

#: (quantity, row title, models drawn) of the training-curves figure.
TRAINING_ROWS = (("l0", "L0 (training batch)", ("hsae", "baseline", "matryoshka")),
                 ("fve", "FVE (training batch)", ("hsae", "baseline", "matryoshka")),
                 ("mse", "MSE", ("hsae", "baseline", "matryoshka")),
                 ("lambda", "sparsity weight \u03bb", ("hsae", "baseline")),
                 ("pc", "parent-child loss", ("hsae",)),
                 ("with_parent", "features with a parent", ("hsae",)),
                 ("churn", "parent changed at an update", ("hsae",)),
                 ("gained", "children gained at an update", ("hsae",)),
                 ("lost", "children lost at an update", ("hsae",)))


#: Rows logged at hierarchy updates only (points joined, not a per-step curve).
UPDATE_ROWS = ("churn", "gained", "lost")

#: The Matryoshka's curve (hsae_core.pipeline.matryoshka_run) for a row's quantity at level
#: (group) g: its group's own L0, its prefix's (groups 0..g together) FVE and MSE
MATRYOSHKA_CURVES = {"l0": "group{}/l0", "fve": "prefix{}/fve", "mse": "prefix{}/mse"}
CURVE_LABELS = {"hsae": "HSAE", "baseline": "baseline",
                "matryoshka": "Matryoshka (L0: group; FVE, MSE: prefix)"}


def _curve_key(model: str, level: int, q: str) -> str | None:
    if model == "matryoshka":
        key = MATRYOSHKA_CURVES.get(q)
        return key.format(level) if key else None
    return f"level{level}/{q}"


def _curve_level(key: str) -> int | None:
    """The level (group) of a per-level curve key: ``level2/l0``, ``prefix2/fve`` -> 2."""
    head = key.split("/")[0]
    for prefix in ("level", "group", "prefix"):
        if head.startswith(prefix) and head[len(prefix):].isdigit() and "/" in key:
            return int(head[len(prefix):])
    return None


def fig_training(out: Path, curves: dict[str, dict[str, tuple[list, list]]] | None) -> list[Path]:
    """The training curves, viewable offline (``dvc plots show`` needs a network for its
    charts): one row per quantity, one column per level, the HSAE beside the baseline.
    ``curves[model]["level<l>/<q>"] = (steps, values)`` (DVCLive's logs, hsae_core.pipeline.
    train_run); the parent-child loss, forest size and the forest's churn at each hierarchy
    update exist from level 1 on, and only for the HSAE (the baseline's forest is built after
    training). ``curves["matryoshka"]`` (its run's ``group<g>/l0``, ``prefix<g>/{fve,mse}``,
    hsae_core.pipeline.matryoshka_run), where given, adds the Matryoshka to the L0, FVE and MSE
    rows: column g is group g's own L0 and the FVE and MSE of the prefix of groups 0..g."""
    stem, title = "fig_training", "Training curves per level: HSAE vs independent baseline"
    if curves and "matryoshka" in curves:
        title += (" vs Matryoshka (groups as levels)" if curves["matryoshka"] else
                  "\n(Matryoshka: no curves found in dvclive/matryoshka/: run its training "
                  "stage)")
    if not curves or not any(curves.values()):
        return missing_figure(out, stem, title, "no training curves found (dvclive/<model>/): "
                                                "run the training stages")
    levels = sorted({lv for c in curves.values() for k in c
                     if (lv := _curve_level(k)) is not None})
    plt = _plt()
    fig, axes = plt.subplots(len(TRAINING_ROWS), len(levels), squeeze=False,
                             figsize=(3.3 * len(levels), 2.1 * len(TRAINING_ROWS)))
    colors = {"hsae": HSAE_C, "baseline": BASE_C, "matryoshka": MATR_C}
    for r, (q, label, models) in enumerate(TRAINING_ROWS):
        for c, l in enumerate(levels):
            ax = axes[r, c]
            drawn = False
            for model in models:
                key = _curve_key(model, l, q)
                steps, values = (curves.get(model) or {}).get(key, ([], []))
                if len(steps):
                    ax.plot(steps, values, color=colors[model], lw=1.1,
                            marker="." if q in UPDATE_ROWS else None, ms=3,
                            label=CURVE_LABELS[model])
                    drawn = True
            if not drawn:
                ax.axis("off")
                ax.text(0.5, 0.5, "no level above" if l == 0 else "not logged", fontsize=8,
                        ha="center", va="center", color="#8a4b00", transform=ax.transAxes)
                continue
            ax.tick_params(labelsize=7)
            if r == 0:
                ax.set_title(f"level {l}", fontsize=9)
            if c == 0 or not axes[r, c - 1].axison:
                ax.set_ylabel(label, fontsize=8)
    for c in range(len(levels)):  # "step" under the lowest panel of each column
        drawn = [r for r in range(len(TRAINING_ROWS)) if axes[r, c].axison]
        if drawn:
            axes[drawn[-1], c].set_xlabel("step", fontsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out, stem)


# ----- UMAP (Figures 5, 10) ---------------------------------------------------------------------

def fig_umap(out: Path, stem: str, title: str, panels: Sequence[dict], seed: int = 0,
             reason: str | None = None) -> list[Path]:
    """UMAP of the input activations on which each feature fires. ``panels``: dicts with
    ``parent`` (level, id), ``siblings`` [(level, id)], ``unrelated`` (level, id) and
    ``inputs`` {(level, id): [n, d] array}; one subplot per panel."""
    if not panels:
        return missing_figure(out, stem, title,
                              reason or "no parent with two children that both fire enough")
    import umap

    plt = _plt()
    cols = min(2, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.6 * cols, 4.6 * rows_n), squeeze=False)
    palette = ["#e07b00", "#2a9d8f", "#8e44ad", "#c0392b", "#1f77b4", "#6b8e23"]
    for ax, panel in zip(axes.ravel(), panels):
        feats = list(panel["siblings"]) + [panel["unrelated"]]
        xs = [np.asarray(panel["inputs"][f], dtype=np.float32) for f in feats]
        data = np.concatenate(xs)
        emb = umap.UMAP(n_components=2, n_neighbors=min(15, len(data) - 1), random_state=seed,
                        n_jobs=1).fit_transform(data)
        start = 0
        for k, (f, x) in enumerate(zip(feats, xs)):
            part = emb[start:start + len(x)]
            start += len(x)
            unrelated = k == len(feats) - 1
            label = ((f"unrelated L{f[0]}#{f[1]}" if unrelated else f"sibling L{f[0]}#{f[1]}")
                     + f" (n={len(x)})")
            ax.scatter(part[:, 0], part[:, 1], s=7, alpha=0.6, label=label,
                       color="#555555" if unrelated else palette[k % len(palette)],
                       marker="x" if unrelated else "o")
        p = panel["parent"]
        ax.set_title(f"siblings under parent L{p[0]}#{p[1]} vs an unrelated feature", fontsize=9)
        ax.legend(fontsize=7, markerscale=2)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out, stem)


# ----- Figure 11 --------------------------------------------------------------------------------

def root_scores(pairs: Sequence[dict] | None, n_children_root: np.ndarray,
                source: str = "hsae") -> dict[int, float]:
    """Per judged root (a level-0 parent with children): its Yes rate over its judged links."""
    got: dict[int, list[int]] = {}
    for p in pairs or []:
        if p["source"] != source or p["parent_level"] != 0 or p["verdict"] not in ("yes", "no"):
            continue
        got.setdefault(int(p["parent"]), []).append(p["verdict"] == "yes")
    return {r: float(np.mean(v)) for r, v in got.items() if n_children_root[r] > 0}


def fig11_branching(out: Path, pairs: Sequence[dict] | None, n_children_root: np.ndarray,
                    judge_note: str | None = None) -> list[Path]:
    """Figure 11: AutoInterp score of roots with one child vs several (§4.6, Appendix G.2). A
    root's score is the judge's Yes rate over its judged links (the paper uses SAEBench's
    per-feature AutoInterp score; this project's judge scores parent-child pairs)."""
    title = "Figure 11: AutoInterp score by branching factor (HSAE roots)"
    scores = root_scores(pairs, n_children_root)
    if not scores:
        return missing_figure(out, "fig11_branching", title, judge_note or (
            "no judge output with HSAE level-0 parents (data/judge/pairs.jsonl): "
            "run the judge stage"))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    single = [s for r, s in scores.items() if n_children_root[r] == 1]
    multi = [s for r, s in scores.items() if n_children_root[r] > 1]
    bins = np.linspace(0, 1, 11)
    for vals, color, name in ((single, BASE_C, "single child"),
                              (multi, HSAE_C, "multiple children")):
        if vals:
            ax.hist(vals, bins=bins, alpha=0.6, color=color, density=True,
                    label=f"{name}: n={len(vals)}, mean {np.mean(vals):.3f}")
    if single and multi:
        ax.set_title(f"{title}\ngap (multi - single) = "
                     f"{100 * (np.mean(multi) - np.mean(single)):+.2f} points", fontsize=10)
    else:
        ax.set_title(f"{title}\n(only one group judged: no gap)", fontsize=10)
    ax.set_xlabel("root's judge Yes rate over its judged links")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out, "fig11_branching")


__all__ = ["FIG3_SERIES", "MATRYOSHKA_CURVES", "TRAINING_ROWS", "fig11_branching",
           "fig3_hierarchy", "fig8_tradeoff", "fig_ablation",
           "fig_training", "fig_umap", "find_row", "judge_rates", "missing_figure", "root_scores"]
