"""Files at local paths or fsspec URLs (``s3://``, ``gs://``, ``memory://``, ``file://`` ...), so a
cluster can share checkpoints, exports and activation stores.

A plain path (no ``scheme://``) stays a :class:`pathlib.Path` and uses the local filesystem
directly; a URL goes through ``fsspec.core.url_to_fs``. Remote protocols need their fsspec
driver installed (``s3fs``, ``gcsfs``); the error names the missing one.

Every artifact of the pipeline is written through this module, never in place: a file goes to a
temporary name beside it and is renamed over the old one (:func:`write_bytes`,
:func:`write_text`, :func:`write_json`, :func:`atomic_path` for writers that want a path), a
folder is written whole under a temporary name and swapped in (:func:`replacing_folder`). DVC
links outputs to its cache (reflink or hardlink, ``.dvc/config``): a file rewritten in place
would rewrite the cached copy too; a renamed one is a new file. A failed write leaves the old
artifact as it was.

A full disk (``ENOSPC`` while a local artifact is written) raises :class:`DiskFullError`: one
line naming the path, the space it needs (the file's size, or at least what was written when
that is unknown) and the space free there. It is an ``OSError`` and a ``ValueError`` (every
stage reports a ``ValueError`` in one line); where it is not caught, the process prints that
line alone, not a traceback, and exits 1.
"""

from __future__ import annotations

import errno
import io
import json
import os
import secrets
import shutil
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

PathLike = str | Path


class DiskFullError(OSError, ValueError):
    """No space left on the device while writing an artifact (``errno`` ENOSPC); its text is
    one line naming the path and the space needed."""

    def __init__(self, message: str, path: PathLike | None = None):
        super().__init__(errno.ENOSPC, message)
        self.message, self.path = message, path
        _report_uncaught()

    def __str__(self) -> str:
        return self.message


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno == errno.ENOSPC


def _size(path: Path) -> int:
    """Bytes under ``path`` (a file or a folder); 0 when absent."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def disk_full(path: PathLike, need: int | None, written: int = 0,
              note: str = "") -> DiskFullError:
    """The one-line error for a write of ``path`` that ran out of space: ``need`` bytes (None:
    unknown, at least ``written``); ``note`` qualifies the need."""
    where = Path(path).resolve().parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"{_human(shutil.disk_usage(where).free)} free on {where}"
    except OSError:
        free = f"the free space on {where} unknown"
    needs = (f"it needs {_human(need)}{note}" if need is not None
             else f"it needs more than the {_human(written)} written when the disk filled")
    return DiskFullError(f"no space left on the device writing {path}: {needs}, {free}. "
                         "Free space there (or move data/ and DVC's cache to a larger disk) "
                         "and rerun; the previous version, if any, is untouched", path)


def _human(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _report_uncaught() -> None:
    """Make an uncaught :class:`DiskFullError` print its line alone (other errors unchanged)."""
    previous = sys.excepthook
    if getattr(previous, "_hsae_disk_full", False):
        return

    def hook(kind, value, tb):
        if isinstance(value, DiskFullError):
            print(f"error: {value}", file=sys.stderr)
        else:
            previous(kind, value, tb)

    hook._hsae_disk_full = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def is_url(path: PathLike) -> bool:
    """``scheme://...`` (a ``pathlib.Path`` never is: it would have collapsed the ``//``)."""
    return isinstance(path, str) and "://" in path


def as_location(path: PathLike) -> PathLike:
    """A URL string stays a string, anything else becomes a ``Path``."""
    return path if is_url(path) else Path(path)


def filesystem(url: str):
    """``(fs, path)`` for a URL; a clear error when its protocol's driver is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise ValueError(f"cannot open {url!r} through fsspec: {err} (install the protocol's "
                         "driver, e.g. s3fs for s3://, gcsfs for gs://)") from err


def exists(path: PathLike) -> bool:
    if is_url(path):
        fs, p = filesystem(path)
        return fs.exists(p)
    return Path(path).exists()


def remove(path: PathLike) -> None:
    if is_url(path):
        fs, p = filesystem(path)
        if fs.exists(p):
            fs.rm(p, recursive=True)
    elif Path(path).is_dir() and not Path(path).is_symlink():
        shutil.rmtree(path)
    else:
        Path(path).unlink(missing_ok=True)


def join(path: PathLike, name: str) -> PathLike:
    return f"{path.rstrip('/')}/{name}" if is_url(path) else Path(path) / name


def _token() -> str:
    """A name part no other writer uses at the same time (process id and random hex)."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _local_temp(path: Path) -> Path:
    """A hidden name beside ``path`` (same folder, so a rename is atomic), same suffix."""
    return path.with_name(f".{path.stem}.tmp-{_token()}{path.suffix}")


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` at ``path`` atomically where the filesystem allows: a temporary name
    renamed into place (a single object PUT on object stores, which is atomic by itself). The
    old file is replaced, never rewritten (see the module docstring)."""
    if is_url(path):
        fs, p = filesystem(path)
        parent = p.rsplit("/", 1)[0] if "/" in p else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
        tmp = f"{p}.tmp-{_token()}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, p)
        return
    with atomic_path(path, size=len(data)) as tmp:
        tmp.write_bytes(data)


def write_text(path: PathLike, text: str) -> None:
    """:func:`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_path(path: PathLike, size: int | None = None) -> Iterator[Path]:
    """A temporary local path to write ``path``'s new content to (its suffix kept, for writers
    that infer the format from it); on success it replaces ``path``, on error it is removed and
    ``path`` is untouched (a full disk: :class:`DiskFullError`, with ``size`` as the space
    needed when given). For a URL the file is written locally, then uploaded."""
    if is_url(path):
        with _scratch_dir() as scratch:
            tmp = scratch / Path(path.rstrip("/").rsplit("/", 1)[-1])
            yield tmp
            write_bytes(path, tmp.read_bytes())
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _local_temp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise disk_full(path, size, _size(tmp)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _scratch_dir() -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hsae-") as scratch:
        yield Path(scratch)


@contextmanager
def replacing_folder(path: PathLike) -> Iterator[PathLike]:
    """A fresh temporary folder (a path or URL beside ``path``) to write a whole folder artifact
    into; on success it replaces ``path`` (the old folder is renamed aside, then removed, so no
    file of the old one is rewritten and none survives), on error it is removed and ``path`` is
    untouched."""
    path = as_location(path)
    token = _token()
    if is_url(path):
        fs, p = filesystem(path)
        p = p.rstrip("/")
        tmp, old = f"{p}.tmp-{token}", f"{p}.old-{token}"
        proto = path.split("://", 1)[0]
        try:
            yield f"{proto}://{tmp}"
        except BaseException:
            if fs.exists(tmp):
                fs.rm(tmp, recursive=True)
            raise
        if fs.exists(p):
            fs.mv(p, old, recursive=True)
        if fs.exists(tmp):
            fs.mv(tmp, p, recursive=True)
        else:
            fs.makedirs(p, exist_ok=True)
        if fs.exists(old):
            fs.rm(old, recursive=True)
        return
    tmp = path.with_name(f".{path.name}.tmp-{token}")
    old = path.with_name(f".{path.name}.old-{token}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as err:
        written = _size(tmp) if is_disk_full(err) else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise disk_full(path, None, written) from err
        raise
    moved = path.exists() or path.is_symlink()
    if moved:
        os.rename(path, old)
    os.rename(tmp, path)
    if moved:
        remove(old)


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file of ``tensors`` (all torch tensors or all numpy arrays),
    identical for identical content: safetensors writes its header's ``__metadata__`` in hash
    order, which changes from call to call; here the header is written with sorted keys (the
    tensor data and its layout are safetensors' own)."""
    if any(isinstance(t, torch.Tensor) for t in tensors.values()):
        from safetensors.torch import save
    else:
        from safetensors.numpy import save
    raw = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    meta = header.pop("__metadata__", None)
    ordered = dict(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0])))
    if meta is not None:
        ordered = {"__metadata__": dict(sorted(meta.items()))} | ordered
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def read_bytes(path: PathLike) -> bytes:
    if is_url(path):
        fs, p = filesystem(path)
        with fs.open(p, "rb") as f:
            return f.read()
    return Path(path).read_bytes()


def save_torch(obj: Any, path: PathLike) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def load_torch(path: PathLike, map_location: Any = "cpu") -> Any:
    return torch.load(io.BytesIO(read_bytes(path)), map_location=map_location, weights_only=False)


def write_json(path: PathLike, obj: Any, *, indent: int | None = 2,
               sort_keys: bool = False) -> None:
    """``obj`` as JSON (a final newline), written atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def read_json(path: PathLike) -> Any:
    return json.loads(read_bytes(path))


__all__ = ["DiskFullError", "as_location", "atomic_path", "disk_full", "exists", "filesystem",
           "is_disk_full", "is_url", "join", "load_torch", "read_bytes", "read_json", "remove",
           "replacing_folder", "safetensors_bytes", "save_torch", "write_bytes", "write_json",
           "write_text"]
