"""Files at local paths or fsspec URLs (``s3://``, ``gs://``, ``memory://``, ``file://`` ...), so a
cluster can share checkpoints, exports and activation stores.

A plain path (no ``scheme://``) stays a :class:`pathlib.Path` and uses the local filesystem
directly; a URL goes through ``fsspec.core.url_to_fs``. Remote protocols need their fsspec
driver installed (``s3fs``, ``gcsfs``); the error names the missing one.
"""

from __future__ import annotations

import io
import json
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
    elif Path(path).is_dir():
        import shutil

        shutil.rmtree(path)
    else:
        Path(path).unlink(missing_ok=True)


def join(path: PathLike, name: str) -> PathLike:
    return f"{path.rstrip('/')}/{name}" if is_url(path) else Path(path) / name


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` at ``path`` atomically where the filesystem allows: a temporary name
    renamed into place (a single object PUT on object stores, which is atomic by itself)."""
    if is_url(path):
        fs, p = filesystem(path)
        parent = p.rsplit("/", 1)[0] if "/" in p else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
        tmp = p + ".tmp"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, p)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


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


def write_json(path: PathLike, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=2).encode())


def read_json(path: PathLike) -> Any:
    return json.loads(read_bytes(path))


__all__ = ["as_location", "exists", "filesystem", "is_url", "join", "load_torch", "read_bytes",
           "read_json", "remove", "save_torch", "write_bytes", "write_json"]
