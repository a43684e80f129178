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
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

PathLike = str | Path


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
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: PathLike, text: str) -> None:
    """:func:`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary local path to write ``path``'s new content to (its suffix kept, for writers
    that infer the format from it); on success it replaces ``path``, on error it is removed and
    ``path`` is untouched. For a URL the file is written locally, then uploaded."""
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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


__all__ = ["as_location", "atomic_path", "exists", "filesystem", "is_url", "join", "load_torch",
           "read_bytes", "read_json", "remove", "replacing_folder", "safetensors_bytes",
           "save_torch", "write_bytes", "write_json", "write_text"]
