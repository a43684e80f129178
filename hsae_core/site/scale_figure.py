"""Figure S, the scale study (issue 14): HSAE vs the post-hoc forest against training tokens,
from results/scale_study.json (``python -m stages.scale_study collect``;
hsae_core.pipeline.scale_study)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hsae_core.site.figures import BASE_C, HSAE_C, RAND_C, _ok, _plt, _save, missing_figure

STEM = "fig_scale"
#: The paper's Table 1 at 100M tokens: Hamming 21.3 (HSAE) vs 36.1 (baseline).
PAPER_GAP = (21.3 - 36.1) / 36.1
RHO_STYLE = {0.01: "-", 0.1: "--"}


def _series(rows: list[dict], model: str, key: str):
    x = np.array([r["tokens"] for r in rows], dtype=float)
    get = (lambda r, k: r[model].get(k)) if model != "gap" else None
    if model == "gap":
        v = np.array([r["diff"][key] / r["posthoc"][key] for r in rows])
        lo = np.array([r["diff"].get(f"{key}_lo", np.nan) / r["posthoc"][key] for r in rows])
        hi = np.array([r["diff"].get(f"{key}_hi", np.nan) / r["posthoc"][key] for r in rows])
    else:
        v = np.array([get(r, key) if _ok(get(r, key)) else np.nan for r in rows])
        lo = np.array([get(r, f"{key}_lo") if _ok(get(r, f"{key}_lo")) else np.nan for r in rows])
        hi = np.array([get(r, f"{key}_hi") if _ok(get(r, f"{key}_hi")) else np.nan for r in rows])
    err = np.nan_to_num(np.vstack([v - lo, hi - v]), nan=0.0).clip(min=0)
    return x, v, err


def fig_scale(out: Path, study: dict | None) -> list[Path]:
    """(a) mean Hamming, (b) the relative Hamming gap (HSAE - post-hoc) / post-hoc with its
    log-linear trend extrapolated to the paper's 100M tokens, (c) pooled P(parent|child),
    (d) topic coherence with the frequency-matched random control; per rho, against training
    tokens (log axis), 95% document-bootstrap intervals."""
    title = "Scale study: HSAE vs post-hoc forest against training tokens (95% intervals)"
    rows = (study or {}).get("rows") or []
    if not rows:
        return missing_figure(out, STEM, title, "no scale study results (results/"
                              "scale_study.json): run `python -m stages.scale_study run` then "
                              "`python -m stages.scale_study collect`")
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    rhos = sorted({r["rho"] for r in rows})
    panels = ((axes[0], "hamming", "(a) mean Hamming \u2193"),
              (axes[2], "p_pc_pooled", "(c) P(parent | child), pooled \u2191"),
              (axes[3], "topic_coherence", "(d) topic coherence of links \u2191"))
    for ax, key, name in panels:
        for rho in rhos:
            sub = [r for r in rows if r["rho"] == rho]
            ls = RHO_STYLE.get(rho, ":")
            x, v, err = _series(sub, "hsae", key)
            ax.errorbar(x, v, yerr=err, color=HSAE_C, ls=ls, marker="o", ms=4, capsize=2,
                        label=f"HSAE \u03c1={rho:g}")
        base = [r for r in rows if r["rho"] == rhos[0]]  # the baseline does not depend on rho
        x, v, err = _series(base, "posthoc", key)
        ax.errorbar(x, v, yerr=err, color=BASE_C, marker="s", ms=4, capsize=2, label="post-hoc")
        if key == "topic_coherence":
            x, v, err = _series(base, "posthoc", "topic_coherence_random")
            ax.errorbar(x, v, yerr=err, color=RAND_C, marker="^", ms=4, capsize=2,
                        label="random pairs (post-hoc)")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[1]
    trends = (study or {}).get("trends") or {}
    target = float((study or {}).get("paper_tokens") or 1e8)
    for rho in rhos:
        sub = [r for r in rows if r["rho"] == rho]
        x, v, err = _series(sub, "gap", "hamming")
        ls = RHO_STYLE.get(rho, ":")
        ax.errorbar(x, 100 * v, yerr=100 * err, color=HSAE_C, ls=ls, marker="o", ms=4,
                    capsize=2, label=f"\u03c1={rho:g}")
        t = trends.get(f"{rho:g}", {}).get("hamming")
        if t:
            xs = np.geomspace(x.min(), target, 20)
            ax.plot(xs, 100 * (t["intercept"] + t["slope_per_decade"] * np.log10(xs)),
                    color="#555555", ls=ls, lw=0.8, label=f"log-linear trend \u03c1={rho:g}")
    ax.scatter([target], [100 * PAPER_GAP], color="black", marker="*", s=80, zorder=5,
               label="paper, 100M tokens")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_title("(b) Hamming gap (HSAE \u2212 post-hoc) / post-hoc, %", fontsize=10)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out, STEM)


__all__ = ["PAPER_GAP", "fig_scale"]
