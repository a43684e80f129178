"""The activation store: a sharded Zarr v3 group, its resumable writer, and its validation.

Layout (METHOD §7)::

    <store>/                      group attributes (none time-dependent): format, format_version,
                                  model, layer, hook, d_model, n_layers, dtype, storage_dtype,
                                  context_len, corpus, n_tokens {train, eval}, n_documents,
                                  bos_token_id, eos_token_id, bos_excluded, shuffled,
                                  chunk_rows, shard_rows, extract_config (the full ExtractConfig),
                                  outliers {rule, norm_ratio, rows {train, eval}}
      train/activations           [N, d] float32 | float16 | uint16 (bfloat16 bits), raw, sharded,
                                  a crc32c per inner chunk; array attribute logical_dtype
      train/token_ids             [N] int32
      train/doc_ids               [N] int64   (document id in corpus order)
      train/positions             [N] int32   (position in the sequence; 0 is BOS, never stored)
      train/sequence_ids          [N] int64   (sequence index within the split)
      train/outlier               [N] uint8   (1: an attention-sink row, skipped by readers)
      eval/...                    the same columns
      documents/split             [n_docs] uint8 (0 train, 1 eval)
      documents/label             [n_docs] int32 (index into attribute ``label_names``; -1 none)

Train rows are shuffled across documents at write time; eval rows stay in sequence order, so a
token's context is read back contiguously. All arrays share one row geometry: inner chunks of
``chunk_rows`` (about ``chunk_bytes`` of activations) in shards of ``shard_rows`` (about
``shard_bytes``), so a shard of rows is one file per array, written whole by one writer.
A store is written under ``<store>.partial`` with a progress marker and renamed to ``<store>``
only when complete, so a finished store is never touched by a later run that fails.

A store may live at an fsspec URL (``s3://bucket/acts.zarr``, ``memory://acts.zarr``; zarr 3
opens it through ``FsspecStore``); ``file://`` URLs are opened as local paths. The rename at
commit is then the filesystem's ``mv`` (a copy on object stores).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from hsae_core.common import fsio
from hsae_core.data.corpus import SPLITS

FORMAT = "hsae-activations"
#: 3: every inner chunk carries a crc32c checksum (zarr's ``Crc32cCodec``), verified on read;
#: 2: attention-sink rows flagged (``outlier`` column, ``outliers`` attribute); 1 had neither.
FORMAT_VERSION = 3
#: What each older format lacks, for the message that refuses it.
OLDER_FORMATS = {1: "attention-sink rows flagged (extract.outlier_norm_ratio)",
                 2: "per-chunk checksums (a flipped byte would be read silently)"}
COLUMNS = {"token_ids": np.int32, "doc_ids": np.int64, "positions": np.int32,
           "sequence_ids": np.int64, "outlier": np.uint8}
#: How the ``outlier`` column is decided (recorded in the store's ``outliers`` attribute).
OUTLIER_RULE = "||x||^2 > norm_ratio x the median ||x||^2 of the row's extraction batch"
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
PROGRESS = "progress.json"
#: Inner-chunk codecs after the raw bytes: a crc32c per chunk (4 bytes per ~1 MB), no compression
#: (METHOD §7: compression buys ~7% and costs 2-4x read speed).
CHECKSUM = (Crc32cCodec(),)


class StoreError(ValueError):
    """A store is missing, incomplete, malformed, or not the one the config asks for."""


@dataclass(frozen=True)
class Layout:
    """Row geometry: ``chunk_rows`` per inner chunk, ``shard_rows`` (a multiple) per shard."""

    d_model: int
    dtype: str
    chunk_rows: int
    shard_rows: int

    @classmethod
    def from_bytes(cls, d_model: int, dtype: str, chunk_bytes: int, shard_bytes: int) -> "Layout":
        row = d_model * np.dtype(STORAGE[dtype]).itemsize
        chunk = 2 ** max(0, round(math.log2(max(1.0, chunk_bytes / row))))
        return cls(d_model, dtype, chunk, chunk * max(1, round(shard_bytes / (chunk * row))))


def to_storage(hidden: torch.Tensor, dtype: str) -> np.ndarray:
    """Float activations ``[n, d]`` to the stored numpy representation of ``dtype``."""
    if dtype == "bfloat16":
        return hidden.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return hidden.to(getattr(torch, dtype)).cpu().numpy()


def from_storage(rows: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored rows to a float32 tensor (bfloat16 bits are widened exactly, never rounded).

    Pure numpy, so reader threads never start a torch thread pool; float32 rows are shared.
    """
    if dtype == "bfloat16":
        return torch.from_numpy((rows.astype(np.uint32) << 16).view(np.float32))
    return torch.from_numpy(rows.astype(np.float32, copy=False))


def location(path: str | Path) -> str | Path:
    """A store location: a local ``Path`` (``file://`` URLs included) or an fsspec URL string."""
    if isinstance(path, str) and path.startswith("file://"):
        return Path(path[len("file://"):])
    return fsio.as_location(path)


def partial_path(path: str | Path) -> str | Path:
    path = location(path)
    if fsio.is_url(path):
        return f"{path.rstrip('/')}.partial"
    return path.with_name(path.name + ".partial")


def _rename(src: str | Path, dst: str | Path) -> None:
    if fsio.is_url(src):
        fs, s = fsio.filesystem(src)
        fs.mv(s, fsio.filesystem(dst)[1], recursive=True)
    else:
        Path(src).rename(dst)


class StoreWriter:
    """Writes a store under ``<path>.partial``; an interrupted run resumes from its marker.

    ``StoreWriter(path, layout, fingerprint, overwrite=False)``; ``rows_done(split)`` says where
    a split resumes; ``write_shard`` writes one whole shard; ``mark(split, rows)`` records that
    all rows before ``rows`` are on disk; ``commit(attrs)`` finalises and renames.
    """

    def __init__(self, path: str | Path, layout: Layout, fingerprint: dict,
                 overwrite: bool = False, attach: bool = False):
        """``attach``: open the ``.partial`` group another process (rank 0 of a distributed
        extraction) created, to write shards into it; markers and commit stay with that process."""
        self.path, self.layout, self.partial = location(path), layout, partial_path(path)
        if attach:
            self.progress = fsio.read_json(fsio.join(self.partial, PROGRESS))
            self.group = zarr.open_group(self.partial, mode="r+")
            return
        if fsio.exists(self.path) and not overwrite:
            raise StoreError(f"store {self.path} already exists: pass overwrite to replace it "
                             "(it is kept until the new one is complete)")
        marker = fsio.join(self.partial, PROGRESS)
        if fsio.exists(marker):
            self.progress = fsio.read_json(marker)
            if self.progress["fingerprint"] != fingerprint:
                diff = sorted(k for k in fingerprint | self.progress["fingerprint"]
                              if fingerprint.get(k) != self.progress["fingerprint"].get(k))
                raise StoreError(f"{self.partial} is an interrupted extraction with other "
                                 f"settings ({', '.join(diff)}): delete it or rerun with its "
                                 "settings to resume")
            self.group = zarr.open_group(self.partial, mode="r+")
        else:
            if fsio.exists(self.partial):
                fsio.remove(self.partial)
            self.progress = {"fingerprint": fingerprint, "rows": {s: 0 for s in SPLITS},
                             "max_doc_id": {s: -1 for s in SPLITS}, "done": []}
            self.group = zarr.open_group(self.partial, mode="w")
            for split in SPLITS:
                self._create_split(split)
            self._save_progress()

    def _create_split(self, split: str) -> None:
        lay = self.layout
        self.group.create_array(f"{split}/activations", shape=(0, lay.d_model),
                                dtype=STORAGE[lay.dtype], chunks=(lay.chunk_rows, lay.d_model),
                                shards=(lay.shard_rows, lay.d_model), compressors=CHECKSUM,
                                fill_value=0, attributes={"logical_dtype": lay.dtype})
        for name, dtype in COLUMNS.items():
            self.group.create_array(f"{split}/{name}", shape=(0,), dtype=dtype,
                                    chunks=(lay.chunk_rows,), shards=(lay.shard_rows,),
                                    compressors=CHECKSUM, fill_value=0)

    def _save_progress(self) -> None:
        if fsio.is_url(self.partial):
            fsio.write_bytes(fsio.join(self.partial, PROGRESS),
                             json.dumps(self.progress, sort_keys=True).encode())
            return
        tmp = self.partial / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps(self.progress, sort_keys=True))
        tmp.replace(self.partial / PROGRESS)

    def rows_done(self, split: str) -> int:
        return self.progress["rows"][split]

    def split_done(self, split: str) -> bool:
        return split in self.progress["done"]

    def write_shard(self, split: str, start: int, activations: np.ndarray, columns: dict) -> None:
        """Write rows ``[start, start + n)``: one whole shard (the split's last may be short)."""
        assert start % self.layout.shard_rows == 0 and len(activations) <= self.layout.shard_rows
        stop = start + len(activations)
        for name, data in {"activations": activations, **columns}.items():
            arr = self.group[f"{split}/{name}"]
            try:
                if arr.shape[0] < stop:
                    arr.resize((stop, *arr.shape[1:]))
                arr[start:stop] = data
            except OSError as err:
                if not fsio.is_disk_full(err) or fsio.is_url(self.partial):
                    raise
                need = activations.nbytes + sum(np.asarray(c).nbytes for c in columns.values())
                raise fsio.disk_full(fsio.join(self.partial, f"{split}/{name}"), need,
                                     note=" for this shard, more for the rest of the store "
                                          "(rerunning resumes from the last whole shard)") from err

    def presize(self, split: str, rows: int) -> None:
        """Give every array of ``split`` its final length before several writers fill it
        (a resize is a metadata write: only one process may do it)."""
        for name in ("activations", *COLUMNS):
            arr = self.group[f"{split}/{name}"]
            if arr.shape[0] != rows:
                arr.resize((rows, *arr.shape[1:]))

    def max_doc_id(self, split: str) -> int:
        return self.progress["max_doc_id"][split]

    def mark(self, split: str, rows: int, max_doc_id: int, done: bool = False) -> None:
        """Record that rows ``[0, rows)`` of ``split`` are written (and the split is complete)."""
        for name in ("activations", *COLUMNS):
            arr = self.group[f"{split}/{name}"]
            if done and arr.shape[0] != rows:
                arr.resize((rows, *arr.shape[1:]))
        self.progress["rows"][split] = rows
        self.progress["max_doc_id"][split] = max_doc_id
        if done:
            self.progress["done"].append(split)
        self._save_progress()

    def write_documents(self, splits: np.ndarray, labels: np.ndarray,
                        label_names: list[str]) -> None:
        """The per-document table over document ids ``[0, n_docs)``, written before ``commit``."""
        self.group.create_array("documents/split", data=splits.astype(np.uint8), overwrite=True,
                                compressors=CHECKSUM)
        self.group.create_array("documents/label", data=labels.astype(np.int32), overwrite=True,
                                compressors=CHECKSUM, attributes={"label_names": label_names})

    def commit(self, attrs: dict) -> Path:
        """Write the group attributes (with the flagged rows counted per split under
        ``outliers.rows``), drop the marker, and move the store into place."""
        outliers = {"rule": OUTLIER_RULE, "norm_ratio": None, **attrs.pop("outliers", {})}
        outliers["rows"] = {s: int(self.group[f"{s}/outlier"][:].sum(dtype=np.int64))
                            for s in SPLITS}
        self.group.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, **attrs,
                                 "outliers": outliers})
        fsio.remove(fsio.join(self.partial, PROGRESS))
        if fsio.exists(self.path):
            old = (f"{self.path}.old" if fsio.is_url(self.path)
                   else self.path.with_name(self.path.name + ".old"))
            _rename(self.path, old)
            _rename(self.partial, self.path)
            fsio.remove(old)
        else:
            _rename(self.partial, self.path)
        return self.path


@dataclass(frozen=True)
class StoreInfo:
    """An opened, validated store: its attributes and arrays (``store.array(split, column)``).

    ``group`` (a :class:`~hsae_core.data.integrity.CheckedGroup`) and ``array`` hand out
    :class:`~hsae_core.data.integrity.CheckedArray`\\ s: a read whose bytes fail their crc32c
    raises :class:`~hsae_core.data.integrity.CorruptChunksError` (a :class:`StoreError`) naming
    the split, column, shard file and rows of each bad chunk, and how to restore the store."""

    path: str | Path
    attrs: dict
    group: "zarr.Group"

    @property
    def d_model(self) -> int:
        return self.attrs["d_model"]

    @property
    def dtype(self) -> str:
        return self.attrs["dtype"]

    def n_rows(self, split: str) -> int:
        """Rows stored in ``split`` (attention-sink rows included)."""
        return self.attrs["n_tokens"][split]

    def n_clean(self, split: str) -> int:
        """Rows the readers serve: stored rows minus the flagged attention-sink rows."""
        return self.n_rows(split) - self.attrs["outliers"]["rows"][split]

    def array(self, split: str, column: str = "activations"):
        """The checked array ``<split>/<column>`` (reads verify every chunk's crc32c)."""
        return self.group[f"{split}/{column}"]


def open_store(path: str | Path, *, model: str | None = None,
               layer: int | None = None) -> StoreInfo:
    """Open a finished store; if ``model`` / ``layer`` are given, the store must match them."""
    path = location(path)
    if not fsio.exists(path):
        hint = " (an interrupted extraction is at .partial: rerun it to resume)" \
            if fsio.exists(partial_path(path)) else ""
        raise StoreError(f"no activation store at {path}{hint}: run "
                         "`python -m stages.extract_activations`")
    try:
        group = zarr.open_group(path, mode="r")
    except (FileNotFoundError, ValueError) as err:
        raise StoreError(f"{path} is not a Zarr group: {err}") from err
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path} is not an activation store (attribute format != {FORMAT!r})")
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        lacks = OLDER_FORMATS.get(version, "the current layout")
        raise StoreError(
            f"store {path} has format_version {version!r}, this code reads "
            f"{FORMAT_VERSION}: it was written before {lacks}. Re-extract it: "
            "`dvc repro extract-activations` or "
            "`python -m stages.extract_activations --overwrite`")
    for key, want in (("model", model), ("layer", layer)):
        if want is not None and attrs[key] != want:
            raise StoreError(f"store {path} was written for {key} {attrs[key]!r}, but the config "
                             f"asks for {key} {want!r}: re-run extraction or point to the right "
                             "store")
    for split in SPLITS:
        for column in ("activations", *COLUMNS):
            _check_shards(path, group[f"{split}/{column}"], attrs["n_tokens"][split], split,
                          column)
    from hsae_core.data.integrity import CheckedGroup  # imports this module: not at the top

    return StoreInfo(path, attrs, CheckedGroup(group, path))


def _shard_files(path: str | Path, arr: zarr.Array, rows: int
                 ) -> tuple[dict[str, int], dict[str, int]]:
    """``({key: first row} of the shard files ``arr`` needs for rows ``[0, rows)``,
    {key: size in bytes} of the files present)``: one listing of the array's folder."""
    shard = (arr.shards or arr.chunks)[0]
    want = {arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1)): i * shard
            for i in range(math.ceil(rows / shard))}
    folder = fsio.join(path, arr.path)
    if fsio.is_url(folder):
        fs, p = fsio.filesystem(folder)
        p = p.rstrip("/")
        have = {f[len(p) + 1:]: int(info["size"])
                for f, info in fs.find(p, detail=True).items()}
    else:
        have = {f.relative_to(folder).as_posix(): f.stat().st_size
                for f in Path(folder).rglob("*") if f.is_file()}
    return want, have


def missing_shards(path: str | Path, arr: zarr.Array, rows: int) -> list[tuple[str, int]]:
    """``(key, first row)`` of every shard file of the store array ``arr`` (rows ``[0, rows)``)
    that is absent under ``path``: zarr would read its rows as the fill value (zeros)."""
    want, have = _shard_files(path, arr, rows)
    return [(key, first) for key, first in want.items() if key not in have]


def _check_shards(path: str | Path, arr: zarr.Array, rows: int, split: str,
                  column: str) -> None:
    """Refuse a store whose ``activations`` lack a shard file (other columns may: zarr stores
    no file for an all-zero shard) or any of whose shard files is shorter than its index (an
    empty file, which zarr would also read as zeros; a longer cut fails the index's crc32c)."""
    want, have = _shard_files(path, arr, rows)
    restore = ("Restore the store (`dvc checkout` where DVC tracks it) or re-extract it "
               "(`dvc repro -f extract-activations`, or "
               "`python -m stages.extract_activations --overwrite`)")
    missing = [(key, first) for key, first in want.items() if key not in have]
    if missing and column == "activations":
        shown = ", ".join(f"{arr.path}/{key} (rows from {first})" for key, first in missing[:5])
        raise StoreError(f"store {path} is missing {len(missing)} shard file(s) of "
                         f"{split}/activations: {shown}; zarr would read their rows as zeros. "
                         + restore)
    inner = math.prod(s // c for s, c in zip(arr.shards or arr.chunks, arr.chunks))
    short = [(key, want[key], have[key]) for key in want
             if key in have and have[key] < 16 * inner + 4]
    if short:
        shown = ", ".join(f"{arr.path}/{key} (rows from {first}: {size} bytes)"
                          for key, first, size in short[:5])
        raise StoreError(f"store {path}: {len(short)} shard file(s) of {split}/{column} are "
                         f"shorter than their index ({16 * inner + 4} bytes): {shown}; zarr would "
                         "read their rows as zeros. " + restore)


__all__ = ["COLUMNS", "FORMAT", "OUTLIER_RULE", "Layout", "StoreError", "StoreInfo", "StoreWriter",
           "from_storage", "missing_shards", "open_store", "partial_path", "to_storage"]
