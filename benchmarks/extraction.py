"""Extraction throughput against the bare truncated forward pass, and store size per dtype.

    .venv/bin/python benchmarks/extraction.py [--tokens 16384] [--layer 15] [--context-len 256]

Loads the embedded SmolLM2 GGUF once (METHOD §6), then alternates: the bare forward of
embeddings + blocks 0..layer on exactly the batches extraction builds, and the full extraction
(tokenise, pack, forward, gather, convert, shuffle, write Zarr) of the same batches into a temp
store. Prints tokens/s side by side (median of ``--repeats``, wall and per CPU-second, since the
CPU may be shared) and the ratio; then writes a store
per dtype and prints its size per million tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsae_core.data.config import DTYPES, ExtractConfig  # noqa: E402
from hsae_core.data.extract import (  # noqa: E402
    extract_activations,
    residual_rows,
    split_sequences,
)
from hsae_core.data.lm import load_lm  # noqa: E402


def clock() -> np.ndarray:
    return np.array([time.perf_counter(), time.process_time()])


def bare_forward(lm, batches) -> tuple[int, np.ndarray]:
    start, tokens = clock(), 0
    for batch in batches:
        tokens += len(residual_rows(lm, batch))
    return tokens, clock() - start


class TimedForward:
    """Wraps the truncated forward to count the seconds extraction spends inside it."""

    def __init__(self, residual):
        self.residual, self.seconds = residual, 0.0

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        hidden = self.residual(input_ids)
        self.seconds += time.perf_counter() - start
        return hidden


def extraction(lm, cfg: ExtractConfig, root: Path) -> tuple[int, np.ndarray, int]:
    out = root / f"store-{cfg.dtype}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    start = clock()
    store = extract_activations(cfg, out, lm=lm, progress=False)
    seconds = clock() - start
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return store.n_rows("train"), seconds, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--context-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cfg = ExtractConfig(layer=args.layer, context_len=args.context_len, batch_size=args.batch_size,
                        max_tokens=args.tokens, eval_fraction=0.0)
    t0 = time.perf_counter()
    lm = load_lm(cfg.model, cfg.layer, cfg.context_len)
    print(f"loaded {cfg.model} (d={lm.d_model}, blocks 0..{cfg.layer} of {lm.n_layers}) in "
          f"{time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")
    n_seqs = -(-args.tokens // (args.context_len - 1))
    seqs = list(islice(split_sequences(cfg, lm, "train"), n_seqs))
    batches = [seqs[i: i + cfg.batch_size] for i in range(0, len(seqs), cfg.batch_size)]
    with tempfile.TemporaryDirectory(prefix="hsae-bench-") as tmp:
        bare, full, inside = [], [], []
        for _ in range(args.repeats):
            tokens, seconds = bare_forward(lm, batches)
            bare.append(tokens / seconds)
            timed = dataclasses.replace(lm, residual=TimedForward(lm.residual))
            stored, seconds, _ = extraction(timed, cfg, Path(tmp))
            full.append(stored / seconds)
            inside.append(timed.residual.seconds / seconds[0])
        bare, full = np.median(bare, axis=0), np.median(full, axis=0)
        print(f"\nmedian of {args.repeats} alternating runs; CPU time = this process's user + "
              "system")
        print(f"{'':28s}{'tokens/s wall':>16s}{'tokens/CPU-s':>16s}")
        print(f"{'bare truncated forward':28s}{bare[0]:16.0f}{bare[1]:16.0f}")
        print(f"{'extraction to Zarr':28s}{full[0]:16.0f}{full[1]:16.0f}")
        print(f"{'ratio extraction / bare':28s}{full[0] / bare[0]:16.3f}{full[1] / bare[1]:16.3f}"
              f"   ({tokens} bare tokens, {stored} stored, context {args.context_len}, "
              f"batch {args.batch_size})")
        print(f"{'forward share of extraction':28s}{np.median(inside):16.3f}   (same run, so "
              f"immune to a shared CPU's drift: the in-run ratio extraction / bare)")
        print(f"\n{'dtype':10s}{'store MB / 1M tokens':>22s}{'activation bytes/token':>24s}")
        for dtype in DTYPES:
            small = ExtractConfig(**(cfg.to_dict() | {"dtype": dtype, "max_tokens": 4096}))
            stored, _, size = extraction(lm, small, Path(tmp))
            act = lm.d_model * np.dtype({"float32": np.float32}.get(dtype, np.float16)).itemsize
            print(f"{dtype:10s}{size / stored:22.1f}{act:24d}")


if __name__ == "__main__":
    main()
