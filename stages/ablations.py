"""The paper's ablations (Appendix F) as queued DVC experiments, and one summary table.

    python -m stages.ablations list                     # names and overrides
    python -m stages.ablations queue [NAME ...]         # dvc exp run --queue -n NAME -S ...
                                                          (all by default)
    dvc queue start -j 1                                # run the queue (one at a time on a
                                                          small machine)
    python -m stages.ablations table [--out metrics/ablations.md]   # and metrics/ablations.csv

Not a DVC stage: it drives ``dvc exp`` (the experiments need a committed reference run).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import List, Optional

import typer
from hsae_core.common.console import rprint

from hsae_core.pipeline.ablations import ABLATIONS, experiment_rows, frame, queue_command, shown
from hsae_core.pipeline.experiments import ExperimentError, exp_show, to_markdown, write_table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command("list")
def list_ablations() -> None:
    for name, overrides in ABLATIONS.items():
        print(f"{name}: " + " ".join(f"{k}={v}" for k, v in overrides.items()))


@app.command()
def queue(
    names: Optional[List[str]] = typer.Argument(None, help="ablations to queue (default: all)"),
) -> None:
    unknown = sorted(set(names or []) - set(ABLATIONS))
    if unknown:
        rprint(f"[red]ablations: unknown {unknown}; known: {sorted(ABLATIONS)}[/red]")
        raise typer.Exit(2)
    for name in names or ABLATIONS:
        cmd = queue_command(name, ABLATIONS[name])
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)
    print("queued: run them with `dvc queue start -j 1`, follow with `dvc queue status`")


@app.command()
def table(
    out: Path = typer.Option(Path("metrics/ablations.md"),
                             help="markdown table to write (the CSV goes beside it)"),
) -> None:
    try:
        shows = exp_show()
    except ExperimentError as e:
        rprint(f"[red]ablations: {e}[/red]")
        raise typer.Exit(2)
    table = frame(experiment_rows(shows))
    write_table(table, out, shown(table))
    print(to_markdown(shown(table)))


if __name__ == "__main__":
    app()
