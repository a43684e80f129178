"""Issue 16: while `dvc exp run` trains, `dvc exp show --json` already carries the training's
latest logged step and per-level L0 (DVCLive's metrics.json, rewritten at every logged step),
before the stage ends. A real micro project in a temp git repo, the experiment in the
background, polled."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.pipeline_helpers import BIN, env, micro_assets, micro_params, micro_project

STEPS = 600  # long enough for several polls while train-hsae runs


def hsae_latest(root) -> dict | None:
    """The workspace's dvclive/hsae/metrics.json as `dvc exp show --json` reports it."""
    proc = subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=root, env=env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    for rev in json.loads(proc.stdout or "[]"):
        if rev.get("rev") == "workspace":
            files = ((rev.get("data") or {}).get("metrics") or {})
            return (files.get("dvclive/hsae/metrics.json") or {}).get("data")
    return None


@pytest.mark.slow  # about 2 min on 2 busy cores
def test_exp_show_follows_a_running_training(tmp_path):
    model, corpus = micro_assets(tmp_path / "assets")
    params = micro_params(model, corpus)
    params["sae"] |= {"total_steps": STEPS}
    params["train"] |= {"log_every": 5, "checkpoint_every": 100}
    root = micro_project(tmp_path / "project", params)
    run = subprocess.Popen([str(BIN / "dvc"), "exp", "run", "train-hsae", "-S", "rho=0.02"],
                           cwd=root, env=env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 900
        while run.poll() is None and time.monotonic() < deadline:
            latest = hsae_latest(root)
            if latest and run.poll() is None:
                seen.append(latest)
            time.sleep(1.0)
        out, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out
    mid = [s for s in seen if s["step"] < STEPS]
    assert mid, f"no partial step seen while training ran; polls: {[s['step'] for s in seen]}"
    assert all(0 < s["train"]["hsae"][f"level{l}"]["l0"] < 64 for s in mid for l in range(4))
    final = json.loads((root / "dvclive" / "hsae" / "metrics.json").read_text())
    assert final["step"] == STEPS and mid[-1]["step"] <= final["step"]
