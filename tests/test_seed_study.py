"""The seed study (issue 22): its plan, its collection from `dvc exp show --json` (fabricated
here: the committed run as seed 0, experiments for the others) with the combined interval
against a hand computation and the lead rule, the verdict that ends `make repro`, the studies'
tables as frames whose CSV reads back as the frame, and (slow) a micro study of real `dvc exp
run`s; issue 26's third arm (the Matryoshka and HSAE - Matryoshka) where the runs' metrics
have it, absent where they do not; dvc found beside the interpreter when it is not on PATH."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pandas as pd
import pytest

from hsae_core.pipeline import ablations
from hsae_core.pipeline import experiments as ex
from hsae_core.pipeline import scale_study
from hsae_core.pipeline import seed_study as study
from tests.pipeline_helpers import (
    REPO,
    dvc,
    env,
    git,
    micro_assets,
    micro_params,
    micro_project,
)

#: t_{4, 0.975} from a printed table (Student's t, 4 degrees of freedom, two-sided 95%).
T4 = 2.776445

#: Per seed 0..4: the paired differences the tests reason about (the rest are filler).
DIFFS = {
    # all negative, interval far from 0: a lead, for the HSAE (lower Hamming is better)
    "hamming": [-1.00, -0.90, -1.10, -0.95, -1.05],
    # interval excludes 0 but seed 4 has the other sign: no lead
    "p_pc": [0.10, 0.11, 0.12, 0.13, -0.01],
    # every seed positive but the interval contains 0: no lead
    "p_cp": [0.001, 0.002, 0.050, 0.001, 0.001],
    # all negative, interval excludes 0: a lead for the post-hoc forest (higher FVE is better)
    "fve": [-0.010, -0.011, -0.012, -0.009, -0.010],
    # all positive: a lead, but L0 is a target: it favours neither model
    "l0": [0.5, 0.6, 0.4, 0.5, 0.55],
}
#: Per seed 0..4: HSAE - Matryoshka, where the runs have the third arm.
DIFFS_MAT = {
    # all negative, far from 0: a lead for the HSAE
    "hamming": [-0.50, -0.60, -0.40, -0.55, -0.45],
    # seed 1 has the other sign: no lead
    "p_pc": [0.05, -0.05, 0.04, 0.06, 0.05],
    # all negative: a lead for the Matryoshka (higher FVE is better)
    "fve": [-0.020, -0.021, -0.019, -0.020, -0.022],
}
DOC_HALF = {"hamming": (0.02, 0.03)}  # (below, above) the value; default 0.001 each side
EVAL = {"eval_tokens": 1000, "eval_documents": 40, "doc_labels": 0}


def repo_env() -> dict:
    """Run a stage of this checkout from another folder."""
    return env() | {"PYTHONPATH": str(REPO)}


def metrics_json(seed: int, *, labels: bool = False, matryoshka: bool = False) -> dict:
    """A metrics.json of one seed: every study metric (topic coherence only with ``labels``),
    each with a document interval; with ``matryoshka`` the third arm's blocks too (``matryoshka``
    like ``posthoc``, ``diff_matryoshka`` like ``diff``)."""
    def entry(key: str, value: float) -> dict:
        below, above = DOC_HALF.get(key, (0.001, 0.001))
        return {key: value, f"{key}_lo": value - below, f"{key}_hi": value + above}

    out = {"hsae": {"mean": {}}, "posthoc": {"mean": {}}, "diff": {}, **EVAL}
    for i, (key, _, _) in enumerate(study.METRICS):
        if key == "topic_coherence" and not labels:
            continue
        post = 1.0 + i + 0.01 * seed
        diff = DIFFS.get(key, [0.1 * (1 + s) for s in range(5)])[seed % 5]
        out["posthoc"]["mean"] |= entry(key, post)
        out["hsae"]["mean"] |= entry(key, post + diff)
        out["diff"] |= entry(key, diff)
        if matryoshka:
            d_mat = DIFFS_MAT.get(key, [0.2 * (1 + s) for s in range(5)])[seed % 5]
            out.setdefault("matryoshka", {"mean": {}})["mean"] |= entry(key, post + diff - d_mat)
            out.setdefault("diff_matryoshka", {}).update(entry(key, d_mat))
    return out


def params_json(seed: int, **extra) -> dict:
    return {"sae": {"seed": seed, "total_steps": 40, **extra}, "rho": 0.01}


def rev(name: str, seed: int, sha: str, metrics: dict | None = None, **extra) -> dict:
    return {"rev": sha, "name": name, "data": {
        "params": {"params.yaml": {"data": params_json(seed, **extra)}},
        "metrics": {"metrics/metrics.json": {"data": metrics or metrics_json(seed)}}}}


def exp_show(seeds=(1, 2, 3, 4), extra: dict | None = None, matryoshka=()) -> list[dict]:
    """`dvc exp show --json` of a study: the committed run (seed 0), experiments seed-<s>, a
    running one (the workspace's metrics: must not count) and an unrelated experiment. The seeds
    in ``matryoshka`` have the third arm's blocks."""
    def of(s: int) -> dict:
        return metrics_json(s, matryoshka=s in matryoshka)

    exps = [{"executor": None, "name": study.run_name(s),
             "revs": [rev(study.run_name(s), s, f"{s}" * 40, of(s))]} for s in seeds]
    exps.append({"executor": {"state": "running", "name": "workspace"}, "name": "seed-9",
                 "revs": [rev("seed-9", 9, "workspace")]})
    ablation = rev("rho-0.1", 0, "e" * 40, **(extra or {}))
    ablation["data"]["params"]["params.yaml"]["data"]["rho"] = 0.1
    exps.append({"executor": None, "name": "rho-0.1", "revs": [ablation]})
    return [{"rev": "workspace", "name": None, "data": {}, "experiments": None},
            rev("main", 0, "a" * 40, of(0)) | {"experiments": exps}]


def test_plan_skips_the_committed_seed_and_stops_after_compute_metrics():
    runs = study.runs()
    assert [n for n, _ in runs] == ["seed-1", "seed-2", "seed-3", "seed-4"]
    name, overrides = runs[0]
    cmd = study.run_command(name, overrides)
    assert cmd == ["dvc", "exp", "run", "-n", "seed-1", "-S", "sae.seed=1", "compute-metrics"]
    assert "--queue" in study.run_command(name, overrides, queue=True)
    assert len(study.SEEDS) >= 5
    # shared overrides change the configuration: the committed seed then runs too
    assert [n for n, _ in study.runs((0, 1), 0, {"metrics.bootstrap": 20})] == ["seed-0",
                                                                                "seed-1"]
    # no committed run: every seed is an experiment
    assert [n for n, _ in study.runs((0, 1), None)] == ["seed-0", "seed-1"]
    est = study.budget(4)  # with issue 26's Matryoshka: its training and its forest too
    assert est["train_matryoshka"] == 4 * 300 and est["matryoshka_forest"] == 4 * 60
    assert est["total"] == pytest.approx(4 * (300 + 300 + 300 + 60 + 60 + 480))  # 100 min
    two = study.budget(4, matryoshka=False)
    assert "train_matryoshka" not in two
    assert two["total"] == pytest.approx(4 * (300 + 300 + 60 + 480))  # 76 min on 2 cores


def test_plan_command_prints_the_runs_and_a_budget(tmp_path):
    out = subprocess.run([sys.executable, "-m", "stages.seed_study", "plan"], cwd=tmp_path,
                         env=repo_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("seed 0: the committed reference run")
    assert lines[1:5] == [f"dvc exp run -n seed-{s} -S sae.seed={s} compute-metrics"
                          for s in (1, 2, 3, 4)]
    assert "train_matryoshka 20 min" in lines[5] and "total 100 min" in lines[5]
    # a pipeline without the Matryoshka's stage: no Matryoshka in the budget
    (tmp_path / "dvc.yaml").write_text("stages:\n  train-hsae:\n    cmd: echo\n")
    out = subprocess.run([sys.executable, "-m", "stages.seed_study", "plan"], cwd=tmp_path,
                         env=repo_env(), capture_output=True, text=True)
    assert out.returncode == 0 and "total 76 min" in out.stdout
    assert "matryoshka" not in out.stdout


def test_plan_finds_dvc_beside_the_interpreter_without_it_on_path(tmp_path):
    """`.venv/bin/python -m stages.seed_study plan` with .venv/bin not on PATH used to end in
    FileNotFoundError for `dvc`: dvc is looked for beside the interpreter first."""
    bare = repo_env() | {"PATH": str(tmp_path)}  # no dvc (nor anything else) on PATH
    out = subprocess.run([sys.executable, "-m", "stages.seed_study", "plan"], cwd=tmp_path,
                         env=bare, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == "dvc exp run -n seed-1 -S sae.seed=1 compute-metrics"


def test_without_any_dvc_the_commands_say_how_to_get_one(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import stages.seed_study as stage

    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ex.ExperimentError, match="dvc not found"):
        stage._dvc()
    for args in (["plan"], ["run"], ["collect"]):
        res = CliRunner().invoke(stage.app, args)
        text = " ".join(res.output.split())
        assert res.exit_code == 2 and "dvc not found" in text and "make setup" in text, args
    (tmp_path / "dvc").write_text("#!/bin/sh\n")
    (tmp_path / "dvc").chmod(0o755)
    assert stage._dvc() == str(tmp_path / "dvc")  # beside the interpreter


def test_run_refuses_a_workspace_unlike_the_commit(tmp_path, monkeypatch):
    """`dvc exp run` runs the workspace: uncommitted code or params other than the commit's
    (beyond the seed) would make seeds 1.. a different run from the committed seed 0."""
    from stages.seed_study import _unlike_the_commit

    (tmp_path / "hsae_core").mkdir()
    (tmp_path / "hsae_core" / "x.py").write_text("A = 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "test@example.com")
    git(tmp_path, "config", "user.name", "test")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "code")
    monkeypatch.chdir(tmp_path)
    shows = exp_show()
    workspace = rev("workspace", 3, "workspace")  # a resumed study: only the seed differs
    shows[0] = workspace | {"experiments": None}
    assert _unlike_the_commit(shows) == []
    shows[0]["data"]["params"]["params.yaml"]["data"]["rho"] = 0.5
    (tmp_path / "hsae_core" / "x.py").write_text("A = 2\n")
    problems = _unlike_the_commit(shows)
    assert problems == ["uncommitted changes to hsae_core/x.py",
                        "params.yaml differs from the commit's in rho"]


def test_t_quantile_matches_tables_and_scipy():
    stats = pytest.importorskip("scipy.stats")
    assert study.t_quantile(0.975, 4) == pytest.approx(T4, abs=1e-6)
    assert study.t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    for df in (2, 3, 9, 30, 200):
        assert study.t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-9)


def test_collect_combines_seed_and_document_noise_and_calls_leads():
    shows = exp_show()
    entries = study.seed_runs(ex.commits(shows), ex.experiments(shows, study.PREFIX))
    assert [(e["seed"], e["source"], e["name"]) for e in entries] == [
        (0, "reference", "main"), (1, "experiment", "seed-1"), (2, "experiment", "seed-2"),
        (3, "experiment", "seed-3"), (4, "experiment", "seed-4")]
    result = study.study(entries)
    m = result["metrics"]
    # by hand: mean, sd over seeds (n - 1), the document se from the mean interval width
    h = m["diff.hamming"]
    values = DIFFS["hamming"]
    mean = sum(values) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    se_doc = 0.05 / 3.92
    half = T4 * math.sqrt(sd ** 2 / 5 + se_doc ** 2)
    assert (h["n"], h["mean"], h["sd"], h["min"], h["max"]) == (
        5, pytest.approx(-1.0), pytest.approx(sd), -1.10, -0.90)
    assert h["se_doc"] == pytest.approx(se_doc, rel=1e-3)
    assert (h["lo"], h["hi"]) == (pytest.approx(-1.0 - half, abs=1e-5),
                                  pytest.approx(-1.0 + half, abs=1e-5))
    assert h["lo"] == pytest.approx(-1.1044, abs=1e-4)  # the numbers, once, by hand
    assert h["values"] == {str(s): v for s, v in enumerate(values)}
    # the lead rule
    assert (h["lead"], h["favours"]) == (True, "hsae")
    p_pc = m["diff.p_pc"]
    assert p_pc["lo"] > 0 and not p_pc["lead"]  # excludes 0, but seed 4 flips the sign
    p_cp = m["diff.p_cp"]
    assert min(DIFFS["p_cp"]) > 0 and p_cp["lo"] < 0 and not p_cp["lead"]
    assert (m["diff.fve"]["lead"], m["diff.fve"]["favours"]) == (True, "posthoc")
    assert (m["diff.l0"]["lead"], m["diff.l0"]["favours"]) == (True, None)
    # the filler differences (0.1 .. 0.5 over seeds, narrow document intervals) are leads too
    assert set(result["leads"]) == {f"diff.{k}" for k, _, _ in study.METRICS
                                    if k not in ("p_pc", "p_cp", "topic_coherence")}
    # models' metrics are summarised alike, without a lead
    assert m["posthoc.hamming"]["mean"] == pytest.approx(1.02) and "lead" not in m[
        "posthoc.hamming"]
    # topic coherence needs labels: absent, not invented
    assert "diff.topic_coherence" not in m and "hsae.topic_coherence" not in m
    assert len(m) == 3 * (len(study.METRICS) - 1)
    assert result["eval"] == EVAL and result["params"]["sae.total_steps"] == 40
    assert "sae.seed" not in result["params"]


def test_collect_refuses_runs_of_another_configuration():
    shows = exp_show()
    shows[1]["experiments"][1]["revs"] = [rev("seed-2", 2, "2" * 40, lr=0.1)]
    with pytest.raises(ex.ExperimentError, match=r"sae\.lr"):
        study.seed_runs(ex.commits(shows), ex.experiments(shows, study.PREFIX))
    shows = exp_show()
    other = metrics_json(3) | {"eval_tokens": 999}
    shows[1]["experiments"][2]["revs"] = [rev("seed-3", 3, "3" * 40, other)]
    with pytest.raises(ex.ExperimentError, match="eval split"):
        study.seed_runs(ex.commits(shows), ex.experiments(shows, study.PREFIX))


def test_collect_command_writes_json_csv_and_markdown(tmp_path):
    (tmp_path / "shows.json").write_text(json.dumps(exp_show()))
    (tmp_path / "runs.jsonl").write_text("".join(
        json.dumps({"name": f"seed-{s}", "seconds": 60.0 * s}) + "\n" for s in (1, 2, 3, 4)))
    out = subprocess.run(
        [sys.executable, "-m", "stages.seed_study", "collect", "--exp-show", "shows.json",
         "--out", "r/s.json", "--table", "r/s.md", "--log", "runs.jsonl"],
        cwd=tmp_path, env=repo_env(),
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "r" / "s.json").read_text())
    assert result["seeds"] == [0, 1, 2, 3, 4] and result["wall_seconds"] == 600.0
    assert [r["seconds"] for r in result["runs"]] == [None, 60.0, 120.0, 180.0, 240.0]
    assert "t_{n-1,0.975}" in result["method"]
    table = pd.read_csv(tmp_path / "r" / "s.csv")
    pd.testing.assert_frame_equal(table, study.frame(result), check_dtype=False)
    md = (tmp_path / "r" / "s.md").read_text()
    assert md.startswith("Seed study: 5 training seeds") and "docs/seed-study.md" in md
    row = next(line for line in md.splitlines() if "HSAE - post-hoc | Hamming " in line)
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    assert cells[2:7] == ["-1.00", "-0.90", "-1.10", "-0.95", "-1.05"]
    assert cells[-1] == "yes: HSAE" and cells[-3] == "[-1.10, -0.90]"
    assert "leads, HSAE - post-hoc (combined interval excludes 0, same sign in every seed): " \
        "Hamming (hsae)" in out.stdout
    # runs without the Matryoshka's blocks: no such group anywhere, not a row of NaN
    assert result["groups"] == ["hsae", "posthoc", "diff"] and result["incomplete"] == {}
    assert "Matryoshka" not in md + out.stdout and "matryoshka" not in set(table["group"])
    assert not table[[c for c in table.columns if c.startswith("seed ")]].isna().any().any()

    # runs with them: the same files hold the Matryoshka and HSAE - Matryoshka
    (tmp_path / "shows.json").write_text(json.dumps(exp_show(matryoshka=range(5))))
    out = subprocess.run(
        [sys.executable, "-m", "stages.seed_study", "collect", "--exp-show", "shows.json",
         "--out", "m/s.json", "--table", "m/s.md", "--log", "runs.jsonl"],
        cwd=tmp_path, env=repo_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "m" / "s.json").read_text())
    assert result["groups"][-1] == "diff_matryoshka" and "diff_matryoshka.fve" in result["leads"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "m" / "s.csv"), study.frame(result),
                                  check_dtype=False)
    md = (tmp_path / "m" / "s.md").read_text()
    row = next(line for line in md.splitlines() if "HSAE - Matryoshka | FVE " in line)
    assert row.rstrip(" |").endswith("yes: Matryoshka")
    assert "leads, HSAE - Matryoshka (combined interval excludes 0, same sign in every seed): " \
        "Hamming (hsae)" in out.stdout and "FVE (matryoshka)" in out.stdout


def study_result(matryoshka=()) -> dict:
    shows = exp_show(matryoshka=matryoshka)
    return study.study(study.seed_runs(ex.commits(shows), ex.experiments(shows, study.PREFIX)))


def test_the_matryoshka_arm_and_its_difference_when_the_runs_have_them(tmp_path):
    result = study_result(matryoshka=range(5))
    m = result["metrics"]
    assert result["groups"] == ["hsae", "posthoc", "matryoshka", "diff", "diff_matryoshka"]
    assert result["incomplete"] == {}
    assert len(m) == 5 * (len(study.METRICS) - 1)  # no topic coherence: no labels
    h = m["diff_matryoshka.hamming"]
    assert h["values"] == {str(s): v for s, v in enumerate(DIFFS_MAT["hamming"])}
    assert (h["n"], h["mean"]) == (5, pytest.approx(-0.5))
    # the same lead rule and directions as HSAE - post-hoc, the other arm named
    assert (h["lead"], h["favours"]) == (True, "hsae")
    assert m["diff_matryoshka.p_pc"]["lead"] is False
    assert (m["diff_matryoshka.fve"]["lead"], m["diff_matryoshka.fve"]["favours"]) == (
        True, "matryoshka")
    assert (m["diff_matryoshka.l0"]["lead"], m["diff_matryoshka.l0"]["favours"]) == (True, None)
    assert "lead" not in m["matryoshka.hamming"]
    assert m["matryoshka.fve"]["mean"] == pytest.approx(
        m["hsae.fve"]["mean"] - m["diff_matryoshka.fve"]["mean"])
    # HSAE - post-hoc is what it was without the third arm
    plain = study_result()["metrics"]
    assert {k: m[k]["mean"] for k in plain} == {k: r["mean"] for k, r in plain.items()}
    # the tables
    frame = study.frame(result)
    shown = study.shown(frame)
    by = {(r["model"], r["metric"]): r for _, r in shown.iterrows()}
    assert by[("HSAE - Matryoshka", "Hamming")]["lead"] == "yes: HSAE"
    assert by[("HSAE - Matryoshka", "FVE")]["lead"] == "yes: Matryoshka"
    assert by[("HSAE - Matryoshka", "P(p|c) macro")]["lead"] == "no"
    assert by[("Matryoshka", "Hamming")]["lead"] == ""
    assert list(dict.fromkeys(shown["model"])) == ["HSAE", "post-hoc", "Matryoshka",
                                                   "HSAE - post-hoc", "HSAE - Matryoshka"]
    md, csv = ex.write_table(frame, tmp_path / "t.md", shown)
    pd.testing.assert_frame_equal(pd.read_csv(csv), frame, check_dtype=False)
    # the verdict judges the third arm too
    run = metrics_json(0, matryoshka=True)
    run["diff_matryoshka"]["hamming"] = 0.4  # the other sign than every seed's
    table, notes = study.verdict(result, run, params_json(0))
    assert len(table) == len(m) and not notes
    verdicts = {(r["model"], r["metric"]): r["verdict"] for _, r in table.iterrows()}
    assert verdicts[("HSAE - Matryoshka", "Hamming")] == "OUTSIDE"
    assert verdicts[("Matryoshka", "FVE")] == "inside"
    assert list(table["verdict"]).count("OUTSIDE") == 1
    # a run without the arm: its rows are not judged, the others are
    table, _ = study.verdict(result, metrics_json(0))
    mat_rows = table[table["model"].isin(["Matryoshka", "HSAE - Matryoshka"])]
    assert len(mat_rows) == 2 * 11 and set(mat_rows["verdict"]) == {"-"}
    assert set(table[~table.index.isin(mat_rows.index)]["verdict"]) == {"inside"}


def test_a_run_with_the_matryoshka_against_a_study_without_it_says_so():
    result = study_result()
    table, notes = study.verdict(result, metrics_json(0, matryoshka=True), params_json(0))
    assert "Matryoshka" not in set(table["model"]) and "HSAE - Matryoshka" not in set(
        table["model"])
    assert notes == ["this run has Matryoshka, HSAE - Matryoshka, which the study has not "
                     "measured: not judged (re-run the seed study)"]


def test_a_group_only_some_seeds_have_is_over_those_seeds_and_named():
    result = study_result(matryoshka=(1, 2, 3, 4))  # the reference run predates the arm
    assert result["incomplete"] == {"matryoshka": [0], "diff_matryoshka": [0]}
    h = result["metrics"]["diff_matryoshka.hamming"]
    assert h["n"] == 4 and set(h["values"]) == {"1", "2", "3", "4"}
    assert result["metrics"]["diff.hamming"]["n"] == 5


def test_verdict_inside_outside_and_notes():
    result = study_result()
    run = metrics_json(0)
    run["diff"]["hamming"] = -0.3  # far outside the seeds' -1.10..-0.90
    run["hsae"]["mean"]["p_pc"] = result["metrics"]["hsae.p_pc"]["max"]  # the edge: inside
    table, notes = study.verdict(result, run, params_json(0))
    assert len(table) == len(result["metrics"]) and not notes
    by = {(r["model"], r["metric"]): r for _, r in table.iterrows()}
    assert by[("HSAE - post-hoc", "Hamming")]["verdict"] == "OUTSIDE"
    assert by[("HSAE - post-hoc", "Hamming")]["this run"] == "-0.30"
    assert by[("HSAE", "P(p|c) macro")]["verdict"] == "inside"
    assert (table["verdict"] == "OUTSIDE").sum() == 1
    # the band: the prediction interval for one more seed
    h = result["metrics"]["diff.hamming"]
    lo, hi = study.band(h)
    assert hi - lo == pytest.approx(2 * T4 * h["sd"] * math.sqrt(1 + 1 / 5), abs=1e-5)
    narrow = h | {"sd": 1e-6}
    assert study.band(narrow) == (h["min"], h["max"])  # never narrower than the seeds' range
    # another configuration, another eval split: said, not hidden
    other = metrics_json(0) | {"eval_documents": 41}
    _, notes = study.verdict(result, other, params_json(7, total_steps=80))
    assert len(notes) == 2 and "sae.total_steps (40 -> 80)" in notes[0]
    assert "sae.seed" not in notes[0] and "eval split" in notes[1]
    # a metric the run lacks is not judged
    table, _ = study.verdict(result, {k: v for k, v in run.items() if k != "diff"})
    assert set(table[table["model"] == "HSAE - post-hoc"]["verdict"]) == {"-"}


def test_verdict_command_and_its_fallback_to_the_raw_diff(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "test")
    dvc(root, "init", "-q")
    git(root, "commit", "-q", "-m", "dvc init")
    (root / "metrics").mkdir()
    (root / "metrics" / "metrics.json").write_text(json.dumps(metrics_json(0)))
    (root / "params.yaml").write_text(json.dumps(params_json(0)))
    cmd = [sys.executable, "-m", "stages.seed_study", "verdict"]
    run_env = repo_env()
    out = subprocess.run(cmd, cwd=root, env=run_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "no results/seed_study.json" in out.stdout and "dvc metrics diff" in out.stdout

    (root / "results").mkdir()
    result = study_result()
    (root / "results" / "seed_study.json").write_text(json.dumps(result))
    out = subprocess.run(cmd, cwd=root, env=run_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    n = len(result["metrics"])
    assert f"{n} of {n} inside" in out.stdout  # the committed seed 0 itself
    assert "prediction interval for one more seed" in out.stdout
    assert out.stdout.rstrip().endswith("row by row: `dvc metrics diff`.")
    assert len(out.stdout.splitlines()) < n + 10  # a verdict, not hundreds of rows

    run = metrics_json(0)
    run["diff"]["hamming"] = -0.3
    (root / "metrics" / "metrics.json").write_text(json.dumps(run))
    out = subprocess.run(cmd, cwd=root, env=run_env, capture_output=True, text=True)
    assert out.returncode == 0 and f"{n - 1} of {n} inside: outside HSAE - post-hoc Hamming" \
        in out.stdout
    strict = subprocess.run(cmd + ["--strict"], cwd=root, env=run_env, capture_output=True,
                            text=True)
    assert strict.returncode == 1


def ablation_shows() -> list[dict]:
    shows = exp_show()
    shows[1]["experiments"] = shows[1]["experiments"][-2:]  # the running one, rho-0.1
    return shows


@pytest.mark.parametrize("which", ["seed", "scale", "ablations"])
def test_tables_are_frames_whose_csv_reads_back(tmp_path, which):
    if which == "seed":
        frame = study.frame(study_result())
        shown = study.shown(frame)
    elif which == "scale":
        from tests.test_scale_study import synthetic_row
        frame = scale_study.frame([synthetic_row(n, 0.1, -0.1) for n in (500, 1000)])
        shown = scale_study.shown(frame)
    else:
        rows = ablations.experiment_rows(ablation_shows())
        assert [r["name"] for r in rows] == ["main", "rho-0.1"]  # the running one left out
        frame = ablations.frame(rows)
        shown = ablations.shown(frame)
        assert list(frame["changed"]) == ["(reference)", "rho=0.1"]
        assert frame.loc[0, "Hamming"] == metrics_json(0)["hsae"]["mean"]["hamming"]
    md, csv = ex.write_table(frame, tmp_path / "t.md", shown)
    assert csv == tmp_path / "t.csv"
    pd.testing.assert_frame_equal(pd.read_csv(csv), frame, check_dtype=False)
    lines = md.read_text().splitlines()
    assert len(lines) == len(frame) + 2 and lines[1].startswith("|:--")
    assert all(line.count(" | ") == len(shown.columns) - 1 for line in lines[:1] + lines[2:])


@pytest.mark.slow  # about 2-3 min on 2 cores: a reference run and one dvc exp run
def test_micro_seed_study_runs_collects_resumes_and_judges(tmp_path):
    model, corpus = micro_assets(tmp_path / "assets")
    params = micro_params(model, corpus)
    params["metrics"] = params["metrics"] | {"bootstrap": 20, "lm_loss_tokens": 0}
    root = micro_project(tmp_path / "project", params)
    dvc(root, "repro", "compute-metrics")
    git(root, "add", "dvc.lock", "metrics", "dvclive")
    git(root, "commit", "-q", "-m", "reference run")
    reference = json.loads((root / "metrics" / "metrics.json").read_text())

    cmd = ["python", "-m", "stages.seed_study", "run", "--seed", "0", "--seed", "1"]
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace(
        "rho: 0.01", "rho: 0.02"))
    refused = subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "differs from the commit's in rho" in refused.stdout
    assert "Running stage" not in refused.stdout + refused.stderr
    git(root, "checkout", "--", "params.yaml")
    out = subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    log = out.stdout + out.stderr
    assert "seed 0: the committed reference run, not re-run" in log
    assert "Running stage 'extract-activations'" not in log  # the committed extraction
    assert log.count("Running stage 'train-hsae'") == 1
    assert log.count("Running stage 'train-baselines'") == 1
    assert "Running stage 'report'" not in log
    again = subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True)
    assert again.returncode == 0 and "seed-1: already an experiment, skipped" in again.stdout

    col = subprocess.run(["python", "-m", "stages.seed_study", "collect", "--seed", "0",
                          "--seed", "1"], cwd=root, env=env(), capture_output=True, text=True)
    assert col.returncode == 0, col.stdout + col.stderr
    result = json.loads((root / "results" / "seed_study.json").read_text())
    assert [(r["seed"], r["source"]) for r in result["runs"]] == [(0, "reference"),
                                                                 (1, "experiment")]
    h = result["metrics"]["hsae.hamming"]
    assert h["values"]["0"] == reference["hsae"]["mean"]["hamming"]
    assert h["values"]["1"] != h["values"]["0"]  # another seed trains another model
    assert h["lo"] < h["mean"] < h["hi"] and h["sd"] > 0
    assert (root / "results" / "seed_study.csv").is_file()
    assert "the study wants at least 5" in col.stdout + col.stderr

    git(root, "checkout", "--", "params.yaml", "dvc.lock", "dvclive", "metrics")
    verdict = subprocess.run(["python", "-m", "stages.seed_study", "verdict"], cwd=root,
                             env=env(), capture_output=True, text=True)
    assert verdict.returncode == 0, verdict.stderr
    n = len(result["metrics"])
    assert f"{n} of {n} inside" in verdict.stdout and "note:" not in verdict.stdout
