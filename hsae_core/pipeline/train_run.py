"""Train an HSAE (or the independent baseline) on an activation store: what the training stages
call. Adds to :class:`~hsae_core.model.trainer.Trainer` the store reader, a checkpoint that is
reused only when it was written for the same config, and live training curves per level.

Curves (§4 / Appendix A quantities, one TSV per level, read by ``dvc plots``)::

    <curves>/level<l>.tsv: step loss lr mse fve l0 lambda dead with_parent

``with_parent`` counts the level's features assigned to a parent (the forest's size at that
level; 0 for level 0 and for the baseline, whose forest is built post hoc). The checkpoint holds
the rows up to its step: a resumed run starts from them and appends after them, so the curves
are those of an uninterrupted run. A fresh run writes its curves from its first checkpoint on,
together with the checkpoint it replaces: a run that fails before that leaves the previous run's
checkpoint and curves as they were. Every write replaces the file (never rewrites it in place).

A checkpoint is resumed only if it was written for the same config, by the same code and on the
same data (:func:`~hsae_core.pipeline.checkpoint.data_identity`: the store and the normalisation
scale); the store's rows are checked for NaN and Inf as they are read
(:class:`~hsae_core.data.reader.TrainActivations`).

Under ``torchrun`` (``dist`` from :func:`hsae_core.common.distributed.init_from_env`) every rank
trains its slice of each global batch; rank 0 alone writes the curves and the checkpoint (a local
path or an fsspec URL), which resumes on any number of ranks.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hsae_core.common import fsio
from hsae_core.common.distributed import SINGLE, DistContext
from hsae_core.common.errors import check_field, is_int
from hsae_core.data.reader import TrainActivations
from hsae_core.data.store import StoreInfo, open_store
from hsae_core.model.config import HSAEConfig
from hsae_core.model.hsae import HSAE
from hsae_core.model.trainer import Trainer
from hsae_core.pipeline.checkpoint import (
    Checkpoint,
    data_identity,
    read_checkpoint,
    usable_checkpoint,
)


@dataclass(frozen=True)
class TrainRunConfig:
    checkpoint_every: int = 100
    """Steps between checkpoints; a killed training stage resumes from the last one (0 = never)."""
    log_every: int = 10
    """Steps between rows of the live training curves (plots/<model>/level<l>.tsv)."""
    buffer_blocks: int = 32
    """Store blocks (about 8 MB each) shuffled together in memory by the train reader."""
    compile: bool = False
    """Compile each level's dense encoder matmul with ``torch.compile`` (Trainer ``compile``; meant
    for CUDA, also runs on the CPU given a C++ compiler, results equal eager). Off by default."""

    def __post_init__(self) -> None:
        check_field(self, "checkpoint_every",
                    is_int(self.checkpoint_every) and self.checkpoint_every >= 0,
               "an integer >= 0 (0 = no checkpoints)")
        check_field(self, "log_every", is_int(self.log_every) and self.log_every >= 1,
                    "an integer >= 1")
        check_field(self, "buffer_blocks", is_int(self.buffer_blocks) and self.buffer_blocks >= 1,
               "an integer >= 1")
        check_field(self, "compile", isinstance(self.compile, bool), "true or false")

CURVE_COLUMNS = ("step", "loss", "lr", "mse", "fve", "l0", "lambda", "dead", "with_parent")


class TrainingCurves:
    """Per-level TSV curves under ``folder`` (the trainer's ``on_log``).

    ``rows``: the rows to start from (a checkpoint's), else, when ``resume_step``, the files'
    rows up to that step, else none. ``live``: write the files at once and after every row
    (each file replaced whole); else only from :meth:`commit` on."""

    def __init__(self, folder: str | Path, n_levels: int, resume_step: int = 0, *,
                 rows: list[list[dict]] | None = None, live: bool = True):
        self.folder = Path(folder)
        self.paths = [self.folder / f"level{l}.tsv" for l in range(n_levels)]
        if rows is not None:
            self.rows = [[r for r in level if int(r["step"]) <= resume_step] for level in rows]
        else:
            self.rows = [self._read(path, resume_step) if resume_step else []
                         for path in self.paths]
        self.live = live
        if live:
            self.flush()

    @staticmethod
    def _read(path: Path, resume_step: int) -> list[dict]:
        if not path.exists():
            return []
        with path.open() as f:
            return [r for r in csv.DictReader(f, delimiter="\t") if int(r["step"]) <= resume_step]

    def __call__(self, step: int, rec: dict) -> None:
        for l, rows in enumerate(self.rows):
            row = {"step": step, "loss": rec["loss"], "lr": rec["lr"],
                   **{k: rec[f"level{l}/{k}"] for k in ("mse", "fve", "l0", "lambda", "dead")},
                   "with_parent": rec.get(f"pair{l - 1}/assigned", 0) if l else 0}
            rows.append({k: (f"{v:.6g}" if isinstance(v, float) else str(v))
                         for k, v in row.items()})
        if self.live:
            self.flush()

    def commit(self) -> None:
        """Write the files now and after every later row."""
        self.live = True
        self.flush()

    def flush(self) -> None:
        """Replace every level's file with its rows; remove level files of other level counts."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob("level*.tsv"):
            if stale not in self.paths:
                stale.unlink()
        for path, rows in zip(self.paths, self.rows):
            text = io.StringIO()
            w = csv.DictWriter(text, CURVE_COLUMNS, delimiter="\t")
            w.writeheader()
            w.writerows(rows)
            fsio.write_text(path, text.getvalue())


def train_on_store(cfg: HSAEConfig, store: str | Path | StoreInfo, scale: float | str | Path, *,
                   checkpoint: str | Path, curves: str | Path,
                   run: TrainRunConfig = TrainRunConfig(), name: str = "hsae",
                   dist: DistContext = SINGLE,
                   on_finish: Callable[[Trainer], None] | None = None) -> HSAE:
    """Train ``cfg.total_steps`` steps of ``cfg.batch_size`` shuffled train rows (epochs repeat as
    needed), resuming from ``checkpoint`` when it holds a run of the same config. Under
    ``dist`` each rank reads its slice of every global batch; rank 0 writes curves and
    checkpoints. ``on_finish(trainer)`` sees the finished trainer (e.g. its ``summary()``)."""
    info = store if isinstance(store, StoreInfo) else open_store(store)
    if info.d_model != cfg.d_model:
        raise ValueError(f"store {info.path} holds d = {info.d_model}, the config asks for "
                         f"d_model = {cfg.d_model}")
    if info.n_clean("train") < cfg.batch_size:
        raise ValueError(f"store {info.path} has {info.n_clean('train')} train rows, fewer than "
                         f"one batch (sae.batch_size = {cfg.batch_size}): lower it or extract "
                         "more tokens")
    reader = TrainActivations(info, scale, batch_size=cfg.batch_size, seed=cfg.seed, epochs=None,
                              max_tokens=cfg.total_steps * cfg.batch_size, drop_last=True,
                              buffer_blocks=run.buffer_blocks, rank=dist.rank,
                              world_size=dist.world_size)
    data = data_identity(info, reader.scale)
    checkpoint = fsio.as_location(checkpoint)
    state = read_checkpoint(checkpoint, cfg, dist, data)
    start = int(state["step"]) if state is not None else 0
    if start and dist.is_main:
        print(f"{name}: resuming from {checkpoint} at step {start} of {cfg.total_steps}")
    log = (TrainingCurves(curves, cfg.n_levels, start, rows=(state or {}).get("curves"),
                          live=bool(start)) if dist.is_main else None)
    del state
    t0, every = time.perf_counter(), run.log_every * max(1, cfg.total_steps // 20 // run.log_every)

    def on_log(step: int, rec: dict) -> None:
        log(step, rec)
        if step % every == 0 or step == cfg.total_steps:
            l0 = " ".join(f"{rec[f'level{l}/l0']:.1f}" for l in range(cfg.n_levels))
            fve = " ".join(f"{rec[f'level{l}/fve']:.3f}" for l in range(cfg.n_levels))
            print(f"{name} step {step}/{cfg.total_steps} loss {rec['loss']:.4g} L0 [{l0}] "
                  f"FVE [{fve}] ({time.perf_counter() - t0:.0f} s)", flush=True)

    ckpt = Checkpoint(checkpoint, data)

    def on_checkpoint(trainer: Trainer) -> None:
        """Save the state with the curves so far; from the run's first checkpoint on, its
        curves replace the files (the checkpoint they belong to replaced the old one)."""
        ckpt.save(trainer, {"curves": log.rows} if log is not None else None)
        if log is not None:
            log.commit()

    trainer = Trainer(cfg, checkpoint_every=run.checkpoint_every, on_checkpoint=on_checkpoint,
                      log_every=run.log_every, on_log=on_log if dist.is_main else None, dist=dist,
                      compile=run.compile)
    if start:
        ckpt.load_into(trainer)
    try:
        model = trainer.fit(reader)
    except FloatingPointError as err:
        raise FloatingPointError(f"{err} (every input row read was finite: the store's rows "
                                 "are checked as they are read, so the training itself "
                                 "diverged)") from err
    if on_finish is not None:
        on_finish(trainer)
    return model


__all__ = ["CURVE_COLUMNS", "TrainingCurves", "train_on_store", "usable_checkpoint"]
