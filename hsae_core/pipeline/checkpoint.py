"""Checkpoint files of a :class:`~hsae_core.model.trainer.Trainer` at a local path or an
fsspec URL: written atomically by rank 0 (every rank holds the same state), resumed only by the
code and config that wrote them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from hsae_core.common import fsio
from hsae_core.common.distributed import SINGLE, DistContext, barrier
from hsae_core.model.config import HSAEConfig
from hsae_core.model.trainer import Trainer


def code_fingerprint() -> str:
    """SHA-256 of hsae_core's Python sources: a checkpoint records it, so a run is resumed only
    by the code that started it (a pipeline re-run after a code change starts afresh)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


class Checkpoint:
    """The checkpoint file of one training run. ``save`` is the trainer's ``on_checkpoint``."""

    def __init__(self, path: str | Path):
        self.path = fsio.as_location(path)

    def save(self, trainer: Trainer) -> None:
        """Rank 0 writes the state (atomically); the other ranks wait until it is written."""
        if trainer.dist.is_main:
            fsio.save_torch(trainer.state_dict() | {"code": code_fingerprint()}, self.path)
        barrier(trainer.dist)

    def exists(self) -> bool:
        return fsio.exists(self.path)

    def load_into(self, trainer: Trainer) -> int:
        """Load the saved state into ``trainer`` (its config must match); returns its step."""
        trainer.load_state_dict(fsio.load_torch(self.path, map_location=trainer.device))
        return trainer.step

    def resume(self, trainer: Trainer) -> int:
        """Load the state if the file exists; the step to continue from (0 when none)."""
        return self.load_into(trainer) if self.exists() else 0


def usable_checkpoint(path: str | Path, cfg: HSAEConfig, dist: DistContext = SINGLE) -> int:
    """The step of the checkpoint at ``path`` (a path or fsspec URL) if it was written for
    ``cfg`` by this code (:func:`code_fingerprint`); else rank 0 deletes it, and 0."""
    path = fsio.as_location(path)
    if not fsio.exists(path):
        return 0
    state = fsio.load_torch(path)
    same_config = state.get("config") == cfg.to_dict()
    if same_config and state.get("code") == code_fingerprint():
        return int(state["step"])
    barrier(dist)  # every rank has read it before rank 0 removes it
    if dist.is_main:
        fsio.remove(path)
        why = "by another version of hsae_core" if same_config else "for another config"
        print(f"removed checkpoint {path}: it was written {why}")
    barrier(dist)
    return 0


__all__ = ["Checkpoint", "code_fingerprint", "usable_checkpoint"]
