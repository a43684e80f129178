"""The seed study (issue 22) as DVC experiments: the embedded default trained with several
``sae.seed`` values, every headline metric of each arm (HSAE, post-hoc, Matryoshka where the runs
have it) and each paired difference (HSAE - post-hoc, HSAE - Matryoshka) over seeds with an
interval that combines training and document noise (hsae_core.pipeline.seed_study,
docs/seed-study.md).

    python -m stages.seed_study plan              # the runs and a CPU budget
    python -m stages.seed_study run [--queue]     # dvc exp run -n seed-<s> -S sae.seed=<s>
                                                    compute-metrics, one after another in the
                                                    workspace (the committed run is seed 0)
    python -m stages.seed_study collect           # dvc exp show --json ->
                                                    results/seed_study.{json,csv,md}
    python -m stages.seed_study table             # the tables again from the JSON
    python -m stages.seed_study verdict           # this run's metrics against the study
                                                    (the end of `make repro`)

``run`` skips seeds already among the experiments (an interrupted study continues) and the
committed run's seed, and appends each run's wall time to ``results/seed_study_runs.jsonl``. It
leaves the workspace at the last run's state: ``git checkout -- params.yaml dvc.lock dvclive
metrics && dvc checkout`` restores the committed run. ``verdict`` reads only files (no DVC):
without results/seed_study.json it says so and prints ``dvc metrics diff`` instead.
Not a DVC stage: it drives ``dvc exp`` and needs a committed reference run. dvc is this
interpreter's (``.venv/bin/dvc`` beside ``.venv/bin/python``) when it has one, else the one on
PATH, so ``.venv/bin/python -m stages.seed_study`` works without an activated venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer
import yaml
from hsae_core.common.console import rprint

from hsae_core.common import fsio
from hsae_core.pipeline import experiments as ex
from hsae_core.pipeline import seed_study as study

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
RESULTS = Path("results")
SEEDS_OPT = typer.Option(list(study.SEEDS), "--seed", help="training seeds (sae.seed)")
SET_OPT = typer.Option(None, "--set", help="KEY=VALUE overrides shared by every run (a smaller "
                                           "project, a test): the committed run's seed then "
                                           "runs as an experiment too")
LOG_OPT = typer.Option(RESULTS / "seed_study_runs.jsonl", help="wall times (JSON lines)")
TABLE_OPT = typer.Option(RESULTS / "seed_study.md", help="markdown table (the CSV goes beside "
                                                         "it)")
RAW_DIFF = "dvc metrics diff"


def _dvc() -> str:
    """This interpreter's dvc (the project's .venv/bin) when it has one, else the one on PATH;
    :class:`~hsae_core.pipeline.experiments.ExperimentError` naming the fix when neither has."""
    mine = Path(sys.executable).parent / "dvc"
    if mine.is_file() and os.access(mine, os.X_OK):
        return str(mine)
    found = shutil.which("dvc")
    if found:
        return found
    raise ex.ExperimentError(
        f"dvc not found: not beside this Python ({sys.executable}) nor on PATH. Install the "
        "project with `make setup` (scripts/setup.sh puts dvc in .venv/bin) and run "
        "`.venv/bin/python -m stages.seed_study ...`, or put a dvc on PATH")


def _use_dvc() -> str:
    """:func:`_dvc`; when PATH would find another dvc (or none), its folder is put first on this
    process's PATH: the ``dvc`` that hsae_core.pipeline.experiments runs (``dvc exp show``,
    ``dvc exp run``), and the ``python`` of the stages those experiments run, are then the ones
    beside this interpreter."""
    dvc = _dvc()
    if shutil.which("dvc") != dvc:
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = str(Path(dvc).parent) + (os.pathsep + path if path else "")
    return dvc


def fail(message: str) -> typer.Exit:
    rprint(f"[red]seed-study: {message}[/red]")
    return typer.Exit(2)


def _reference_seed(shows: list[dict]) -> int | None:
    """The committed run's sae.seed, None when the commit holds no metrics."""
    for commit in ex.commits(shows):
        if commit.metrics:
            seed = ex.flatten(commit.params).get(study.SEED_KEY)
            return None if seed is None else int(seed)
    return None


def _plan(seeds: list[int], sets: list[str] | None, shows: list[dict] | None):
    reference = _reference_seed(shows) if shows is not None else study.SEEDS[0]
    return reference, study.runs(seeds, reference, ex.parse_sets(sets))


def _has_matryoshka(dvc_yaml: Path = Path("dvc.yaml")) -> bool:
    """Whether a seed's run trains the Matryoshka too (issue 26's train-matryoshka stage in
    dvc.yaml; without a dvc.yaml, the embedded default's pipeline: yes)."""
    if not dvc_yaml.is_file():
        return True
    return "train-matryoshka" in ((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages")
                                  or {})


@app.command()
def plan(seeds: List[int] = SEEDS_OPT, sets: Optional[List[str]] = SET_OPT) -> None:
    try:
        _use_dvc()
    except ex.ExperimentError as e:
        raise fail(str(e))
    try:
        shows = ex.exp_show()
    except ex.ExperimentError:
        shows = None  # not a DVC repository yet: the embedded default's seed
    try:
        reference, todo = _plan(seeds, sets, shows)
    except ex.ExperimentError as e:
        raise fail(str(e))
    if reference in seeds and not sets:
        print(f"seed {reference}: the committed reference run (read from the commit, not run)")
    for name, overrides in todo:
        print(" ".join(study.run_command(name, overrides)))
    est = study.budget(len(todo), matryoshka=_has_matryoshka())
    print("estimated CPU wall time (2 cores): " +
          ", ".join(f"{k} {v / 60:.0f} min" for k, v in est.items()))


def _unlike_the_commit(shows: list[dict]) -> list[str]:
    """Why the workspace would not run the committed run's configuration: uncommitted code
    (``dvc exp run`` runs the workspace, not the commit), params differing in more than the
    seed."""
    problems = []
    proc = subprocess.run(["git", "status", "--porcelain", "--", "hsae_core", "stages",
                           "dvc.yaml"], capture_output=True, text=True)
    changed = [line[3:] for line in proc.stdout.splitlines()]
    if changed:
        problems.append("uncommitted changes to " + ", ".join(changed[:5])
                        + (f" and {len(changed) - 5} more" if len(changed) > 5 else ""))
    work = [c for c in shows if c.get("rev") == "workspace" and c.get("data")]
    committed = ex.commits(shows)
    if work and committed:
        mine = ex.flatten(ex.entry_params(work[0]))
        base = ex.flatten(committed[0].params)
        keys = sorted(k for k in set(mine) | set(base)
                      if k != study.SEED_KEY and mine.get(k) != base.get(k))
        if keys:
            problems.append("params.yaml differs from the commit's in " + ", ".join(keys[:5]))
    return problems


@app.command()
def run(
    queue: bool = typer.Option(False, help="put the runs in DVC's queue instead (`dvc queue "
                                           "start -j 1`): the same work, each in a temporary "
                                           "folder"),
    log: Path = LOG_OPT, seeds: List[int] = SEEDS_OPT, sets: Optional[List[str]] = SET_OPT,
    allow_dirty: bool = typer.Option(False, help="run even when the workspace's code or params "
                                                 "are not the committed run's"),
) -> None:
    try:
        _use_dvc()
        shows = ex.exp_show()
        problems = [] if allow_dirty or sets else _unlike_the_commit(shows)
        if problems:
            raise ex.ExperimentError(
                "; ".join(problems) + ": the new seeds would not run the committed seed 0's "
                "code and params (dvc exp run runs the workspace). Commit and re-record the "
                "reference run, or restore the workspace (`git checkout -- params.yaml`), or "
                "pass --allow-dirty")
        reference, todo = _plan(seeds, sets, shows)
        if reference in seeds and not sets:
            print(f"seed {reference}: the committed reference run, not re-run")
        ex.run_all(todo, target=study.TARGET, log=log, queue=queue,
                   say=lambda m: print(m, flush=True))
    except ex.ExperimentError as e:
        raise fail(str(e))


@app.command()
def collect(
    out: Path = typer.Option(RESULTS / "seed_study.json"), table: Path = TABLE_OPT,
    log: Path = LOG_OPT, seeds: List[int] = SEEDS_OPT,
    rev: Optional[str] = typer.Option(None, help="the commit the runs started from, when it "
                                                 "is no longer HEAD (dvc exp show --rev)"),
    exp_json: Optional[Path] = typer.Option(None, "--exp-show", help="a saved `dvc exp show "
                                            "--json` output to read instead of running it"),
) -> None:
    try:
        if not exp_json:
            _use_dvc()
        shows = json.loads(exp_json.read_text()) if exp_json else ex.exp_show(rev)
        entries = study.seed_runs(ex.commits(shows), ex.experiments(shows, study.PREFIX), seeds)
        if not entries:
            raise ex.ExperimentError("no seed of the study has metrics yet; run `python -m "
                                     "stages.seed_study run` first")
        result = study.study(entries)
    except ex.ExperimentError as e:
        raise fail(str(e))
    times = ex.read_log(log)
    for r in result["runs"]:
        r["seconds"] = times.get(r["name"], {}).get("seconds")
    result["wall_seconds"] = sum(r["seconds"] or 0 for r in result["runs"])
    fsio.write_text(out, json.dumps(result, indent=1) + "\n")
    _write_table(result, table)
    missing = sorted(set(seeds) - set(result["seeds"]))
    if missing:
        rprint(f"[yellow]seed-study: no run yet for seeds {missing}[/yellow]")
    for group, lacking in (result.get("incomplete") or {}).items():
        rprint(f"[yellow]seed-study: {study.GROUP_LABELS[group]} is missing from the metrics of "
               f"seeds {lacking}: its rows are over the other seeds only[/yellow]")
    if len(result["seeds"]) < 5:
        rprint(f"[yellow]seed-study: {len(result['seeds'])} seeds; the study wants at least 5"
               "[/yellow]")


@app.command("table")
def table_cmd(
    results: Path = typer.Option(RESULTS / "seed_study.json", help="collect's JSON"),
    table: Path = TABLE_OPT,
) -> None:
    """Rewrite the Markdown and CSV tables from collect's JSON (no DVC needed)."""
    if not results.is_file():
        raise fail(f"{results} is missing: run `python -m stages.seed_study collect` first")
    _write_table(json.loads(results.read_text()), table)


def _write_table(result: dict, table: Path) -> None:
    frame = study.frame(result)
    shown = study.shown(frame)
    ex.write_table(frame, table, shown, preface=_preface(result))
    print(ex.to_markdown(shown))
    metrics = result["metrics"]
    for group in study.DIFF_GROUPS:
        if not any(r["group"] == group for r in metrics.values()):
            continue  # a difference the runs do not have (the Matryoshka before issue 26)
        leads = [f"{metrics[k]['label']} ({metrics[k]['favours'] or 'either'})"
                 for k in result["leads"] if metrics[k]["group"] == group]
        print(f"leads, {study.GROUP_LABELS[group]} (combined interval excludes 0, same sign in "
              f"every seed): {', '.join(leads) or 'none'}")


def _preface(result: dict) -> str:
    seeds = ", ".join(str(s) for s in result["seeds"])
    return (f"Seed study: {len(result['seeds'])} training seeds ({seeds}; "
            + ", ".join(f"{r['seed']}: {r['source']} {r['name']}" for r in result["runs"])
            + f"). {result['method'][0].upper()}{result['method'][1:]}. Values per seed, "
            "their mean, sd and min - max; doc se: the document standard error (from each "
            "run's jackknife interval over eval documents). "
            "Full precision: the CSV beside this file; the method: docs/seed-study.md.")


@app.command()
def verdict(
    results: Path = typer.Option(RESULTS / "seed_study.json", help="collect's JSON"),
    metrics: Path = typer.Option(Path("metrics/metrics.json"), help="this run's metrics"),
    params: Path = typer.Option(Path("params.yaml"), help="this run's params"),
    strict: bool = typer.Option(False, help="exit 1 when a metric is outside"),
) -> None:
    """This run's headline metrics and differences against the committed seed study: inside
    or outside the spread another seed would show (hsae_core.pipeline.seed_study.band)."""
    if not results.is_file():
        print(f"seed-study verdict: no {results} (the seed study has not been collected: "
              "`python -m stages.seed_study run`, then `collect`), so no verdict; the raw "
              f"difference from the committed run follows (`{RAW_DIFF}`):", flush=True)
        try:
            dvc = _dvc()
        except ex.ExperimentError as e:
            raise fail(str(e))
        raise typer.Exit(subprocess.run([dvc, *RAW_DIFF.split()[1:]]).returncode)
    if not metrics.is_file():
        raise fail(f"{metrics} is missing: run `dvc repro` first")
    result = json.loads(results.read_text())
    run_params = yaml.safe_load(params.read_text()) if params.is_file() else None
    table, notes = study.verdict(result, json.loads(metrics.read_text()), run_params)
    n = len(result["seeds"])
    print(f"This run against the committed seed study ({n} seeds, {results}): inside = within "
          f"the 95% prediction interval for one more seed, mean +- t_{{{n - 1},0.975}} * sd * "
          "sqrt(1 + 1/n), or the seeds' min - max where wider (docs/seed-study.md).")
    print(ex.to_markdown(table))
    outside = table[table["verdict"] == "OUTSIDE"]
    judged = int((table["verdict"] != "-").sum())
    print(f"{judged - len(outside)} of {judged} inside"
          + (": outside " + ", ".join(f"{m} {k}" for m, k in zip(outside["model"],
                                                                 outside["metric"]))
             if len(outside) else "")
          + ". About 1 in 20 lands outside by chance; many outside, or a difference of the "
          "other sign, says this run is not the study's.")
    for note in notes:
        print(f"note: {note}")
    print(f"Every metric against the committed run, row by row: `{RAW_DIFF}`.")
    if strict and len(outside):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
