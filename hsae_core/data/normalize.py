"""The constant input scale of the paper (Appendix A.1): ``E||scale * x||^2 = d``.

Estimated from a seeded sample of whole blocks of the train split (train rows are already
shuffled at write time), without the rows the store flags as attention sinks (METHOD §1: left
in, the 55 sink rows of SmolLM2 layer 15 carry 57% of the split's squared norm and a typical
token ends near 0.49 d), written as a small JSON artifact, and applied on the fly by the
readers. JSON schema (all keys always present)::

    {"scale": float, "mean_squared_norm": float, "d_model": int, "n_sample_tokens": int,
     "model": str, "layer": int, "dtype": str, "store_train_tokens": int, "seed": int,
     "target": "E||scale * x||^2 = d_model"}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hsae_core.common import fsio
from hsae_core.data.config import NormalizeConfig
from hsae_core.data.store import StoreError, StoreInfo, from_storage, open_store

TARGET = "E||scale * x||^2 = d_model"


class NormalizationError(ValueError):
    """The activations cannot be normalised (NaN, Inf, or all zero)."""


@dataclass(frozen=True)
class Normalization:
    scale: float
    mean_squared_norm: float
    d_model: int
    n_sample_tokens: int
    model: str
    layer: int
    dtype: str
    store_train_tokens: int
    seed: int
    target: str = TARGET

    def save(self, path: str | Path) -> None:
        """Write the JSON atomically (a new file renamed over the old one, never rewritten in
        place: DVC links it to its cache)."""
        fsio.write_text(path, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Normalization":
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"no normalisation file at {path}: run `python -m stages.normalize`")
        return cls(**json.loads(path.read_text()))


def sample_blocks(n_rows: int, block_rows: int, n_tokens: int, seed: int) -> list[int]:
    """Start rows of the seeded random blocks holding at least ``n_tokens`` rows (all if fewer)."""
    starts = np.arange(0, n_rows, block_rows)
    order = np.random.default_rng(seed).permutation(len(starts))
    n_blocks = min(len(starts), math.ceil(n_tokens / block_rows))
    return sorted(int(s) for s in starts[order[:n_blocks]])


def estimate_normalization(store: str | Path | StoreInfo, cfg: NormalizeConfig = NormalizeConfig()
                           ) -> Normalization:
    """Estimate ``scale = sqrt(d / E||x||^2)`` from about ``cfg.n_tokens`` train rows (flagged
    attention-sink rows left out).

    Raises :class:`NormalizationError` naming the rows if any sampled row holds NaN or Inf.
    """
    info = store if isinstance(store, StoreInfo) else open_store(store)
    arr, flags = info.array("train"), info.array("train", "outlier")
    n_rows, block = info.n_rows("train"), info.attrs["chunk_rows"] * 8
    total, count = 0.0, 0
    for start in sample_blocks(n_rows, block, cfg.n_tokens, cfg.seed):
        x = from_storage(arr[start: start + block], info.dtype).double()
        bad = (~x.isfinite().all(dim=1)).nonzero().flatten()
        if len(bad):
            rows = ", ".join(str(start + int(i)) for i in bad[:10])
            raise NormalizationError(f"NaN or Inf in train rows {rows} ({len(bad)} in block at "
                                     f"row {start}) of store {info.path}: re-extract the store")
        x = x[torch.from_numpy(flags[start: start + block] == 0)]
        total += float((x * x).sum())
        count += len(x)
    msn = total / count
    if not msn > 0:
        raise NormalizationError(f"train activations of {info.path} are all zero: cannot "
                                 "normalise")
    return Normalization(scale=math.sqrt(info.d_model / msn), mean_squared_norm=msn,
                         d_model=info.d_model, n_sample_tokens=count, model=info.attrs["model"],
                         layer=info.attrs["layer"], dtype=info.dtype, store_train_tokens=n_rows,
                         seed=cfg.seed)


def resolve_scale(scale: float | str | Path, store: StoreInfo) -> float:
    """A float scale as is, or the scale of a normalisation JSON that must match ``store``."""
    if isinstance(scale, (int, float)):
        return float(scale)
    norm = Normalization.load(scale)
    got = (norm.model, norm.layer, norm.d_model)
    want = (store.attrs["model"], store.attrs["layer"], store.d_model)
    if got != want:
        raise StoreError(f"normalisation {scale} is for (model, layer, d) = {got}, store "
                         f"{store.path} holds {want}: run `python -m stages.normalize` on this "
                         "store")
    return norm.scale


__all__ = ["Normalization", "NormalizationError", "estimate_normalization", "resolve_scale",
           "sample_blocks"]
