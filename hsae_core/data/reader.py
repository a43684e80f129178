"""Readers the trainer and the metrics use: shuffled train batches and ordered eval batches.

Random-row reads from Zarr are slow (METHOD §7), so the train reader reads contiguous blocks
in a seeded random order, ``buffer_blocks`` at a time, and shuffles rows in memory; train
rows were already shuffled across documents at write time. Rows the store flags as attention
sinks (``outlier`` column) are never served. Optionally a background thread
prepares the next batches while the trainer works. Both readers multiply by the normalisation scale
(Appendix A.1) and return float32.

Both readers check every block they read for NaN and Inf (a few ms per 8 MB block) and stop with
:class:`NonFiniteRowsError` naming the first bad rows, so no batch of theirs carries a NaN into a
training run or a metric; every chunk they read is checked against the crc32c stored with it
(the store hands out :class:`~hsae_core.data.integrity.CheckedArray`: a changed byte stops them
with :class:`~hsae_core.data.integrity.CorruptChunksError` naming the chunk's rows and shard
file); a store missing a shard file is refused when it is opened
(:func:`~hsae_core.data.store.open_store`: zarr would read the shard as zeros).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from hsae_core.data.normalize import resolve_scale
from hsae_core.data.store import (
    COLUMNS,
    STORAGE,
    StoreError,
    StoreInfo,
    from_storage,
    open_store,
)


class NonFiniteRowsError(StoreError):
    """A row the reader would serve holds NaN or Inf."""


def nonfinite_rows(block: np.ndarray, dtype: str) -> np.ndarray:
    """Indices of the rows of a stored block (``dtype``: the store's logical dtype) holding NaN
    or Inf; bfloat16 is stored as uint16 bits (exponent all ones: Inf or NaN)."""
    if dtype == "bfloat16":
        bad = ((block & 0x7F80) == 0x7F80).any(axis=1)
    else:
        bad = ~np.isfinite(block).all(axis=1)
    return np.flatnonzero(bad)


def check_finite(block: np.ndarray, store: StoreInfo, split: str, start: int,
                 served: np.ndarray | None = None) -> None:
    """Raise :class:`NonFiniteRowsError` naming the rows (store rows ``start + i``) of ``block``
    that hold NaN or Inf, among the ``served`` ones (a boolean mask; default all)."""
    bad = nonfinite_rows(block, store.dtype)
    if served is not None:
        bad = bad[served[bad]]
    if len(bad):
        rows = ", ".join(str(start + int(i)) for i in bad[:10])
        raise NonFiniteRowsError(
            f"NaN or Inf in {split} rows {rows} ({len(bad)} in the block of rows {start}.."
            f"{start + len(block) - 1}) of store {store.path}: re-extract the store "
            "(`dvc repro -f extract-activations`, or `python -m stages.extract_activations "
            "--overwrite`)")


class TrainActivations:
    """Shuffled train batches: an iterable of ``torch.float32`` tensors ``[batch_size, d]``.

    ``TrainActivations(store, scale, *, batch_size=1024, seed=0, epochs=1, max_tokens=None,
    block_rows=None, buffer_blocks=32, drop_last=False, prefetch=0, model=None, layer=None)``

    - ``store``: store path (or an opened :class:`StoreInfo`); ``model`` / ``layer``, if given,
      must match the store. ``scale``: a float or the path of the normalisation JSON.
    - Each epoch serves every train row exactly once (flagged attention-sink rows never), in an
      order fixed by ``(seed, epoch)``;
      the epoch's last batch is smaller unless ``drop_last``. ``epochs=None`` repeats until
      ``max_tokens``; ``max_tokens`` caps the rows served in all (the last batch is cut).
      ``len(reader)`` is the number of batches an iteration yields.
    - Memory: ``buffer_blocks * block_rows`` rows (default block: 8 inner chunks, about 8 MB)
      plus ``prefetch`` batches.
    - ``rank`` / ``world_size`` (data parallelism, :mod:`hsae_core.common.distributed`): every rank
      walks the same shuffled stream and yields only its equal contiguous slice of each global
      batch of ``batch_size`` rows, so the ranks' slices together are the 1-process batch.
      Needs ``drop_last``, ``batch_size`` divisible by ``world_size`` and ``max_tokens`` (if
      given) a multiple of ``batch_size``. Each rank reads the whole stream (read volume times
      ``world_size``) and converts only its rows.
    - ``prefetch > 0`` prepares that many batches in a background thread: worth it when the
      trainer waits on a GPU or the store is on a slow disk; on a 2-core CPU the thread competes
      with the trainer's and reading in line is as fast (benchmarks/reader.py).
    """

    def __init__(self, store: str | Path | StoreInfo, scale: float | str | Path, *,
                 batch_size: int = 1024, seed: int = 0, epochs: int | None = 1,
                 max_tokens: int | None = None, block_rows: int | None = None,
                 buffer_blocks: int = 32, drop_last: bool = False, prefetch: int = 0,
                 model: str | None = None, layer: int | None = None, rank: int = 0,
                 world_size: int = 1):
        self.store = (store if isinstance(store, StoreInfo)
                      else open_store(store, model=model, layer=layer))
        self.scale = resolve_scale(scale, self.store)
        if epochs is None and max_tokens is None:
            raise ValueError("TrainActivations: epochs=None repeats forever: give max_tokens")
        for name, value in (("batch_size", batch_size), ("buffer_blocks", buffer_blocks),
                            ("epochs", 1 if epochs is None else epochs)):
            if value < 1:
                raise ValueError(f"TrainActivations.{name} = {value} is invalid: expected >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"TrainActivations: rank {rank} is not in [0, world_size = "
                             f"{world_size})")
        if world_size > 1 and (not drop_last or batch_size % world_size
                               or (max_tokens is not None and max_tokens % batch_size)):
            raise ValueError(f"TrainActivations over {world_size} ranks needs drop_last=True, "
                             f"batch_size ({batch_size}) divisible by the ranks and max_tokens "
                             f"({max_tokens}) a multiple of batch_size, so that every global "
                             "batch splits into equal slices")
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.seed = batch_size, seed
        self.epochs, self.max_tokens = epochs, max_tokens
        self.block_rows = block_rows or self.store.attrs["chunk_rows"] * 8
        self.buffer_blocks, self.drop_last, self.prefetch = buffer_blocks, drop_last, prefetch
        self.n_stored, self.d_model = self.store.n_rows("train"), self.store.d_model
        self.n_rows = self.store.n_clean("train")
        if self.n_rows == 0:
            raise ValueError(f"store {self.store.path} has no train rows")

    def __len__(self) -> int:
        """Batches one iteration yields (what a learning-rate schedule needs)."""
        full, rest = divmod(self.n_rows, self.batch_size)
        per_epoch = full * [self.batch_size] + ([rest] if rest and not self.drop_last else [])
        if self.max_tokens is None:
            return len(per_epoch) * self.epochs
        batches, served, epoch = 0, 0, 0
        while served < self.max_tokens and (self.epochs is None or epoch < self.epochs):
            for size in per_epoch:
                batches, served = batches + 1, served + size
                if served >= self.max_tokens:
                    break
            epoch += 1
        return batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.prefetch > 0:
            return _prefetched(self._batches, self.prefetch)
        return self._batches()

    def _epoch_rows(self, epoch: int) -> Iterator[np.ndarray]:
        """Stored rows of one epoch in shuffled batches (the last one may be short)."""
        arr, rng = self.store.array("train"), np.random.default_rng([self.seed, epoch])
        flags = self.store.array("train", "outlier")
        starts = np.arange(0, self.n_stored, self.block_rows)
        starts = starts[rng.permutation(len(starts))]
        carry = np.empty((0, self.d_model), dtype=STORAGE[self.store.dtype])
        for g in range(0, len(starts), self.buffer_blocks):
            group = sorted(starts[g: g + self.buffer_blocks])
            blocks = [arr[s: s + self.block_rows] for s in group]
            if self.n_rows < self.n_stored:  # drop the flagged rows
                keep = [flags[s: s + self.block_rows] == 0 for s in group]
                for b, s, k in zip(blocks, group, keep):
                    check_finite(b, self.store, "train", int(s), k)
                blocks = [b[k] for b, k in zip(blocks, keep)]
            else:
                for b, s in zip(blocks, group):
                    check_finite(b, self.store, "train", int(s))
            buf = np.concatenate([carry] + blocks)
            order = rng.permutation(len(buf))
            full = len(buf) - len(buf) % self.batch_size
            for i in range(0, full, self.batch_size):
                yield buf[order[i: i + self.batch_size]]
            carry = buf[order[full:]]
        if len(carry) and not self.drop_last:
            yield carry

    def _batches(self) -> Iterator[torch.Tensor]:
        served, epoch = 0, 0
        while self.epochs is None or epoch < self.epochs:
            for rows in self._epoch_rows(epoch):
                if self.max_tokens is not None:
                    rows = rows[: self.max_tokens - served]
                served += len(rows)
                if self.world_size > 1:
                    b = len(rows) // self.world_size
                    rows = rows[self.rank * b: (self.rank + 1) * b]
                x = from_storage(rows, self.store.dtype)
                # numpy: no torch threads
                np.multiply(x.numpy(), np.float32(self.scale), out=x.numpy())
                yield x
                if self.max_tokens is not None and served >= self.max_tokens:
                    return
            epoch += 1


class EvalBatch(NamedTuple):
    """Eval rows in store order: activations ``[b, d]`` float32 (scaled) and int64 ids ``[b]``."""

    activations: torch.Tensor
    token_ids: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor
    sequence_ids: torch.Tensor


class EvalActivations:
    """Ordered eval batches: an iterable of :class:`EvalBatch`.

    ``EvalActivations(store, scale, *, batch_size=1024, max_tokens=None, model=None, layer=None)``:
    rows in store order (sequence by sequence, BOS and flagged attention-sink rows excluded), at
    most ``max_tokens`` of them.
    """

    def __init__(self, store: str | Path | StoreInfo, scale: float | str | Path, *,
                 batch_size: int = 1024, max_tokens: int | None = None,
                 model: str | None = None, layer: int | None = None):
        self.store = (store if isinstance(store, StoreInfo)
                      else open_store(store, model=model, layer=layer))
        self.scale = resolve_scale(scale, self.store)
        self.batch_size = batch_size
        n = self.store.n_clean("eval")
        self.n_rows = n if max_tokens is None else min(n, max_tokens)

    def __len__(self) -> int:
        """Batches of at most ``batch_size`` rows; a block of the store ends a batch early, so
        this is an upper bound when the split holds flagged rows."""
        return -(-self.n_rows // self.batch_size)

    def __iter__(self) -> Iterator[EvalBatch]:
        block = max(self.batch_size, self.store.attrs["chunk_rows"] * 8)
        arrays = {c: self.store.array("eval", c) for c in ("activations", *COLUMNS)}
        served, stored = 0, self.store.n_rows("eval")
        for start in range(0, stored, block):
            if served >= self.n_rows:
                return
            cols = {c: a[start:start + block] for c, a in arrays.items()}
            keep = cols.pop("outlier") == 0
            keep &= np.cumsum(keep) <= self.n_rows - served
            check_finite(cols["activations"], self.store, "eval", start, keep)
            cols = {c: v[keep] for c, v in cols.items()}
            served += int(keep.sum())
            acts = from_storage(cols.pop("activations"), self.store.dtype).mul_(self.scale)
            ids = {c: torch.from_numpy(v.astype(np.int64)) for c, v in cols.items()}
            for i in range(0, len(acts), self.batch_size):
                s = slice(i, i + self.batch_size)
                yield EvalBatch(acts[s], ids["token_ids"][s], ids["doc_ids"][s],
                                ids["positions"][s], ids["sequence_ids"][s])


_DONE = object()


def _prefetched(produce: Callable[[], Iterator], depth: int) -> Iterator:
    """Run ``produce()`` in a thread, ``depth`` items ahead; errors surface in the consumer."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in produce():
                if not put(item):
                    return
            put(_DONE)
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(err)

    thread = threading.Thread(target=work, daemon=True, name="hsae-reader")
    thread.start()
    try:
        while (item := items.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


__all__ = ["EvalActivations", "EvalBatch", "NonFiniteRowsError", "TrainActivations",
           "check_finite", "nonfinite_rows"]
