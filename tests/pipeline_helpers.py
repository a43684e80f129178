"""Shared pieces of the pipeline tests: a micro project (the repository's stages, library and
dvc.yaml in a temporary git repo, a tiny random Llama, a tiny corpus) and a way to run DVC in
it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.store_helpers import jsonl_corpus, tiny_llama

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def micro_params(model: str, corpus: str) -> dict:
    """The repository's params.yaml with every stage shrunk for a test: 4 tiny levels on d = 64."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    small = {
        "extract": {"model": model, "layer": 1, "corpus": corpus, "context_len": 32,
                    "batch_size": 8, "max_tokens": 3000, "eval_fraction": 0.2, "chunk_bytes": 4096,
                    "shard_bytes": 65536},
        "normalize": {"n_tokens": 1000},
        "sae": {"level_sizes": [8, 16, 32, 64], "target_l0": 3.0, "batch_size": 64,
                "total_steps": 40, "dead_window_tokens": 0},
        "hierarchy": {"update_interval": 10},
        "train": {"checkpoint_every": 10, "log_every": 5},
        "metrics": {"batch_size": 200, "lm_loss_tokens": 120, "lm_batch_sequences": 4},
        # tiny Llama as judge
        "judge": {"model": model, "n_pairs": 3, "n_random": 2, "max_tokens": 3},
    }
    return {key: value | small.get(key, {}) if isinstance(value, dict) else value
            for key, value in params.items()}


def micro_assets(folder: Path) -> tuple[str, str]:
    """The tiny model and corpus, outside the project (a user's local model and text)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model"
    if not model.exists():
        tiny_llama(model)
    return str(model), jsonl_corpus(folder / "corpus.jsonl", n_docs=120)


def micro_project(root: Path, params: dict) -> Path:
    """Copy the pipeline into ``root``, write ``params``, and make it a git + DVC repo."""
    root.mkdir(parents=True)
    for name in ("hsae_core", "stages"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(root, "init", "-q")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "test")
    dvc(root, "init", "-q")
    (root / ".dvc" / "config").write_text((REPO / ".dvc" / "config").read_text())
    (root / ".dvcignore").write_text((REPO / ".dvcignore").read_text())
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "micro project")
    return root


def env() -> dict:
    """The test interpreter's bin first on PATH (stages run as `python -m`), no PYTHONPATH:
    stages import the project copy they run in."""
    out = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out["PATH"] = f"{BIN}{os.pathsep}{out.get('PATH', '')}"
    return out


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True,
                          text=True).stdout


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=env(), capture_output=True,
                          text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def ran_stages(output: str) -> set[str]:
    """Stages DVC reports running in a `dvc repro` / `dvc exp run` log."""
    return {line.split("'")[1] for line in output.splitlines()
            if line.startswith("Running stage '")}
