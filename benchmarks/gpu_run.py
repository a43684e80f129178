"""The GPU check's run: its JSON report, log and clock with a hard time limit (``Run``, phases
that record an error or a timeout and let the next phase run), and pytest on a GPU machine
that lacks it (``ensure_pytest``: from a folder of wheels). Split out of gpu_check.py."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path


class TimeUp(Exception):
    pass


class Run:
    """The JSON report, the log, and the clock."""

    def __init__(self, out: Path, limit: float, argv: list[str]):
        self.out, self.limit, self.t0 = out, limit, time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out / "gpu_check.log", "w")
        self.report: dict = {"issue": 23, "command": " ".join(argv),
                             "started": datetime.datetime.now().isoformat(timespec="seconds"),
                             "time_limit_s": limit, "phases": {}, "checks": {}}

    def left(self) -> float:
        return self.limit - (time.monotonic() - self.t0)

    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=1))
        tmp.replace(self.out / "gpu_check.json")

    def phase(self, name: str, fn, need_s: float) -> None:
        """Run ``fn()`` (its dict goes under ``name``) if ``need_s`` seconds are left; an error
        or the time limit is recorded, and the next phase runs."""
        rec = {"status": "skipped", "seconds": 0.0}
        self.report["phases"][name] = rec
        if self.left() < need_s:
            rec["reason"] = f"{self.left():.0f} s left, needs {need_s:.0f}"
            self.log(f"-- {name}: skipped ({rec['reason']})")
            self.save()
            return
        self.log(f"-- {name}")
        t = time.monotonic()
        try:
            self.report[name] = fn()
            rec["status"] = "done"
        except TimeUp:
            rec["status"] = "timeout"
            self.log(f"   {name}: hard time limit reached")
            raise
        except Exception as err:  # recorded, and the other phases still run
            rec["status"] = "error"
            rec["error"] = f"{type(err).__name__}: {err}"
            self.log(f"   {name}: {rec['error']}\n{traceback.format_exc()}")
        finally:
            rec["seconds"] = round(time.monotonic() - t, 1)
            self.save()


def ensure_pytest(wheels: str | None, run: Run) -> dict[str, str]:
    """Environment for the pytest subprocess; installs pytest from ``wheels`` if missing."""
    env = dict(os.environ)
    if _importable("pytest"):
        return env
    if not wheels:
        raise RuntimeError("pytest is not installed: pass --wheels DIR (see the docstring)")
    site = run.out / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels,
           "--target", str(site), "pytest"]
    run.log("   installing pytest: " + " ".join(cmd))
    if not _importable("pip") or subprocess.run(cmd).returncode != 0:
        for whl in sorted(Path(wheels).glob("*.whl")):  # pure-Python wheels are zip files
            with zipfile.ZipFile(whl) as z:
                z.extractall(site)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None
