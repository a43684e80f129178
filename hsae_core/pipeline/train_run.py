"""Train an HSAE (or the independent baseline) on an activation store: what the training stages
call. Adds to :class:`~hsae_core.model.trainer.Trainer` the store reader, a checkpoint that is
reused only when it was written for the same config, and live training curves per level.

Curves (§4 / Appendix A quantities) are logged with DVCLive (``dvclive.Live``) under the
``curves`` folder of a run named ``<name>`` (``hsae`` or ``baseline``)::

    <curves>/metrics.json        the latest values, {"train": {"<name>": {"loss", "lr",
                                 "level<l>": {...}}}, "step"}: `dvc exp show` reads it while
                                 the run trains
    <curves>/plots/metrics/train/<name>/{loss,lr}.tsv
    <curves>/plots/metrics/train/<name>/level<l>/<q>.tsv   columns step, <q>: `dvc plots show`

with ``<q>`` the training batch's ``l0``, ``fve``, ``mse``, the sparsity weight ``lambda``,
``dead`` (features past the dead window) and, from level 1 on, the parent-child loss ``pc`` of
the pair above and ``with_parent``, the features of the level assigned a parent (the forest's
size there; 0 for the baseline, whose forest is built post hoc).

The checkpoint holds the rows logged up to its step: a resumed run rewrites the folder from them
and logs after them, so the curves are those of an uninterrupted run. A fresh run keeps its rows
in memory until its first checkpoint, then rewrites the folder with them and logs live from
there on: a run that fails before that leaves the previous run's checkpoint and curves as they
were.

A checkpoint is resumed only if it was written for the same config, by the same code and on the
same data (:func:`~hsae_core.pipeline.checkpoint.data_identity`: the store, every train shard,
and the normalisation scale); the store's rows are checked as they are read, each chunk against
its crc32c and each row for NaN and Inf (:class:`~hsae_core.data.reader.TrainActivations`). A
run whose loss stops being finite verifies the whole train split before it reports
(:func:`diverged`): either the data verified clean, so the optimisation diverged and the fix is a
lower ``sae.lr``, or the corrupt rows are named. Under DVC, a run whose params.yaml changed
while it trained stops before its outputs are written
(:func:`~hsae_core.pipeline.params.check_unchanged`); its finished checkpoint is kept.

The checkpoint is resume state, not a DVC output (dvc.yaml): a finished stage never looks
changed because of it, and going back to committed parameters after an experiment restores the
committed outputs without retraining (docs/ablations.md).

Under ``torchrun`` (``dist`` from :func:`hsae_core.common.distributed.init_from_env`) every rank
trains its slice of each global batch; rank 0 alone logs the curves and writes the checkpoint (a
local path or an fsspec URL), which resumes on any number of ranks.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hsae_core.common import fsio
from hsae_core.common.distributed import SINGLE, DistContext
from hsae_core.common.errors import check_field, coerce_fields
from hsae_core.data.integrity import verify_split
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
from hsae_core.pipeline.params import check_unchanged


@dataclass(frozen=True)
class TrainRunConfig:
    checkpoint_every: int = 100
    """Steps between checkpoints; a killed training stage resumes from the last one (0 = never)."""
    log_every: int = 10
    """Steps between rows of the live training curves (DVCLive, dvclive/<model>/)."""
    buffer_blocks: int = 32
    """Store blocks (about 8 MB each) shuffled together in memory by the train reader."""
    compile: bool = False
    """Compile each level's dense encoder matmul with ``torch.compile`` (Trainer ``compile``; meant
    for CUDA, also runs on the CPU given a C++ compiler, results equal eager). Off by default."""

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_field(self, "checkpoint_every", self.checkpoint_every >= 0,
                    "an integer >= 0 (0 = no checkpoints)")
        check_field(self, "log_every", self.log_every >= 1, "an integer >= 1")
        check_field(self, "buffer_blocks", self.buffer_blocks >= 1, "an integer >= 1")

#: Per-level quantities of the curves (``pc`` and ``with_parent`` from level 1 on).
LEVEL_CURVES = ("l0", "fve", "mse", "lambda", "dead", "pc", "with_parent")
#: Logged at each hierarchy update, from level 1 on (the HSAE only): the fraction of the level's
#: children assigned before and after whose parent changed, children gained and lost.
CHURN_CURVES = ("churn", "gained", "lost")
INTEGER_CURVES = ("dead", "with_parent", "gained", "lost", "l0_unreachable")


class LiveCurves:
    """The trainer's ``on_log``: per-level curves of run ``name`` logged with DVCLive under
    ``folder`` (the layout in the module docstring).

    ``rows``: the rows to start from (a checkpoint's), else, when ``resume_step``, the rows the
    folder holds, else none; only those up to ``resume_step`` are kept. ``live``: rewrite the
    folder from them now and log every later row at once; else keep rows in memory until
    :meth:`commit`."""

    def __init__(self, folder: str | Path, n_levels: int, name: str = "hsae",
                 resume_step: int = 0, *, rows: list[dict] | None = None, live: bool = True):
        self.folder, self.name, self.n_levels = Path(folder), name, n_levels
        if rows is None:
            rows = curve_rows(self.folder, name) if resume_step else []
        self.rows = [dict(r) for r in rows if r["step"] <= resume_step]
        self.live = None
        if live:
            self.commit()

    def __call__(self, step: int, rec: dict) -> None:
        row = {"step": step}
        for l in range(self.n_levels):
            for q in LEVEL_CURVES[:5]:
                row[f"level{l}/{q}"] = rec[f"level{l}/{q}"]
            row[f"level{l}/l0_unreachable"] = int(rec[f"level{l}/l0_unreachable"])
            if l:
                row[f"level{l}/pc"] = rec[f"pair{l - 1}/pc"]
                row[f"level{l}/with_parent"] = rec[f"pair{l - 1}/assigned"]
                for q in CHURN_CURVES:  # only at the first record after a hierarchy update
                    if f"pair{l - 1}/{q}" in rec:
                        row[f"level{l}/{q}"] = rec[f"pair{l - 1}/{q}"]
        row |= {"loss": rec["loss"], "lr": rec["lr"]}
        self.rows.append(row)
        if self.live is not None:
            self._log(row)
            self.live.make_summary()

    def commit(self) -> None:
        """From now on, log every row at once: start DVCLive on the folder (which clears its
        curves) and log the rows so far."""
        if self.live is not None:
            return
        from dvclive import Live  # imports DVC: only where curves are written

        self.live = Live(str(self.folder), dvcyaml=False, save_dvc_exp=False)
        for row in self.rows:
            self._log(row)
        if self.rows:
            self.live.make_summary()

    def _log(self, row: dict) -> None:
        self.live.step = row["step"]
        for key, value in row.items():
            if key != "step":
                self.live.log_metric(f"train/{self.name}/{key}", value)

    def end(self) -> None:
        """The run is over (DVCLive's ``end``: final summary, experiment bookkeeping)."""
        if self.live is not None:
            self.live.end()


def curve_rows(folder: str | Path, name: str) -> list[dict]:
    """The rows logged under ``folder`` for run ``name`` (:class:`LiveCurves`), by step:
    ``[{"step": s, "loss": ..., "level0/l0": ..., ...}, ...]``; [] when there are none."""
    root = Path(folder) / "plots" / "metrics" / "train" / name
    by_step: dict[int, dict] = {}
    for path in sorted(root.rglob("*.tsv")):
        key = path.relative_to(root).with_suffix("").as_posix()
        with path.open(newline="") as f:
            for rec in csv.DictReader(f, delimiter="\t"):
                step = int(rec["step"])
                value = float(rec[path.stem])
                by_step.setdefault(step, {"step": step})[key] = (
                    int(value) if key.endswith(INTEGER_CURVES) else value)
    return [by_step[s] for s in sorted(by_step)]


def train_store(store: str | Path | StoreInfo, d_model: int, batch_size: int) -> StoreInfo:
    """The store a run of width ``d_model`` and batch ``batch_size`` trains on, opened and
    checked: an error names the mismatch and the fix."""
    info = store if isinstance(store, StoreInfo) else open_store(store)
    if info.d_model != d_model:
        raise ValueError(f"store {info.path} holds d = {info.d_model}, the config asks for "
                         f"d_model = {d_model}")
    if info.n_clean("train") < batch_size:
        raise ValueError(f"store {info.path} has {info.n_clean('train')} train rows, fewer than "
                         f"one batch (sae.batch_size = {batch_size}): lower it or extract "
                         "more tokens")
    return info


def train_on_store(cfg: HSAEConfig, store: str | Path | StoreInfo, scale: float | str | Path, *,
                   checkpoint: str | Path, curves: str | Path,
                   run: TrainRunConfig = TrainRunConfig(), name: str = "hsae",
                   dist: DistContext = SINGLE,
                   on_finish: Callable[[Trainer], None] | None = None) -> HSAE:
    """Train ``cfg.total_steps`` steps of ``cfg.batch_size`` shuffled train rows (epochs repeat as
    needed), resuming from ``checkpoint`` when it holds a run of the same config. ``name``
    (``hsae``, ``baseline``) names the run in messages and in the curves. Under ``dist`` each
    rank reads its slice of every global batch; rank 0 writes curves and checkpoints.
    ``on_finish(trainer)`` sees the finished trainer (e.g. its ``summary()``)."""
    info = train_store(store, cfg.d_model, cfg.batch_size)
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
    log = (LiveCurves(curves, cfg.n_levels, name, start, rows=(state or {}).get("curves"),
                      live=bool(start)) if dist.is_main else None)
    del state
    t0, every = time.perf_counter(), run.log_every * max(1, cfg.total_steps // 20 // run.log_every)

    warned: set[int] = set()

    def on_log(step: int, rec: dict) -> None:
        log(step, rec)
        for l in range(cfg.n_levels):
            if rec[f"level{l}/l0_unreachable"] and l not in warned:
                warned.add(l)
                print(f"{name} WARNING: level {l} is under the target L0 {cfg.target_l0:g} "
                      f"with nothing left to lower: L0 {rec[f'level{l}/l0']:.2f} with lambda at "
                      f"its floor (sae.lambda_min = {cfg.lambda_min:g}). Either the data's "
                      "unpenalised L0 is below the target (lower sae.target_l0) or the "
                      "schedule is too short for the thresholds to fall that far (more steps; "
                      f"DVCLive curve train/{name}/level{l}/l0_unreachable)", flush=True)
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
        raise diverged(err, info, name) from err
    check_unchanged(f"{name}'s training")  # under DVC: params.yaml as this run read it
    if log is not None:
        log.end()
    if on_finish is not None:
        on_finish(trainer)
    return model


def diverged(err: FloatingPointError, info: StoreInfo, name: str) -> FloatingPointError:
    """The error of a run whose loss stopped being finite, after verifying the whole train split
    (:func:`~hsae_core.data.integrity.verify_split`: every chunk's checksum, NaN/Inf): either the
    data verified clean, so the optimisation diverged, or the corrupt data, named."""
    print(f"{name}: the loss diverged ({err}); verifying the train split of {info.path} "
          f"({info.n_rows('train')} rows)", flush=True)
    problems = verify_split(info, "train")
    if problems:
        return FloatingPointError(f"{name} diverged on corrupt data: " + " | ".join(problems))
    return FloatingPointError(f"{err}. The train split of {info.path} verified clean (every "
                              "chunk's checksum and every row finite), so the optimisation "
                              "diverged: lower sae.lr")


__all__ = ["LEVEL_CURVES", "LiveCurves", "curve_rows", "diverged", "train_on_store",
           "train_store", "usable_checkpoint"]
