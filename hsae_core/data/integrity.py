"""The store's bytes, checked: every read names a corrupt chunk, a fingerprint of every shard
costs a few bytes per chunk, and a whole split can be verified.

Format 3 stores (:mod:`hsae_core.data.store`) carry zarr's crc32c after every inner chunk of
every array, and their shard indexes carry one too; zarr checks both on read and raises a bare
``ValueError("Stored and computed checksum do not match ...")``. :class:`CheckedArray` (what
``StoreInfo.array`` and ``StoreInfo.group[...]`` return) turns that into
:class:`CorruptChunksError`: the split and column, the shard file, the rows of each bad chunk
(found by re-reading the requested rows chunk by chunk) and how to restore the store.

:func:`shard_fingerprints` reads, per shard file, its index and the 4-byte crc32c stored after
each chunk, never the data: a digest of the whole array's content at about 20 bytes per MB, so a
checkpoint's data identity covers every shard (a swapped or rewritten shard changes it).
:func:`verify_split` reads a whole split through the checks (checksums, and NaN/Inf in the
activations): what a training run that diverged asks before blaming the learning rate.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import zarr

from hsae_core.common import fsio
from hsae_core.data.store import StoreError

EMPTY = 2**64 - 1  # the shard index's offset and size of a chunk that is not stored


class CorruptChunksError(StoreError):
    """Bytes of the store changed on disk: a chunk's (or a shard index's) crc32c does not match.
    ``split``, ``column`` and ``rows`` (``(first, last)`` per bad chunk) name them."""

    def __init__(self, message: str, *, split: str, column: str, rows: list[tuple[int, int]]):
        super().__init__(message)
        self.split, self.column, self.rows = split, column, rows


def is_checksum_error(err: BaseException) -> bool:
    """zarr's crc32c mismatch (``Crc32cCodec`` on a chunk or a shard index)."""
    return isinstance(err, ValueError) and "checksum" in str(err).lower()


def restore_hint(path: str | Path) -> str:
    return (f"Restore the store (`dvc checkout {path}` where DVC tracks it, `dvc pull` from a "
            "remote) or re-extract it (`dvc repro -f extract-activations`, or "
            "`python -m stages.extract_activations --overwrite`)")


class CheckedArray:
    """A store array whose reads raise :class:`CorruptChunksError` naming the bad chunks instead
    of zarr's bare checksum error; everything else (``shape``, ``attrs``, ``chunks``,
    ``shards``, ...) is the zarr array's."""

    def __init__(self, array: zarr.Array, store_path: str | Path):
        self.raw, self.store_path = array, store_path

    def __getattr__(self, name: str):
        return getattr(self.raw, name)

    def __len__(self) -> int:
        return self.raw.shape[0]

    def __getitem__(self, key):
        try:
            return self.raw[key]
        except ValueError as err:
            if not is_checksum_error(err):
                raise
            start, stop = _rows_of(key, self.raw.shape[0])
            raise corrupt_error(self.raw, self.store_path, start, stop) from err


class CheckedGroup:
    """A store group whose arrays are :class:`CheckedArray`\\ s (``group["documents/label"]``)."""

    def __init__(self, group: zarr.Group, store_path: str | Path):
        self.raw, self.store_path = group, store_path

    def __getattr__(self, name: str):
        return getattr(self.raw, name)

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def __getitem__(self, key: str):
        item = self.raw[key]
        if isinstance(item, zarr.Array):
            return CheckedArray(item, self.store_path)
        return CheckedGroup(item, self.store_path) if isinstance(item, zarr.Group) else item


def _rows_of(key, n: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` a read of ``key`` touches (all rows when not a plain slice)."""
    first = key[0] if isinstance(key, tuple) and key else key
    if isinstance(first, slice) and first.step in (None, 1):
        start, stop, _ = first.indices(n)
        return start, max(start, stop)
    if isinstance(first, (int, np.integer)):
        row = int(first) % n if n else 0
        return row, row + 1
    return 0, n


def bad_chunks(arr: zarr.Array, start: int, stop: int) -> list[tuple[int, int]]:
    """``(first, last)`` rows of every inner chunk of ``arr`` in rows ``[start, stop)`` whose
    bytes (or whose shard's index) fail their checksum, found by reading chunk by chunk."""
    rows = arr.chunks[0]
    bad = []
    for c in range(start // rows * rows, stop, rows):
        end = min(c + rows, arr.shape[0])
        try:
            arr[c:end]
        except ValueError as err:
            if not is_checksum_error(err):
                raise
            bad.append((c, end - 1))
    return bad


def corrupt_error(arr: zarr.Array, store_path: str | Path, start: int,
                  stop: int) -> CorruptChunksError:
    """The error naming the bad chunks of ``arr`` among rows ``[start, stop)``: per shard file,
    the rows of each bad chunk (a shard whose index is damaged fails every chunk)."""
    split, column = _split_column(arr)
    bad = bad_chunks(arr, start, stop)
    shard = (arr.shards or arr.chunks)[0]
    by_file: dict[str, list[tuple[int, int]]] = {}
    for first, last in bad:
        by_file.setdefault(shard_key(arr, first // shard), []).append((first, last))
    shown = "; ".join(
        f"shard file {arr.path}/{key}: rows " + ", ".join(f"{a}..{b}" for a, b in spans[:8])
        + (f" and {len(spans) - 8} more chunks" if len(spans) > 8 else "")
        for key, spans in list(by_file.items())[:4])
    if not bad:  # the checksum failed on the whole read but on no chunk alone
        shown = f"rows {start}..{stop - 1}"
    return CorruptChunksError(
        f"store {store_path}: corrupt data in {split}/{column} ({len(bad)} chunk(s) whose "
        f"crc32c does not match their bytes: changed on disk since extraction): {shown}. "
        + restore_hint(store_path), split=split, column=column, rows=bad)


def _split_column(arr: zarr.Array) -> tuple[str, str]:
    parts = arr.path.strip("/").split("/")
    return (parts[0], "/".join(parts[1:])) if len(parts) > 1 else ("", parts[0])


def shard_key(arr: zarr.Array, index: int) -> str:
    """The file name (under the array's folder) of shard ``index`` along the rows."""
    return arr.metadata.encode_chunk_key((index,) + (0,) * (arr.ndim - 1))


# -- fingerprints of every shard, from the stored checksums ---------------------------------------

def _layout(arr: zarr.Array) -> tuple[int, int]:
    """``(inner chunks per shard, index bytes)`` of a sharded array with its index at the end
    and a crc32c after each chunk and after the index (the store's format 3)."""
    from zarr.codecs import Crc32cCodec, ShardingCodec

    codec = arr.metadata.codecs[0] if arr.metadata.codecs else None
    if not (isinstance(codec, ShardingCodec) and codec.index_location.value == "end"
            and isinstance(codec.codecs[-1], Crc32cCodec)
            and isinstance(codec.index_codecs[-1], Crc32cCodec)):
        raise StoreError(f"{arr.path}: not a sharded array with per-chunk crc32c (a store of "
                         "format 3): re-extract the store")
    n = math.prod(s // c for s, c in zip(arr.shards, arr.chunks))
    return n, 16 * n + 4


def shard_fingerprints(arr: zarr.Array, store_path: str | Path) -> list[str]:
    """Per shard file of ``arr`` (rows order), a SHA-256 of its index and of the crc32c stored
    after each of its chunks: any change of a shard's data (a rewrite, a swap with another
    shard) changes its digest. Reads ``16 + 4`` bytes per chunk, never the data; a shard file
    that is absent (an all-zero column is not stored) gets the digest of ``b"absent"``."""
    arr = getattr(arr, "raw", arr)
    n_inner, index_bytes = _layout(arr)
    shard = arr.shards[0]
    out = []
    for i in range(math.ceil(arr.shape[0] / shard)):
        where = fsio.join(fsio.join(store_path, arr.path), shard_key(arr, i))
        out.append(hashlib.sha256(_shard_checksums(where, index_bytes, store_path)).hexdigest())
    return out


def _shard_checksums(where: str | Path, index_bytes: int, store_path: str | Path) -> bytes:
    if fsio.is_url(where):
        fs, p = fsio.filesystem(where)
        if not fs.exists(p):
            return b"absent"
        size = fs.size(p)
        index = fs.cat_file(p, start=max(0, size - index_bytes), end=size)
        entries = _entries(index, where, store_path)
        ends = [int(o + n) for o, n in entries if o != EMPTY]
        crcs = fs.cat_ranges([p] * len(ends), [e - 4 for e in ends], ends) if ends else []
        return index + b"".join(crcs)
    path = Path(where)
    if not path.is_file():
        return b"absent"
    with path.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - index_bytes))
        index = f.read()
        parts = [index]
        for offset, nbytes in _entries(index, where, store_path):
            if offset != EMPTY:
                f.seek(int(offset + nbytes) - 4)
                parts.append(f.read(4))
        return b"".join(parts)


def _entries(index: bytes, where, store_path) -> np.ndarray:
    if len(index) < 4 or (len(index) - 4) % 16:
        raise StoreError(f"shard file {where} is shorter than its index ({len(index)} bytes): "
                         "the store is damaged. " + restore_hint(store_path))
    return np.frombuffer(index[:-4], dtype="<u8").reshape(-1, 2)


# -- a whole split, verified ----------------------------------------------------------------------

def verify_split(store, split: str, columns: tuple[str, ...] = ("activations", "outlier"),
                 max_shown: int = 5) -> list[str]:
    """Read every row of ``split`` (the given columns, shard by shard) through the checksums,
    and the activations for NaN/Inf; one line per problem found (empty: the split is clean)."""
    from hsae_core.data.reader import nonfinite_rows

    problems: list[str] = []
    for column in columns:
        arr = store.array(split, column)
        step = (arr.shards or arr.chunks)[0]
        for start in range(0, arr.shape[0], step):
            try:
                block = arr[start:start + step]
            except CorruptChunksError as err:
                problems.append(str(err))
                continue
            if column == "activations":
                bad = nonfinite_rows(block, store.dtype)
                if len(bad):
                    rows = ", ".join(str(start + int(i)) for i in bad[:10])
                    problems.append(f"store {store.path}: NaN or Inf in {split} rows {rows} "
                                    f"({len(bad)} in the shard of rows {start}.."
                                    f"{start + len(block) - 1})")
            if len(problems) >= max_shown:
                return problems
    return problems


__all__ = ["CheckedArray", "CheckedGroup", "CorruptChunksError", "bad_chunks", "corrupt_error",
           "is_checksum_error", "restore_hint", "shard_fingerprints", "shard_key",
           "verify_split"]
