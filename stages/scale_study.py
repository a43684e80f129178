"""The scale study (issue 14) as DVC experiments: HSAE vs post-hoc at 0.5M, 1M and 4M training
tokens, rho 0.01 and 0.1 (hsae_core.pipeline.scale_study).

    python -m stages.scale_study plan                  # the runs, their overrides, a CPU budget
    python -m stages.scale_study run [--queue]         # dvc exp run -n NAME -S ...
                                                         compute-metrics, one after another
                                                         in the workspace
    python -m stages.scale_study collect               # dvc exp show --json -> results/
    python -m stages.scale_study table                 # the tables again from the JSON

``run`` skips runs already among the experiments (an interrupted study continues) and appends
each run's wall time and train-token count to ``results/scale_study_runs.jsonl``. It leaves the
workspace at the last run's state: ``git checkout -- params.yaml dvc.lock dvclive metrics &&
dvc checkout`` restores the committed run. ``collect`` writes results/scale_study.json (rows,
power-law trends of the gap, run times) and the table as results/scale_study.md and .csv (a
pandas frame: hsae_core.pipeline.scale_study.frame); the report draws the JSON (Figure S).
Runs whose metrics have the Matryoshka arm (issue 26) add it to the rows, the tables and a trend
of the HSAE / Matryoshka Hamming ratio (``hamming_matryoshka``); older results render as before.
Not a DVC stage: it drives ``dvc exp`` and needs a committed reference run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer
from hsae_core.common.console import rprint

from hsae_core.common import fsio
from hsae_core.data.store import open_store
from hsae_core.pipeline import experiments as ex
from hsae_core.pipeline import scale_study as study

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
RESULTS = Path("results")
STEPS_OPT = typer.Option(list(study.STEPS), "--steps", help="training lengths (sae.total_steps)")
RHO_OPT = typer.Option(list(study.RHOS), "--rho", help="values of rho")
SET_OPT = typer.Option(None, "--set", help="KEY=VALUE replacing the study's shared overrides "
                                           "(all of them, when given): a smaller project, a test")


def fail(message: str) -> typer.Exit:
    rprint(f"[red]scale-study: {message}[/red]")
    return typer.Exit(2)


def _runs(steps: list[int], rho: list[float], sets: list[str] | None):
    try:
        return study.runs(steps, rho, ex.parse_sets(sets))
    except ex.ExperimentError as e:
        raise fail(str(e))


def _store_tokens(name: str) -> dict:
    store = open_store("data/activations.zarr")
    return {"train_tokens": store.n_clean("train"), "eval_tokens": store.n_clean("eval")}


@app.command()
def plan(steps: List[int] = STEPS_OPT, rho: List[float] = RHO_OPT,
         sets: Optional[List[str]] = SET_OPT) -> None:
    for name, overrides in _runs(steps, rho, sets):
        print(" ".join(study.run_command(name, overrides)))
    est = study.budget(steps=steps, rhos=rho)
    print("estimated CPU wall time (2 cores): " +
          ", ".join(f"{k} {v / 60:.0f} min" for k, v in est.items()))


@app.command()
def run(
    queue: bool = typer.Option(False, help="put the runs in DVC's queue instead (`dvc queue "
                                           "start -j 1`): each re-trains its baseline"),
    log: Path = typer.Option(RESULTS / "scale_study_runs.jsonl", help="wall times"),
    steps: List[int] = STEPS_OPT, rho: List[float] = RHO_OPT,
    sets: Optional[List[str]] = SET_OPT,
) -> None:
    try:
        ex.run_all(_runs(steps, rho, sets), target="compute-metrics", log=log, queue=queue,
                   record=_store_tokens, say=lambda m: print(m, flush=True))
    except ex.ExperimentError as e:
        raise fail(str(e))


@app.command()
def collect(
    out: Path = typer.Option(RESULTS / "scale_study.json"),
    table: Path = typer.Option(RESULTS / "scale_study.md", help="markdown table (the CSV "
                                                                "goes beside it)"),
    log: Path = typer.Option(RESULTS / "scale_study_runs.jsonl"),
    rev: Optional[str] = typer.Option(None, help="the commit the runs started from, when it "
                                                 "is no longer HEAD (dvc exp show --rev)"),
) -> None:
    try:
        rows = study.study_rows(ex.exp_show(rev))
    except ex.ExperimentError as e:
        raise fail(str(e))
    if not rows:
        raise fail("no study experiment has metrics yet; run "
                   "`python -m stages.scale_study run` first")
    times = ex.read_log(log)
    for row in rows:
        if row.get("train_tokens") is None and row["name"] in times:
            row["train_tokens"] = times[row["name"]]["train_tokens"]
        row["seconds"] = times.get(row["name"], {}).get("seconds")
    trends = {}
    for rho in sorted({r["rho"] for r in rows}):
        sub = [r for r in rows if r["rho"] == rho]
        if len(sub) >= 2:
            trends[f"{rho:g}"] = {"hamming": study.trend(sub, "hamming")}
            if all("diff_matryoshka" in r for r in sub):  # runs with the third arm (issue 26)
                trends[f"{rho:g}"]["hamming_matryoshka"] = study.trend(
                    sub, "hamming", other="matryoshka")
    result = {"rows": rows, "trends": trends, "study_params": study.STUDY_PARAMS,
              "paper_tokens": study.PAPER_TOKENS,
              "wall_seconds": sum(r["seconds"] or 0 for r in rows)}
    fsio.write_text(out, json.dumps(result, indent=1) + "\n")
    _write_table(rows, table)
    for rho, t in trends.items():
        h = t["hamming"]
        print(f"rho {rho}: HSAE / post-hoc Hamming x{math.exp(h['slope_per_decade']):.3f} per "
              f"decade of tokens; predicted gap at {study.PAPER_TOKENS / 1e6:.0f}M tokens "
              f"{100 * h['predicted']:+.1f}% (the paper: -41%), reached at "
              f"{h['tokens_at_target'] / 1e6:.3g}M tokens")
        if "hamming_matryoshka" in t:
            m = t["hamming_matryoshka"]
            print(f"rho {rho}: HSAE / Matryoshka Hamming x{math.exp(m['slope_per_decade']):.3f} "
                  f"per decade of tokens; predicted gap at {study.PAPER_TOKENS / 1e6:.0f}M "
                  f"tokens {100 * m['predicted']:+.1f}%")


@app.command("table")
def table_cmd(
    results: Path = typer.Option(RESULTS / "scale_study.json", help="collect's JSON"),
    table: Path = typer.Option(RESULTS / "scale_study.md", help="markdown table (the CSV "
                                                                "goes beside it)"),
) -> None:
    """Rewrite the Markdown and CSV tables from collect's JSON (no DVC needed)."""
    if not results.is_file():
        raise fail(f"{results} is missing: run `python -m stages.scale_study collect` first")
    _write_table(json.loads(results.read_text())["rows"], table)


def _write_table(rows: list[dict], table: Path) -> None:
    frame = study.frame(rows)
    ex.write_table(frame, table, study.shown(frame))
    print(ex.to_markdown(study.shown(frame)))


if __name__ == "__main__":
    app()
