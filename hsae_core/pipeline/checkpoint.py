"""Checkpoint files of a :class:`~hsae_core.model.trainer.Trainer` at a local path or an
fsspec URL: written atomically by rank 0 (every rank holds the same state), resumed only by the
code and config that wrote them, on the data they were trained on.

A checkpoint records what it was trained on (:func:`data_identity`: the activation store's
attributes, every train shard by its stored chunk checksums, and the normalisation scale). One
written for another config or on other data is not resumed but kept: a new run replaces it only
with its own first checkpoint, so a run that fails before that (a bad value, a missing device)
leaves the finished checkpoint in place, and restoring the config resumes it. One written by
another version of hsae_core, which no run of this code can resume, is removed; an unreadable
one (a truncated file) is moved aside to ``<name>.corrupt``.

A checkpoint is resume state, not a DVC output (dvc.yaml): DVC neither removes it before a stage
runs nor restores it on ``dvc checkout``, so it never makes a finished stage look changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hsae_core.common import fsio
from hsae_core.common.distributed import SINGLE, DistContext, barrier
from hsae_core.data.integrity import shard_fingerprints
from hsae_core.data.store import StoreInfo
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


def data_identity(store: StoreInfo, scale: float) -> dict:
    """What a training run reads: ``{"store": SHA-256 of the store's attributes and of every
    shard of its train activations and flags, "scale": the normalisation scale}``. A shard
    enters by its index and the crc32c stored after each of its chunks
    (:func:`~hsae_core.data.integrity.shard_fingerprints`: about 20 bytes read per MB of data),
    so a re-extraction, a rewritten row anywhere, or two shards swapped changes it."""
    h = hashlib.sha256(json.dumps(store.attrs, sort_keys=True, default=str).encode())
    for column in ("activations", "outlier"):
        for digest in shard_fingerprints(store.array("train", column), store.path):
            h.update(digest.encode())
    return {"store": h.hexdigest(), "scale": float(scale)}


class Checkpoint:
    """The checkpoint file of one training run. ``save`` is the trainer's ``on_checkpoint``;
    ``data`` (:func:`data_identity`) is recorded in every file it writes."""

    def __init__(self, path: str | Path, data: dict | None = None):
        self.path = fsio.as_location(path)
        self.data = data

    def save(self, trainer: Trainer, extra: dict | None = None) -> None:
        """Rank 0 writes the state (atomically) with ``extra`` entries; the other ranks wait
        until it is written."""
        if trainer.dist.is_main:
            record = {"code": code_fingerprint(), "data": self.data, **(extra or {})}
            fsio.save_torch(trainer.state_dict() | record, self.path)
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


def read_checkpoint(path: str | Path, cfg: HSAEConfig, dist: DistContext = SINGLE,
                    data: dict | None = None) -> dict | None:
    """The state saved at ``path`` (a path or fsspec URL) if a run of ``cfg`` may resume from
    it: written for ``cfg``, by this code (:func:`code_fingerprint`) and, when ``data`` is
    given, on that data (:func:`data_identity`; a checkpoint that records none, written by a
    bare :class:`Checkpoint`, is judged on config and code alone). Else None, with one line
    saying why; the file is left for the new run's first checkpoint to replace, except that
    rank 0 removes one written by other code and moves an unreadable one to
    ``<path>.corrupt``."""
    path = fsio.as_location(path)
    if not fsio.exists(path):
        return None
    try:
        state = fsio.load_torch(path)
        if not isinstance(state, dict) or not {"config", "step", "code"} <= set(state):
            raise ValueError("not a training checkpoint")
    except Exception as err:  # truncated, garbage, or another kind of file: unpickling errors
        barrier(dist)  # every rank has tried it before rank 0 moves it
        if dist.is_main:
            aside = _move_aside(path)
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            print(f"checkpoint {path} is unreadable ({reason}): moved it to {aside}; "
                  "training starts afresh")
        barrier(dist)
        return None
    why = _mismatch(state, cfg, data)
    if why is None:
        return state
    if why == OTHER_CODE:
        barrier(dist)  # every rank has read it before rank 0 removes it
        if dist.is_main:
            fsio.remove(path)
            print(f"removed checkpoint {path}: it was written {why}")
        barrier(dist)
    elif dist.is_main:
        print(f"checkpoint {path} is not resumed: it was written {why}; training starts afresh "
              "and replaces it at its first checkpoint")
    return None


def usable_checkpoint(path: str | Path, cfg: HSAEConfig, dist: DistContext = SINGLE,
                      data: dict | None = None) -> int:
    """The step of the checkpoint at ``path`` if a run of ``cfg`` (on ``data``) may resume from
    it, else 0 (:func:`read_checkpoint`)."""
    state = read_checkpoint(path, cfg, dist, data)
    return int(state["step"]) if state is not None else 0


OTHER_CODE = "by another version of hsae_core"


def _mismatch(state: dict, cfg: HSAEConfig, data: dict | None) -> str | None:
    """Why ``state`` may not be resumed by a run of ``cfg`` on ``data``; None if it may."""
    if state.get("config") != cfg.to_dict():
        return "for another config"
    if state.get("code") != code_fingerprint():
        return OTHER_CODE
    saved = state.get("data")
    if data is None or saved is None:
        return None
    if saved.get("store") != data["store"]:
        return ("on another activation store (its attributes or its train rows differ from "
                "the store's now)")
    if saved.get("scale") != data["scale"]:
        return (f"with another normalisation scale ({saved.get('scale')!r}, now "
                f"{data['scale']!r})")
    return None


def _move_aside(path: str | Path) -> str | Path:
    """Rename ``path`` to ``<path>.corrupt`` (replacing an older one); the new name."""
    if fsio.is_url(path):
        aside = f"{path}.corrupt"
        fs, p = fsio.filesystem(path)
        fs.mv(p, fsio.filesystem(aside)[1])
        return aside
    aside = path.with_name(path.name + ".corrupt")
    path.replace(aside)
    return aside


__all__ = ["Checkpoint", "code_fingerprint", "data_identity", "read_checkpoint",
           "usable_checkpoint"]
