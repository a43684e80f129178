"""What the studies built on DVC experiments share (the ablations, the scale study, the seed
study): the ``dvc exp run`` command of one run, the finished experiments of ``dvc exp show
--json``, running a list of experiments one after another with a log of their wall times, and
tables as pandas DataFrames written as Markdown and CSV.

``dvc exp show --json`` is a list of commits (the workspace first); each commit's ``data`` holds
its params and metrics files, and its ``experiments`` the experiments started from it, each with
``revs`` (the experiment's data) and an ``executor`` while it is queued or running. A running
workspace experiment is listed with the workspace's metrics, which are the previous run's:
:func:`experiments` leaves it out.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from hsae_core.common import fsio

PARAMS_FILE = "params.yaml"
METRICS_FILE = "metrics/metrics.json"


class ExperimentError(RuntimeError):
    """``dvc exp`` failed, or its experiments cannot form the study asked for."""


@dataclass(frozen=True)
class Experiment:
    """One commit or finished experiment of ``dvc exp show --json``: its name, revision, params
    (``params.yaml``, nested as in the file) and metrics (``metrics/metrics.json``)."""

    name: str
    rev: str
    params: dict
    metrics: dict


def exp_run_command(name: str, overrides: dict[str, object], *, queue: bool = False,
                    target: str | None = None) -> list[str]:
    """``dvc exp run -n NAME [--queue] -S key=value ... [TARGET]``: ``target`` stops the run
    after that stage (and what it needs)."""
    cmd = ["dvc", "exp", "run", "-n", name] + (["--queue"] if queue else [])
    for key, value in overrides.items():
        cmd += ["-S", f"{key}={value}"]
    return cmd + ([target] if target else [])


def get(tree: dict, path: str):
    """``tree["a"]["b"]`` for ``path`` ``"a.b"``; None where a part is missing."""
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested dicts as ``{"a.b": value}``."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _file_data(data: dict, kind: str, path: str) -> dict:
    return ((data.get(kind) or {}).get(path) or {}).get("data") or {}


def entry_params(entry: dict, params_file: str = PARAMS_FILE) -> dict:
    """The params (nested) of one entry of ``dvc exp show --json`` (a commit, the workspace or
    an experiment's rev)."""
    return _file_data(entry.get("data") or {}, "params", params_file)


def commits(exp_show: list[dict], params_file: str = PARAMS_FILE,
            metrics_file: str = METRICS_FILE) -> list[Experiment]:
    """The committed revisions of ``dvc exp show --json`` (not the workspace) that hold data:
    the runs the experiments started from."""
    out = []
    for commit in exp_show:
        if commit.get("rev") == "workspace" or not commit.get("data"):
            continue
        data = commit["data"]
        out.append(Experiment(commit.get("name") or commit["rev"][:7], commit["rev"],
                              _file_data(data, "params", params_file),
                              _file_data(data, "metrics", metrics_file)))
    return out


def experiments(exp_show: list[dict], prefix: str | None = None,
                params_file: str = PARAMS_FILE, metrics_file: str = METRICS_FILE
                ) -> list[Experiment]:
    """Finished experiments of ``dvc exp show --json`` with data, in its order, optionally only
    those named ``prefix...``. Queued and running ones (an ``executor``) are left out: a running
    workspace experiment shows the previous run's metrics."""
    out = []
    for commit in exp_show:
        for exp in commit.get("experiments") or []:
            if exp.get("executor"):
                continue
            for rev in exp.get("revs") or []:
                data, name = rev.get("data") or {}, rev.get("name") or str(rev.get("rev"))[:7]
                if not data or rev.get("rev") == "workspace":
                    continue
                if prefix is not None and not name.startswith(prefix):
                    continue
                out.append(Experiment(name, rev["rev"], _file_data(data, "params", params_file),
                                      _file_data(data, "metrics", metrics_file)))
    return out


def names(exp_show: list[dict]) -> set[str]:
    """Every experiment name ``dvc exp show --json`` lists (queued and running ones too)."""
    return {rev.get("name") for commit in exp_show for exp in commit.get("experiments") or []
            for rev in exp.get("revs") or []}


def exp_show(rev: str | None = None, cwd: str | Path | None = None) -> list[dict]:
    """``dvc exp show --json [--rev REV]`` parsed; :class:`ExperimentError` when it fails."""
    cmd = ["dvc", "exp", "show", "--json"] + (["--rev", rev] if rev else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise ExperimentError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def parse_sets(sets: Iterable[str] | None) -> dict[str, str] | None:
    """``KEY=VALUE`` strings as a dict; None when there are none."""
    if not sets:
        return None
    bad = [s for s in sets if "=" not in s]
    if bad:
        raise ExperimentError(f"--set wants KEY=VALUE, got {bad}")
    return dict(s.split("=", 1) for s in sets)


def run_all(todo: list[tuple[str, dict[str, object]]], *, target: str, log: Path,
            queue: bool = False, record: Callable[[str], dict] | None = None,
            say: Callable[[str], None] = print) -> list[dict]:
    """``dvc exp run`` each ``(name, overrides)`` of ``todo`` in order, in the workspace (or
    into DVC's queue), skipping names already among the experiments, so an interrupted study
    continues. After each workspace run, appends ``{"name", "seconds"} | record(name)`` to
    ``log`` (JSON lines) and returns those entries."""
    done = names(exp_show())
    entries = []
    for name, overrides in todo:
        if name in done:
            say(f"{name}: already an experiment, skipped")
            continue
        cmd = exp_run_command(name, overrides, queue=queue, target=target)
        say(" ".join(cmd))
        start = time.time()
        if subprocess.run(cmd).returncode != 0:
            raise ExperimentError(f"`{' '.join(cmd)}` failed (its output is above); the runs "
                                  "before it are kept: run the study again to continue")
        if queue:
            continue
        entry = {"name": name, "seconds": round(time.time() - start, 1)}
        entry |= record(name) if record else {}
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")
        say(f"{name}: {entry['seconds'] / 60:.1f} min")
        entries.append(entry)
    return entries


def read_log(path: Path) -> dict[str, dict]:
    """The entries :func:`run_all` appended to ``path``, by name (the last one wins); empty
    when there is no log."""
    if not Path(path).is_file():
        return {}
    return {e["name"]: e for e in map(json.loads, Path(path).read_text().splitlines()) if e}


def write_table(frame: pd.DataFrame, markdown: Path, shown: pd.DataFrame | None = None,
                preface: str | None = None) -> tuple[Path, Path]:
    """``frame`` as CSV beside ``markdown`` (same name, ``.csv``: every value at full
    precision, ``pd.read_csv`` gives the frame back) and ``shown`` (default ``frame``: a frame
    of formatted cells, one row per row of ``frame``) as a Markdown table, after ``preface`` (a
    paragraph) when given. Returns both paths."""
    markdown = Path(markdown)
    csv = markdown.with_suffix(".csv")
    fsio.write_text(csv, frame.to_csv(index=False))
    text = to_markdown(frame if shown is None else shown) + "\n"
    fsio.write_text(markdown, f"{preface}\n\n{text}" if preface else text)
    return markdown, csv


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``frame``'s cells as they are (no index; cells that
    are already text keep their formatting; a literal ``|`` is escaped)."""
    cells = frame.astype(object).where(frame.notna(), "-")
    cells = cells.map(lambda v: str(v).replace("|", "\\|"))
    cells.columns = [str(c).replace("|", "\\|") for c in cells.columns]
    return cells.to_markdown(index=False, disable_numparse=True, stralign="left")


def fmt(v, digits: int = 4) -> str:
    """A number with ``digits`` significant digits (``-`` for None or NaN; exponent notation
    from 10**digits and under 0.001)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v == 0:
        return "0"
    e = math.floor(math.log10(abs(v)))
    if e >= digits or e < -3:
        return f"{v:.{digits}g}"
    return f"{v:.{max(0, digits - 1 - e)}f}"


__all__ = ["Experiment", "ExperimentError", "commits", "entry_params", "exp_run_command",
           "exp_show", "experiments", "flatten", "fmt", "get", "names", "parse_sets", "read_log",
           "run_all", "to_markdown", "write_table"]
