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
    """Tokens, values and interval bounds of one curve (``model`` "gap": the relative gap)."""
    x = np.array([r["tokens"] for r in rows], dtype=float)
    if model == "gap":
        post = np.array([r["posthoc"][key] for r in rows])
        v = np.array([r["diff"][key] for r in rows]) / post
        lo = np.array([r["diff"].get(f"{key}_lo", np.nan) for r in rows]) / post
        hi = np.array([r["diff"].get(f"{key}_hi", np.nan) for r in rows]) / post
        return x, v, lo, hi
    def col(k):
        return np.array([r[model].get(k) if _ok(r[model].get(k)) else np.nan for r in rows])
    return x, col(key), col(f"{key}_lo"), col(f"{key}_hi")


def _curve(ax, series, color, ls, marker, label, scale=1.0):
    """Points joined by a line, each with its interval as a vertical bar drawn from its own
    bounds (a biased bootstrap interval that misses its point is shown as it is)."""
    x, v, lo, hi = series
    ax.plot(x, scale * v, color=color, ls=ls, marker=marker, ms=4, label=label)
    ok = np.isfinite(lo) & np.isfinite(hi)
    ax.vlines(x[ok], scale * lo[ok], scale * hi[ok], color=color, lw=2.5, alpha=0.6)


def _ticks(ax, tokens) -> None:
    ax.set_xscale("log")
    ax.set_xticks(tokens, [f"{t / 1e6:.2g}M" if t < 1e8 else f"{t / 1e6:.0f}M" for t in tokens])
    ax.minorticks_off()
    ax.set_xlabel("training tokens")


def fig_scale(out: Path, study: dict | None) -> list[Path]:
    """(a) mean Hamming, (b) the relative Hamming gap (HSAE - post-hoc) / post-hoc with its
    power-law trend (:func:`hsae_core.pipeline.scale_study.trend`) extrapolated to the paper's
    100M tokens, (c) pooled P(parent|child),
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
    tokens = sorted({r["tokens"] for r in rows})
    for ax, key, name in panels:
        for rho in rhos:
            sub = [r for r in rows if r["rho"] == rho]
            _curve(ax, _series(sub, "hsae", key), HSAE_C, RHO_STYLE.get(rho, ":"), "o",
                   f"HSAE \u03c1={rho:g}")
        base = [r for r in rows if r["rho"] == rhos[0]]  # the baseline does not depend on rho
        _curve(ax, _series(base, "posthoc", key), BASE_C, "-", "s", "post-hoc")
        if key == "topic_coherence":
            _curve(ax, _series(base, "posthoc", "topic_coherence_random"), RAND_C, "-", "^",
                   "random pairs (post-hoc)")
        _ticks(ax, tokens)
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[1]
    trends = (study or {}).get("trends") or {}
    target = float((study or {}).get("paper_tokens") or 1e8)
    for rho in rhos:
        sub = [r for r in rows if r["rho"] == rho]
        ls = RHO_STYLE.get(rho, ":")
        _curve(ax, _series(sub, "gap", "hamming"), HSAE_C, ls, "o", f"\u03c1={rho:g}", 100)
        t = trends.get(f"{rho:g}", {}).get("hamming")
        if t:
            xs = np.geomspace(min(tokens), target, 30)
            fit = np.exp(t["intercept"] + t["slope_per_decade"] * np.log10(xs)) - 1
            ax.plot(xs, 100 * fit, color="#555555", ls=ls, lw=0.8,
                    label=f"power-law trend \u03c1={rho:g}")
    ax.scatter([target], [100 * PAPER_GAP], color="black", marker="*", s=80, zorder=5,
               label="paper, 100M tokens")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylim(-100, max(10, ax.get_ylim()[1]))
    _ticks(ax, tokens + [target])
    ax.set_title("(b) Hamming gap (HSAE \u2212 post-hoc) / post-hoc, %", fontsize=10)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out, STEM)


__all__ = ["PAPER_GAP", "fig_scale"]
