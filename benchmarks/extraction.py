"""Extraction throughput against the bare truncated forward pass, and store size per dtype.

    .venv/bin/python benchmarks/extraction.py [--tokens 16384] [--layer 15] [--context-len 256]

Loads the embedded SmolLM2 GGUF once (METHOD §6), then alternates: the bare forward of
embeddings + blocks 0..layer on exactly the batches extraction builds, and the full extraction
(tokenise, pack, forward, gather, convert, shuffle, write Zarr) of the same batches into a temp
store. Prints tokens/s side by side (best of ``--repeats``) and the ratio; then writes a store
per dtype and prints its size per million tokens.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsae_core.data_config import DTYPES, ExtractConfig  # noqa: E402
from hsae_core.extract import extract_activations, residual_rows, split_sequences  # noqa: E402
from hsae_core.lm import load_lm  # noqa: E402


def bare_forward(lm, batches) -> tuple[int, float]:
    start, tokens = time.perf_counter(), 0
    for batch in batches:
        tokens += len(residual_rows(lm, batch))
    return tokens, time.perf_counter() - start


def extraction(lm, cfg: ExtractConfig, root: Path) -> tuple[int, float, int]:
    out = root / f"store-{cfg.dtype}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    store = extract_activations(cfg, out, lm=lm, progress=False)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return store.n_rows("train"), seconds, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        bare, full = [], []
        for _ in range(args.repeats):
            tokens, seconds = bare_forward(lm, batches)
            bare.append(tokens / seconds)
            stored, seconds, _ = extraction(lm, cfg, Path(tmp))
            full.append(stored / seconds)
        print(f"\n{'':28s}{'tokens/s (best)':>16s}{'runs':>24s}")
        print(f"{'bare truncated forward':28s}{max(bare):16.0f}{str([round(x) for x in bare]):>24s}")
        print(f"{'extraction to Zarr':28s}{max(full):16.0f}{str([round(x) for x in full]):>24s}")
        print(f"{'ratio extraction / bare':28s}{max(full) / max(bare):16.3f}   "
              f"({tokens} bare tokens, {stored} stored tokens, context {args.context_len}, "
              f"batch {args.batch_size})")
        print(f"\n{'dtype':10s}{'store MB / 1M tokens':>22s}{'activation bytes/token':>24s}")
        for dtype in DTYPES:
            small = ExtractConfig(**(cfg.to_dict() | {"dtype": dtype, "max_tokens": 4096}))
            stored, _, size = extraction(lm, small, Path(tmp))
            act = lm.d_model * np.dtype({"float32": np.float32}.get(dtype, np.float16)).itemsize
            print(f"{dtype:10s}{size / stored:22.1f}{act:24d}")


if __name__ == "__main__":
    main()
