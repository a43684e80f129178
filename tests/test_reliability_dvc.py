"""DVC links outputs to its cache (``.dvc/config``: reflink, else hardlink): a stage run by hand
after a `dvc repro` must replace its outputs, never rewrite them in place, or it rewrites the
cached copies too (issue 15, finding 4). A micro project (tests/pipeline_helpers.py) is
reproduced, every output is linked to the cache (`dvc checkout --relink`, the state after any
checkout), each stage's command from dvc.yaml is run twice by hand (in this process, through its
Typer app: the same code as `python -m stages.<name>`, without 20 interpreter starts), and every
cache file must still match the md5 that names it."""

from __future__ import annotations

import hashlib
import importlib
import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.pipeline_helpers import dvc, micro_assets, micro_params, micro_project

runner = CliRunner()


def corrupted(root: Path) -> list[str]:
    """Cache files whose content no longer matches their md5 name."""
    bad = []
    for f in sorted((root / ".dvc" / "cache" / "files" / "md5").rglob("*")):
        if f.is_file():
            want = (f.parent.name + f.name).removesuffix(".dir")
            if hashlib.md5(f.read_bytes()).hexdigest() != want:
                bad.append(f.relative_to(root).as_posix())
    return bad


@pytest.mark.slow  # about 4.5 min on 2 busy CPU cores: a dvc repro and 20 stage runs
def test_stages_run_by_hand_never_rewrite_the_dvc_cache(tmp_path, monkeypatch):
    params = micro_params(*micro_assets(tmp_path / "assets"))
    params["sae"] |= {"total_steps": 20}
    root = micro_project(tmp_path / "project", params)
    dvc(root, "repro")
    dvc(root, "checkout", "--relink")
    outputs = [p for p in (root / "data").rglob("*") if p.is_file()]
    if not any(p.stat().st_nlink > 1 for p in outputs):
        pytest.skip("DVC linked no output to its cache here (reflink or copy): an in-place "
                    "write cannot reach the cache on this filesystem")
    assert corrupted(root) == []
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    monkeypatch.chdir(root)  # each stage's command as dvc.yaml has it, run in this process
    for attempt in (1, 2):
        for name, stage in stages.items():
            python, dash_m, module, *args = shlex.split(stage["cmd"])
            assert (python, dash_m) == ("python", "-m"), stage["cmd"]
            result = runner.invoke(importlib.import_module(module).app, args)
            assert result.exit_code == 0, f"{name} (run {attempt}):\n{result.output}"
            assert corrupted(root) == [], f"after {name} (run {attempt})"
    leftovers = [p for p in root.rglob(".*tmp-*")] + [p for p in root.rglob(".*old-*")]
    assert leftovers == []
