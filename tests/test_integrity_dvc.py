"""Issue 25 with DVC itself, in a micro project (tests/pipeline_helpers.py) with its reference run
committed: the way back after `dvc exp run -S rho=0.5` restores the committed outputs with
`dvc status` clean and nothing retrained, also on a machine whose outputs differ from the
committed dvc.lock (`dvc exp save` / `dvc exp apply`); a second `dvc exp run` started beside a
running one cannot make the first record outputs under parameters they were not computed with;
an absurd batch size stops in check-params before DVC removes any output. The commands are the
ones docs/ablations.md gives."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.pipeline_helpers import (
    BIN,
    dvc,
    env,
    git,
    micro_assets,
    micro_params,
    micro_project,
    ran_stages,
)

pytestmark = pytest.mark.slow  # about 8 min on 2 busy cores: a repro and four experiments


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("integrity-dvc")
    root = micro_project(base / "project", micro_params(*micro_assets(base / "assets")))
    dvc(root, "repro")
    git(root, "add", "dvc.lock", "metrics", "dvclive")
    git(root, "commit", "-q", "-m", "reference run")
    return root


def outputs(root: Path) -> dict[str, str]:
    """SHA-256 of every file DVC or git tracks as a stage output (data/, metrics/, dvclive/),
    resume state aside (checkpoints, the judge's answer cache: not outputs)."""
    out = {}
    for folder in ("data", "metrics", "dvclive"):
        for f in sorted((root / folder).rglob("*")):
            rel = f.relative_to(root).as_posix()
            if f.is_file() and not (rel.startswith("data/checkpoints/") or "/cache/" in rel):
                out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def clean(root: Path) -> bool:
    return json.loads(dvc(root, "status", "--json").stdout or "{}") == {}


TRACKED = ("params.yaml", "dvc.lock", "dvclive", "metrics")


def way_back(root: Path) -> None:
    """docs/ablations.md, on a machine whose outputs are the committed ones. `git rm --cached`
    first: after two colliding experiments DVC has rewritten dvc.lock within one second at the
    same size, and git, trusting its cached file stats, would not restore it."""
    git(root, "rm", "-r", "-q", "--cached", *TRACKED)
    git(root, "checkout", "HEAD", "--", *TRACKED)
    dvc(root, "checkout")
    for name in ("params.yaml", "dvc.lock"):
        assert (root / name).read_text() == git(root, "show", f"HEAD:{name}"), name


def test_the_way_back_after_an_experiment_is_exact(project):
    reference = outputs(project)
    assert clean(project)
    ran = ran_stages(dvc(project, "exp", "run", "-S", "rho=0.5").stdout)
    assert {"train-hsae", "judge-hsae", "report"} <= ran
    assert outputs(project)["data/hsae/model.safetensors"] != reference[
        "data/hsae/model.safetensors"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert not [o for s in lock.values() for o in s.get("outs", [])
                if "checkpoints" in o["path"] or o["path"].endswith("/cache")]
    way_back(project)
    # was: train-hsae's checkpoint and judge-hsae's answer cache modified, so `dvc repro`
    # retrained the HSAE and rewrote pairs.jsonl (`"cached": true`), re-running the report
    assert clean(project), dvc(project, "status").stdout
    assert ran_stages(dvc(project, "repro").stdout) == set()
    assert outputs(project) == reference


def test_a_second_exp_run_cannot_make_the_first_record_mixed_params(project):
    """The issue's finding 2: `dvc exp run -n e2 -S rho=0.4` beside a running e1 is refused by
    DVC's lock only after it wrote rho: 0.4 into params.yaml (DVC 3.67). e1 then trained at 0.5
    while dvc.lock recorded 0.4, ran every stage and failed inside DVC. Now e1 stops at the end
    of the stage that was running, before DVC records it, naming the changed keys."""
    first = subprocess.Popen([str(BIN / "dvc"), "exp", "run", "-n", "e1", "-S", "rho=0.5",
                              "-S", "sae.total_steps=300"], cwd=project, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 600
        while not any("Running stage 'train-" in line for line in lines):
            assert first.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        time.sleep(2)  # e1's training has started (300 steps: a minute or more)
        second = dvc(project, "exp", "run", "-n", "e2", "-S", "rho=0.4", check=False)
        first.wait(timeout=900)
        reader.join(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    out = "".join(lines)
    assert second.returncode != 0 and "is busy" in second.stdout + second.stderr, second
    assert first.returncode != 0, out
    text = " ".join(out.split())
    assert "rho = 0.4 (checked: 0.5)" in text, out  # e2's -S, written over e1's params
    assert "--queue" in text and "--temp" in text
    assert not ran_stages(out) & {"compute-metrics", "export-hsae", "judge-hsae", "report"}, out
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    for stage in ("train-hsae", "train-baselines"):  # recorded as committed, never as 0.4
        assert lock[stage]["params"]["params.yaml"]["sae"]["total_steps"] == 40, stage
    assert lock["train-hsae"]["params"]["params.yaml"]["rho"] == 0.01
    way_back(project)
    assert clean(project), dvc(project, "status").stdout
    assert git(project, "rev-parse", "--abbrev-ref", "HEAD").strip() in ("master", "main")


def test_an_absurd_batch_size_stops_before_any_output_is_removed(project):
    reference = outputs(project)
    failed = dvc(project, "exp", "run", "-S", "sae.batch_size=1000000000", check=False)
    text = " ".join((failed.stdout + failed.stderr).split())
    assert failed.returncode != 0 and ran_stages(failed.stdout) == {"check-params"}, text
    assert ("sae.batch_size = 1000000000 is more than the train split holds (2400 rows"
            in text), text
    git(project, "checkout", "--", "params.yaml")
    assert {k: v for k, v in outputs(project).items() if k != "data/params.checked"} == {
        k: v for k, v in reference.items() if k != "data/params.checked"}
    dvc(project, "checkout")  # check-params' marker, which DVC removed before the check
    assert clean(project)


def test_the_way_back_on_a_machine_whose_outputs_differ_from_the_committed_lock(project):
    """The committed dvc.lock holds another machine's hashes (floating point differs): a user's
    own `dvc repro` gave other outputs, so `git checkout -- dvc.lock && dvc checkout` would
    remove them (their hashes are not in the committed lock, the lock's are not in this
    cache). docs/ablations.md: save your run before experimenting, apply it to go back."""
    mine = (project / "dvc.lock").read_text()
    lock = yaml.safe_load(mine)
    hsae_md5 = next(o["md5"] for o in lock["stages"]["train-hsae"]["outs"]
                    if o["path"] == "data/hsae")
    (project / "dvc.lock").write_text(mine.replace(hsae_md5, "f" * 32 + ".dir"))
    git(project, "commit", "-q", "-am", "the reference run, from another machine")
    (project / "dvc.lock").write_text(mine)  # this machine's own run, not committed
    assert clean(project)
    reference = outputs(project)

    dvc(project, "exp", "save", "-n", "mine")
    assert "train-hsae" in ran_stages(dvc(project, "exp", "run", "-S", "rho=0.5").stdout)
    dvc(project, "exp", "apply", "mine")
    assert clean(project), dvc(project, "status").stdout
    assert ran_stages(dvc(project, "repro").stdout) == set()
    assert outputs(project) == reference

    # the other machine's way back would lose this machine's HSAE here (what the docs warn of)
    git(project, "checkout", "HEAD", "--", "dvc.lock")
    dvc(project, "checkout", check=False)
    assert not (project / "data" / "hsae" / "model.safetensors").exists()
    dvc(project, "exp", "apply", "mine")
    assert clean(project) and outputs(project) == reference
