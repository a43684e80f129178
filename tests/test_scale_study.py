"""The scale study (issue 14): its runs as real `dvc exp run`s in a micro project (extraction
once, each length's baseline once for both rho), resumable, collected from `dvc exp show
--json`; the trend against a brute-force fit; the table as a frame (Markdown and a CSV that
reads back as the frame); the figure with and without results."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pandas as pd
import pytest

from hsae_core.pipeline import scale_study as study
from hsae_core.site.scale_figure import fig_scale
from tests.pipeline_helpers import env, micro_assets, micro_params, micro_project, ran_stages


def test_runs_are_length_major_and_stop_after_compute_metrics():
    names = [n for n, _ in study.runs()]
    assert names == ["scale-500-rho0.01", "scale-500-rho0.1", "scale-1000-rho0.01",
                     "scale-1000-rho0.1", "scale-4000-rho0.01", "scale-4000-rho0.1"]
    name, overrides = study.runs()[-1]
    cmd = study.run_command(name, overrides)
    assert cmd[:5] == ["dvc", "exp", "run", "-n", name] and cmd[-1] == "compute-metrics"
    assert "-S" in cmd and "sae.total_steps=4000" in cmd and "rho=0.1" in cmd
    assert "--queue" in study.run_command(name, overrides, queue=True)
    # the longest run sees the extracted train tokens at most ~4 times (the issue's bound)
    train = study.STUDY_PARAMS["extract.max_tokens"] * (1 - study.STUDY_PARAMS[
        "extract.eval_fraction"])
    assert max(study.STEPS) * 1024 / train <= 4.0
    assert max(study.STEPS) / min(study.STEPS) >= 8 and max(study.STEPS) * 1024 >= 4e6


def synthetic_row(steps: int, rho: float, gap: float, mat_gap: float | None = None) -> dict:
    """A collected row; with ``mat_gap`` also the third arm's blocks (issue 26): the
    Matryoshka's Hamming such that (HSAE - Matryoshka) / Matryoshka = ``mat_gap``."""
    post = 12.0
    row = {"name": study.run_name(steps, rho), "steps": steps, "tokens": steps * 1024,
           "rho": rho, "train_tokens": 1_000_000,
           "hsae": {"hamming": post * (1 + gap), "hamming_lo": post * (1 + gap) - 0.1,
                    "hamming_hi": post * (1 + gap) + 0.1, "p_pc_pooled": 0.5,
                    "topic_coherence": 0.6},
           "posthoc": {"hamming": post, "p_pc_pooled": 0.45, "topic_coherence": 0.58,
                       "topic_coherence_random": 0.05},
           "diff": {"hamming": post * gap, "hamming_lo": post * gap - 0.1,
                    "hamming_hi": post * gap + 0.1, "p_pc_pooled": 0.05}}
    if mat_gap is not None:
        hsae = row["hsae"]["hamming"]
        mat = hsae / (1 + mat_gap)
        row["matryoshka"] = {"hamming": mat, "hamming_lo": mat - 0.2, "hamming_hi": mat + 0.2,
                             "p_pc_pooled": 0.47}
        row["diff_matryoshka"] = {"hamming": hsae - mat, "hamming_lo": hsae - mat - 0.05,
                                  "hamming_hi": hsae - mat + 0.05, "p_pc_pooled": 0.03,
                                  "p_pc_pooled_lo": 0.02, "p_pc_pooled_hi": 0.04}
    return row


def test_trend_matches_a_brute_force_least_squares_fit():
    gaps = {500: -0.05, 1000: -0.07, 4000: -0.12}
    rows = [synthetic_row(n, 0.01, g) for n, g in gaps.items()]
    t = study.trend(rows)
    x = [math.log10(n * 1024) for n in gaps]
    y = [math.log(1 + g) for g in gaps.values()]
    best = min(((a, b) for a in np.linspace(-0.2, 0.0, 401) for b in np.linspace(0, 0.6, 601)),
               key=lambda ab: sum((ab[1] + ab[0] * xi - yi) ** 2 for xi, yi in zip(x, y)))
    assert t["slope_per_decade"] == pytest.approx(best[0], abs=1e-3)
    assert t["intercept"] == pytest.approx(best[1], abs=2e-3)
    assert t["predicted"] == pytest.approx(math.exp(t["intercept"] + 8 * t["slope_per_decade"])
                                           - 1)
    assert t["predicted"] > -1  # a ratio: the gap never passes -100%
    # where the fitted gap reaches the paper's -41%
    reach = math.log10(t["tokens_at_target"])
    assert math.exp(t["intercept"] + t["slope_per_decade"] * reach) - 1 == pytest.approx(-0.41)
    assert study.relative_gap(rows[0]) == pytest.approx(-0.05)
    table = study.format_table(rows)
    assert table.count("\n") == 4 and "-12.0%" in table and "4.10M" in table


def test_table_is_a_frame_written_as_markdown_and_csv(tmp_path):
    rows = [synthetic_row(n, 0.01, g) for n, g in {500: -0.05, 4000: -0.12}.items()]
    frame = study.frame(rows)
    assert list(frame["name"]) == ["scale-500-rho0.01", "scale-4000-rho0.01"]
    assert frame.loc[1, "hamming_diff"] == pytest.approx(12.0 * -0.12)
    assert frame.loc[1, "hamming_gap"] == pytest.approx(-0.12)
    assert frame.loc[0, "epochs"] == pytest.approx(500 * 1024 / 1e6)
    assert math.isnan(frame.loc[0, "fve_hsae"])  # not in the row: missing, not invented
    (tmp_path / "s.json").write_text(json.dumps({"rows": rows}))
    out = subprocess.run(["python", "-m", "stages.scale_study", "table", "--results",
                          str(tmp_path / "s.json"), "--table", str(tmp_path / "t.md")],
                         env=env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    back = pd.read_csv(tmp_path / "t.csv")
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)
    md = (tmp_path / "t.md").read_text().splitlines()
    assert len(md) == 4 and "P(p\\|c) pooled" in md[0]  # a literal | escaped in a cell
    cells = [c.strip() for c in md[3].strip("|").split(" | ")]
    assert cells[:3] == ["0.01", "4.10M", "4.10"] and cells[-1] == "-12.0%"
    assert cells[3] == "10.56 [10.46, 10.66] / 12.00"


def test_table_with_the_matryoshka_and_without(tmp_path):
    """Runs with issue 26's third arm add it to every cell (HSAE / post-hoc / Matryoshka), a gap
    against it and its columns in the CSV; a run without it shows `-` there; a table of runs
    from before it (the committed results) has none of it."""
    old = [synthetic_row(n, 0.01, g) for n, g in {500: -0.05, 4000: -0.12}.items()]
    before = study.frame(old)
    assert not [c for c in before if "matryoshka" in c]
    assert "Matryoshka" not in study.format_table(old)
    assert study.shown(before).loc[1, "Hamming"] == "10.56 [10.46, 10.66] / 12.00"

    rows = [synthetic_row(500, 0.01, -0.05), synthetic_row(4000, 0.01, -0.12, mat_gap=-0.2)]
    frame = study.frame(rows)
    assert frame.loc[1, "hamming_matryoshka"] == pytest.approx(12.0 * 0.88 / 0.8)
    assert frame.loc[1, "hamming_diff_matryoshka_hi"] == pytest.approx(
        12.0 * 0.88 - 12.0 * 0.88 / 0.8 + 0.05)
    assert frame.loc[1, "p_pc_pooled_diff_matryoshka_lo"] == pytest.approx(0.02)
    assert frame.loc[1, "hamming_gap_matryoshka"] == pytest.approx(-0.2)
    assert math.isnan(frame.loc[0, "hamming_matryoshka"])
    assert math.isnan(frame.loc[0, "hamming_gap_matryoshka"])
    assert frame.loc[1, "hamming_gap"] == pytest.approx(-0.12)  # against post-hoc, as before
    shown = study.shown(frame)
    assert list(shown.columns)[-2:] == ["Hamming gap", "Hamming gap vs Matryoshka"]
    assert shown.loc[1, "Hamming"] == "10.56 [10.46, 10.66] / 12.00 / 13.20 [13.00, 13.40]"
    assert shown.loc[0, "Hamming"].endswith(" / -")
    assert list(shown["Hamming gap vs Matryoshka"]) == ["-", "-20.0%"]
    (tmp_path / "s.json").write_text(json.dumps({"rows": rows}))
    out = subprocess.run(["python", "-m", "stages.scale_study", "table", "--results",
                          str(tmp_path / "s.json"), "--table", str(tmp_path / "t.md")],
                         env=env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "t.csv"), frame, check_dtype=False)
    # the trend against the Matryoshka: the ratio HSAE / Matryoshka, not HSAE / post-hoc
    both = [synthetic_row(n, 0.1, g, mat_gap=m) for n, g, m in ((500, -0.1, -0.1),
                                                                (4000, -0.2, -0.3))]
    t = study.trend(both, other="matryoshka")
    assert t["slope_per_decade"] == pytest.approx(math.log(0.7 / 0.9) / math.log10(8))
    assert study.trend(both)["slope_per_decade"] == pytest.approx(
        math.log(0.8 / 0.9) / math.log10(8))
    assert math.isnan(study.relative_gap(old[0], other="matryoshka"))


def test_collected_rows_carry_the_matryoshka_where_the_run_has_it():
    def rev(name, steps, matryoshka):
        params = {"sae": {"total_steps": steps, "batch_size": 1024}, "rho": 0.01,
                  "extract": {"max_tokens": 1000}}
        group = {"mean": {"hamming": 5.0, "hamming_lo": 4.9, "fve": 0.7, "p_cp": 0.3}}
        metrics = {"hsae": group, "posthoc": group, "diff": {"hamming": 0.0}, "eval_tokens": 10}
        if matryoshka:
            metrics |= {"matryoshka": {"mean": {"hamming": 6.0, "p_cp": 0.2}},
                        "diff_matryoshka": {"hamming": -1.0, "hamming_lo": -1.1, "p_cp": 0.1}}
        return {"executor": None, "name": name, "revs": [{"rev": name[-1] * 40, "name": name,
                "data": {"params": {"params.yaml": {"data": params}},
                         "metrics": {"metrics/metrics.json": {"data": metrics}}}}]}
    shown = [{"rev": "workspace", "experiments": None},
             {"rev": "f" * 40, "experiments": [rev("scale-40-rho0.01", 40, True),
                                               rev("scale-20-rho0.01", 20, False)]}]
    old, new = study.study_rows(shown)
    assert "matryoshka" not in old and "diff_matryoshka" not in old
    assert new["matryoshka"] == {"hamming": 6.0}  # the study's metrics only (no p_cp)
    assert new["diff_matryoshka"] == {"hamming": -1.0, "hamming_lo": -1.1}
    assert study.relative_gap(new, other="matryoshka") == pytest.approx(-1 / 6)


def test_budget_counts_the_matryoshka_per_length():
    with_m, without = study.budget(), study.budget(matryoshka=False)
    assert "train_matryoshka" not in without
    assert with_m["train_matryoshka"] == with_m["train_baseline"] == sum(study.STEPS) * 0.265
    assert with_m["matryoshka_forest"] == 60.0 * len(study.STEPS)
    assert with_m["total"] == pytest.approx(without["total"] + with_m["train_matryoshka"]
                                            + with_m["matryoshka_forest"])


def test_rows_skip_a_running_experiment():
    """`dvc exp show --json` lists a running workspace experiment with the workspace's metrics,
    which are the previous run's: it must not become a row."""
    def rev(name, steps, rho, hamming, rev="abc1234"):
        params = {"sae": {"total_steps": steps, "batch_size": 1024}, "rho": rho,
                  "extract": {"max_tokens": 1000}}
        group = {"mean": {"hamming": hamming, "fve": 0.7}}
        metrics = {"hsae": group, "posthoc": group, "diff": {"hamming": 0.0},
                   "eval_tokens": 10}
        return {"rev": rev, "name": name, "data": {
            "params": {"params.yaml": {"data": params}},
            "metrics": {"metrics/metrics.json": {"data": metrics}}}}
    shown = [{"rev": "workspace", "experiments": None},
             {"rev": "f" * 40, "experiments": [
                 {"executor": {"state": "running", "name": "workspace"}, "name": "scale-40-rho0.1",
                  "revs": [rev("scale-40-rho0.1", 40, 0.1, 5.0, rev="workspace")]},
                 {"executor": None, "name": "scale-20-rho0.1",
                  "revs": [rev("scale-20-rho0.1", 20, 0.1, 5.0)]},
                 {"executor": None, "name": "other", "revs": [rev("other", 20, 0.1, 1.0)]}]}]
    rows = study.study_rows(shown)
    assert [(r["name"], r["tokens"], r["hsae"]["hamming"]) for r in rows] == [
        ("scale-20-rho0.1", 20 * 1024, 5.0)]


def test_figure_with_and_without_results(tmp_path):
    rows = [synthetic_row(n, rho, g * (2 if rho == 0.1 else 1)) for n, g in
            {500: -0.05, 1000: -0.07, 4000: -0.12}.items() for rho in (0.01, 0.1)]
    trends = {f"{rho:g}": {"hamming": study.trend([r for r in rows if r["rho"] == rho])}
              for rho in (0.01, 0.1)}
    paths = fig_scale(tmp_path / "a", {"rows": rows, "trends": trends, "paper_tokens": 1e8})
    assert [p.suffix for p in paths] == [".png", ".svg"] and paths[0].stat().st_size > 10_000
    svg = paths[1].read_text()
    assert "paper, 100M tokens" in svg and "power-law trend" in svg
    missing = fig_scale(tmp_path / "b", None)
    assert "stages.scale_study run" in missing[1].read_text()


@pytest.mark.slow  # about 3 min on 2 cores: four dvc exp runs of the micro pipeline
def test_micro_study_runs_collects_and_resumes(tmp_path):
    model, corpus = micro_assets(tmp_path / "assets")
    params = micro_params(model, corpus)
    root = micro_project(tmp_path / "project", params)
    cmd = ["python", "-m", "stages.scale_study", "run", "--steps", "20", "--steps", "40",
           "--rho", "0.01", "--rho", "0.1", "--set", "extract.max_tokens=2500",
           "--set", "metrics.bootstrap=20", "--set", "metrics.lm_loss_tokens=0"]
    out = subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    log = out.stdout + out.stderr
    # extraction once; each length's baseline once, shared by both values of rho
    assert log.count("Running stage 'extract-activations'") == 1
    assert log.count("Running stage 'train-baselines'") == 2
    assert log.count("Running stage 'train-hsae'") == 4
    assert not {"report", "judge-hsae", "evidence-hsae"} & ran_stages(log)
    runs = [json.loads(x) for x in (root / "results" / "scale_study_runs.jsonl").read_text()
            .splitlines()]
    assert [r["name"] for r in runs] == ["scale-20-rho0.01", "scale-20-rho0.1",
                                         "scale-40-rho0.01", "scale-40-rho0.1"]
    assert all(r["seconds"] > 0 and r["train_tokens"] > 0 for r in runs)

    again = subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count("already an experiment, skipped") == 4
    assert "Running stage" not in again.stdout + again.stderr

    col = subprocess.run(["python", "-m", "stages.scale_study", "collect"], cwd=root, env=env(),
                         capture_output=True, text=True)
    assert col.returncode == 0, col.stdout + col.stderr
    result = json.loads((root / "results" / "scale_study.json").read_text())
    rows = result["rows"]
    assert [(r["rho"], r["steps"], r["tokens"]) for r in rows] == [
        (0.01, 20, 1280), (0.01, 40, 2560), (0.1, 20, 1280), (0.1, 40, 2560)]
    for r in rows:
        assert r["max_tokens"] == 2500 and r["train_tokens"] == runs[0]["train_tokens"]
        assert r["hsae"]["hamming_lo"] <= r["hsae"]["hamming"] <= r["hsae"]["hamming_hi"]
        assert r["diff"]["hamming"] == pytest.approx(r["hsae"]["hamming"]
                                                     - r["posthoc"]["hamming"])
        assert r["seconds"] > 0
    # both rho share each length's baseline: identical post-hoc numbers
    assert rows[0]["posthoc"] == rows[2]["posthoc"] and rows[1]["posthoc"] == rows[3]["posthoc"]
    assert set(result["trends"]) == {"0.01", "0.1"}
    assert (root / "results" / "scale_study.md").read_text().count("\n") == 6
    table = pd.read_csv(root / "results" / "scale_study.csv")
    assert list(table["name"]) == [r["name"] for r in rows]
    assert list(table["hamming_hsae"]) == [r["hsae"]["hamming"] for r in rows]
