"""The scale study (issue 14) as DVC experiments: HSAE vs post-hoc at 0.5M, 1M and 4M training
tokens, rho 0.01 and 0.1 (hsae_core.pipeline.scale_study).

    python -m stages.scale_study plan                  # the runs, their overrides, a CPU budget
    python -m stages.scale_study run [--queue]         # dvc exp run -n NAME -S ...
                                                         compute-metrics, one after another
                                                         in the workspace
    python -m stages.scale_study collect               # dvc exp show --json -> results/

``run`` skips runs already among the experiments (an interrupted study continues) and appends
each run's wall time and train-token count to ``results/scale_study_runs.jsonl``. It leaves the
workspace at the last run's state: ``git checkout -- params.yaml dvc.lock dvclive metrics &&
dvc checkout`` restores the committed run. ``collect`` writes results/scale_study.json (rows,
power-law trends of the gap, run times) and results/scale_study.md; the report draws the JSON
(Figure S).
Not a DVC stage: it drives ``dvc exp`` and needs a committed reference run.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich import print as rprint

from hsae_core.common import fsio
from hsae_core.data.store import open_store
from hsae_core.pipeline import scale_study as study

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
RESULTS = Path("results")
STEPS_OPT = typer.Option(list(study.STEPS), "--steps", help="training lengths (sae.total_steps)")
RHO_OPT = typer.Option(list(study.RHOS), "--rho", help="values of rho")
SET_OPT = typer.Option(None, "--set", help="KEY=VALUE replacing the study's shared overrides "
                                           "(all of them, when given): a smaller project, a test")


def _runs(steps: list[int], rho: list[float], sets: list[str] | None):
    params = None
    if sets:
        bad = [s for s in sets if "=" not in s]
        if bad:
            rprint(f"[red]scale-study: --set wants KEY=VALUE, got {bad}[/red]")
            raise typer.Exit(2)
        params = dict(s.split("=", 1) for s in sets)
    return study.runs(steps, rho, params)


def _exp_show(rev: str | None = None) -> list[dict]:
    cmd = ["dvc", "exp", "show", "--json"] + (["--rev", rev] if rev else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        rprint(f"[red]scale-study: `dvc exp show --json` failed: {proc.stderr.strip()}[/red]")
        raise typer.Exit(2)
    return json.loads(proc.stdout)


def _existing(exp_show: list[dict]) -> set[str]:
    return {rev.get("name") for commit in exp_show for exp in commit.get("experiments") or []
            for rev in exp.get("revs") or []}


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
    todo = _runs(steps, rho, sets)
    done = _existing(_exp_show())
    for name, overrides in todo:
        if name in done:
            print(f"{name}: already an experiment, skipped")
            continue
        cmd = study.run_command(name, overrides, queue=queue)
        print(" ".join(cmd), flush=True)
        start = time.time()
        subprocess.run(cmd, check=True)
        if queue:
            continue
        store = open_store("data/activations.zarr")
        entry = {"name": name, "seconds": round(time.time() - start, 1),
                 "train_tokens": store.n_clean("train"), "eval_tokens": store.n_clean("eval")}
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(f"{name}: {entry['seconds'] / 60:.1f} min", flush=True)


@app.command()
def collect(
    out: Path = typer.Option(RESULTS / "scale_study.json"),
    table: Path = typer.Option(RESULTS / "scale_study.md"),
    log: Path = typer.Option(RESULTS / "scale_study_runs.jsonl"),
    rev: Optional[str] = typer.Option(None, help="the commit the runs started from, when it "
                                                 "is no longer HEAD (dvc exp show --rev)"),
) -> None:
    rows = study.study_rows(_exp_show(rev))
    if not rows:
        rprint("[red]scale-study: no study experiment has metrics yet; run "
               "`python -m stages.scale_study run` first[/red]")
        raise typer.Exit(2)
    times = {}
    if log.is_file():
        times = {e["name"]: e for e in map(json.loads, log.read_text().splitlines()) if e}
    for row in rows:
        if row.get("train_tokens") is None and row["name"] in times:
            row["train_tokens"] = times[row["name"]]["train_tokens"]
        row["seconds"] = times.get(row["name"], {}).get("seconds")
    trends = {}
    for rho in sorted({r["rho"] for r in rows}):
        sub = [r for r in rows if r["rho"] == rho]
        if len(sub) >= 2:
            trends[f"{rho:g}"] = {"hamming": study.trend(sub, "hamming")}
    result = {"rows": rows, "trends": trends, "study_params": study.STUDY_PARAMS,
              "paper_tokens": study.PAPER_TOKENS,
              "wall_seconds": sum(r["seconds"] or 0 for r in rows)}
    fsio.write_text(out, json.dumps(result, indent=1) + "\n")
    text = study.format_table(rows)
    fsio.write_text(table, text + "\n")
    print(text)
    for rho, t in trends.items():
        h = t["hamming"]
        print(f"rho {rho}: HSAE / post-hoc Hamming x{math.exp(h['slope_per_decade']):.3f} per "
              f"decade of tokens; predicted gap at {study.PAPER_TOKENS / 1e6:.0f}M tokens "
              f"{100 * h['predicted']:+.1f}% (the paper: -41%), reached at "
              f"{h['tokens_at_target'] / 1e6:.3g}M tokens")


if __name__ == "__main__":
    app()
