"""The report with the third arm (issue 26): a Matryoshka BatchTopK SAE trained on the small run of
tests/test_report.py by the pipeline's own code (hsae_core.pipeline.matryoshka_run), its groups
as levels with the baseline's post-hoc forest, its evidence, its metrics block and its DVCLive
curves. The real report stage then shows three forests (checked against a dense recount and in
headless Chromium) and draws a third series in Figure 3, fig_semantic and fig_training; without
the arm's folder, the report is the two-arm one and its figures never mention it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from hsae_core.data.reader import EvalActivations
from hsae_core.evaluation.evaluate import evaluate_hsae
from hsae_core.evaluation.evidence import EvidenceConfig, collect_evidence, save_evidence
from hsae_core.model.config import HSAEConfig
from hsae_core.model.posthoc import posthoc_forest
from hsae_core.pipeline.io import save_hsae
from hsae_core.pipeline.matryoshka_run import (
    MatryoshkaParams,
    as_levels_model,
    matryoshka_config,
    train_matryoshka_on_store,
)
from hsae_core.pipeline.train_run import TrainRunConfig
from hsae_core.site import figures
from tests.store_helpers import WORDS
from tests.test_report import (  # noqa: F401 (run: the small run, a module fixture)
    COMMON,
    LEVELS,
    _need_browser,
    _png_ok,
    browser_page,
    dense_counts,
    read_js,
    run,
    stage,
)

LABEL = "Matryoshka (groups as levels, post-hoc forest)"
COLORS = {"hsae": figures.HSAE_C, "posthoc": figures.BASE_C, "matryoshka": figures.MATR_C}


@pytest.fixture(scope="module")
def arm(run):
    """The Matryoshka arm of the small run, laid out as the pipeline lays it out: its forest
    folder (groups as levels + post-hoc forest), evidence/matryoshka, a metrics.json with its
    block, and curves/{hsae,matryoshka} (DVCLive)."""
    root = run["root"]
    sae = HSAEConfig(**COMMON)
    cfg = matryoshka_config(sae, MatryoshkaParams(lr=3e-3, threshold_start_frac=0.5))
    trainer = train_matryoshka_on_store(
        cfg, run["store"], run["scale"], checkpoint=root / "matryoshka.pt",
        curves=root / "curves" / "matryoshka", run=TrainRunConfig(checkpoint_every=0,
                                                                  log_every=10))
    model = as_levels_model(sae, trainer.model.group_levels())
    model.forest = posthoc_forest(model, "encoder", 0.2, "partial")
    save_hsae(model, root / "matryoshka_forest")
    shutil.copytree(root / "curves-hsae", root / "curves" / "hsae")
    ecfg = EvidenceConfig(n_top=4, n_sampled=2, buffer=4, batch_size=256)
    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + [f" {w}" for w in WORDS]
    levels = collect_evidence(
        model, lambda: EvalActivations(run["store"], run["scale"], batch_size=256), ecfg)
    save_evidence(levels, root / "evidence" / "matryoshka", vocab=vocab,
                  meta={"source": "matryoshka"}, cfg=ecfg)
    metrics = json.loads((root / "metrics.json").read_text())
    metrics["matryoshka"] = evaluate_hsae(model, (
        b.activations for b in EvalActivations(run["store"], run["scale"], batch_size=512)))
    (root / "metrics3.json").write_text(json.dumps(metrics))
    return {"model": model, "metrics": metrics,
            "args": ("--matryoshka", str(root / "matryoshka_forest"),
                     "--metrics", str(root / "metrics3.json"), "--curves", str(root / "curves"))}


def _svg(summary: dict, fig: str) -> str:
    return Path(summary["figures"][fig][1]).read_text()


def _fills(svg: str, color: str) -> int:
    return svg.count(f"fill: {color}")


def test_three_forests_in_the_site_and_a_third_series_in_the_figures(run, arm, tmp_path):
    summary, output = stage(run, tmp_path / "report", *arm["args"])
    assert "forests: hsae, baseline, matryoshka" in output and "no Matryoshka" not in output
    site = tmp_path / "report" / "site"
    _, ov = read_js(site / "data" / "overview.js")
    assert [m["name"] for m in ov["models"]] == ["hsae", "baseline", "matryoshka"]
    assert summary["models"] == ["hsae", "baseline", "matryoshka"]
    m = ov["models"][2]
    assert m["label"] == LABEL and "post-hoc rule" in m["about"] and not ov["models"][0]["about"]
    assert m["level_sizes"] == list(LEVELS) and m["judge"] is False
    assert "does not judge" in m["judge_how"] and m["notes"] == []  # its evidence was found
    # the Matryoshka's trees against a dense recount of its groups' firing
    model = arm["model"]
    tokens, fired, joint = dense_counts(model, run["store"], run["scale"])
    assert m["tokens"] == tokens and summary["trees"]["matryoshka"] == len(m["trees"]["l"]) > 0
    seen = set()
    for l, i in zip(m["trees"]["l"], m["trees"]["i"]):
        key, tree = read_js(site / "data" / "matryoshka" / f"t{l}_{i}.js")
        assert key == f"matryoshka/t{l}_{i}" and tree["model"] == "matryoshka"
        for k, n in enumerate(tree["nodes"]):
            seen.add((n["l"], n["i"]))
            assert abs(n["f"] - fired[n["l"]][n["i"]] / tokens) < 1e-6
            if k:
                par = tree["nodes"][n["p"]]
                assert model.forest.parent_of[par["l"]][n["i"]] == par["i"]
                c = fired[n["l"]][n["i"]]
                want = joint[par["l"]][n["i"]] / c if c else None
                assert (n["pc"] is None) if want is None else abs(n["pc"] - want) < 1e-4
    linked = {(l + 1, j) for l, p in enumerate(model.forest.parent_of)
              for j in (p >= 0).nonzero()[:, 0].tolist()}
    assert linked <= seen and m["n_lone"] == sum(LEVELS) - len(seen)
    nodes = [n for f in (site / "data" / "matryoshka").glob("t*.js")
             for n in read_js(f)[1]["nodes"]]
    assert any(n["ctx"] for n in nodes)  # contexts from evidence/matryoshka
    # Figure 3: three series of bars, one per arm, each in its colour; the Matryoshka's values
    fig3 = _svg(summary, "fig3")
    n_pairs = len(LEVELS) - 1
    for name, color in COLORS.items():
        assert _fills(fig3, color) >= 6 + 6, (name, _fills(fig3, color))  # legend + bars
    assert fig3.count("<!-- Matryoshka -->") == 6  # in each panel's legend
    mean = arm["metrics"]["matryoshka"]["mean"]
    assert any(f"<!-- {mean[k]:.3g} -->" in fig3 for k in ("hamming", "p_pc", "p_cp")), mean
    assert n_pairs == len([k for k in arm["metrics"]["matryoshka"] if k.startswith("pair")])
    # (evaluate_hsae has no semantic scores: fig_semantic's series are checked on synthetic
    # metrics below)
    training = _svg(summary, "fig_training")
    assert "vs Matryoshka (groups as levels)" in training
    assert training.count(f"stroke: {figures.MATR_C}") >= 3 * len(LEVELS)  # L0, FVE, MSE rows
    for paths in summary["figures"].values():
        _png_ok(Path(paths[0]))


def test_without_the_arm_the_report_is_the_two_arm_one(run, arm, tmp_path):
    summary, output = stage(run, tmp_path / "report", "--curves", str(run["root"] / "curves"))
    assert "forests: hsae, baseline (no Matryoshka:" in output
    _, ov = read_js(tmp_path / "report" / "site" / "data" / "overview.js")
    assert [m["name"] for m in ov["models"]] == ["hsae", "baseline"]
    assert not (tmp_path / "report" / "site" / "data" / "matryoshka").exists()
    assert set(summary["trees"]) == {"hsae", "baseline"}
    for fig in ("fig3", "fig_semantic", "fig_training"):
        svg = _svg(summary, fig)
        assert "Matryoshka" not in svg and figures.MATR_C not in svg, fig
    assert _fills(_svg(summary, "fig3"), figures.HSAE_C) >= 12
    # the arm's metrics block without its forest (compute-metrics ran it, the report did not get
    # the folder): Figure 3 still draws what metrics.json holds
    summary, _ = stage(run, tmp_path / "again", "--metrics", str(run["root"] / "metrics3.json"))
    assert "<!-- Matryoshka -->" in _svg(summary, "fig3")


def _metrics(three: bool) -> dict:
    rng = np.random.default_rng(1)
    keys = ("hamming", "p_pc", "p_cp", "hamming_per_parent", "p_pc_pooled", "p_cp_pooled",
            "topic_coherence", "topic_coherence_random", "doc_cooccurrence",
            "doc_cooccurrence_random")

    def block():
        out = {}
        for g in ("pair0", "pair1", "mean"):
            vals = rng.uniform(0.2, 0.8, len(keys))
            out[g] = {k: float(v) for k, v in zip(keys, vals)}
            out[g] |= {f"{k}_lo": float(v) - 0.05 for k, v in zip(keys, vals)}
            out[g] |= {f"{k}_hi": float(v) + 0.05 for k, v in zip(keys, vals)}
        return out
    names = ("hsae", "posthoc", "matryoshka") if three else ("hsae", "posthoc")
    return {name: block() for name in names}


@pytest.mark.parametrize("three", [False, True])
def test_fig3_and_fig_semantic_draw_one_series_per_arm_in_metrics(tmp_path, three):
    m = _metrics(three)
    svg = figures.fig3_hierarchy(tmp_path, m, None)[1].read_text()
    bars = 6 * 3 + 6  # six panels of (two pairs + mean) bars, and one legend entry each
    for name, color in COLORS.items():
        assert _fills(svg, color) == (bars if name in m else 0), name
    assert ("vs Matryoshka" in svg) == three
    sem = figures.fig_semantic(tmp_path, m)[1].read_text()
    assert _fills(sem, figures.MATR_C) == (2 * 3 + 2 if three else 0)  # two panels
    assert _fills(sem, figures.MATR_LIGHT_C) == (2 * 3 + 2 if three else 0)
    assert _fills(sem, figures.BASE_C) == 2 * 3 + 2


def test_fig_training_draws_the_arms_prefix_and_group_curves(tmp_path):
    steps = [10, 20, 30]
    curve = (steps, [0.1, 0.2, 0.3])
    arm = {f"{k}{g}/{q}": curve for g in range(3) for k, q in
           (("prefix", "fve"), ("prefix", "mse"), ("group", "l0"))} | {"loss": curve}
    svg = figures.fig_training(tmp_path, {"matryoshka": arm})[1].read_text()
    assert svg.count(f"stroke: {figures.MATR_C}") == 3 * 3 + 1  # 3 rows x 3 groups + legend
    assert "level 2" in svg and "level 3" not in svg
    hsae = {f"level{l}/l0": curve for l in range(3)}
    svg = figures.fig_training(tmp_path, {"hsae": hsae, "matryoshka": {}})[1].read_text()
    assert "Matryoshka: no curves found" in svg and figures.MATR_C not in svg
    svg = figures.fig_training(tmp_path, {"hsae": hsae})[1].read_text()
    assert "Matryoshka" not in svg


def test_three_forests_in_headless_chromium(run, arm, tmp_path):
    exe = _need_browser()
    stage(run, tmp_path / "report", *arm["args"])
    site = tmp_path / "report" / "site"
    _, ov = read_js(site / "data" / "overview.js")
    t = ov["models"][2]["trees"]
    with browser_page(exe) as page:
        page.goto((site / "index.html").as_uri())
        page.locator("table.trees tbody tr").first.wait_for()
        buttons = page.locator("#models button").all_inner_texts()
        assert buttons == ["HSAE", "Baseline (independent SAEs + post-hoc forest)", LABEL,
                           "side by side"], buttons
        page.click(f"#models button:has-text('{LABEL}')")
        page.wait_for_function("location.hash === '#/matryoshka'")
        page.locator("table.trees tbody tr").first.wait_for()
        assert page.locator("main h2").inner_text().startswith(LABEL)
        assert "nested groups" in page.locator("p.about").inner_text()
        assert "does not judge" in page.locator("main p.warn").first.inner_text()
        assert page.locator("table.trees tbody tr").count() == min(len(t["l"]), 200)
        root = f"t{t['l'][0]}_{t['i'][0]}"
        page.locator(f"tr[data-root={root}]").click()
        page.locator(f"#n{t['l'][0]}_{t['i'][0]}").wait_for()
        assert re.fullmatch(rf"#/matryoshka/{root}(/.*)?",
                            page.evaluate("location.hash")), page.evaluate("location.hash")
        page.click("#models button:has-text('side by side')")
        frames = page.locator(".panes iframe")
        frames.first.wait_for()
        assert [frames.nth(k).get_attribute("src") for k in range(frames.count())] == [
            f"index.html?embed#/{n}" for n in ("hsae", "baseline", "matryoshka")]
