"""Reader throughput: shuffled train batches and ordered eval batches, in tokens/s.

    .venv/bin/python benchmarks/reader.py [--rows 262144] [--d-model 576] [--dtype float32]

Writes a store of random rows through the real StoreWriter (METHOD §7 chunk and shard sizes),
then times one epoch of TrainActivations (batch 1024, default blocks and buffer) with and
without the prefetch thread, and one pass of EvalActivations, with a consumer that does nothing;
then a consumer doing an SAE-sized matmul step per batch, fed from memory versus by the reader,
with the share of the loop spent waiting for batches (measured in the same run, so it holds on
a shared CPU where separate runs drift). Compare with the trainer's consumption
(roughly 5-20k tokens/s on this CPU). The first epoch
after writing reads from the page cache, as later epochs of a store that fits in RAM do.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsae_core.data.reader import EvalActivations, TrainActivations  # noqa: E402
from hsae_core.data.store import COLUMNS, Layout, StoreWriter, open_store, to_storage  # noqa: E402


def write_random_store(path: Path, rows: int, d_model: int, dtype: str) -> None:
    layout = Layout.from_bytes(d_model, dtype, 1 << 20, 300 << 20)
    writer = StoreWriter(path, layout, {"benchmark": True})
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", rows), ("eval", rows // 8)):
        for start in range(0, n, layout.shard_rows):
            k = min(layout.shard_rows, n - start)
            acts = to_storage(torch.randn(k, d_model, generator=gen), dtype)
            cols = {c: np.arange(start, start + k).astype(t) for c, t in COLUMNS.items()}
            writer.write_shard(split, start, acts, cols)
        writer.mark(split, n, max_doc_id=n - 1, done=True)
    writer.write_documents(np.zeros(1), np.zeros(1), [])
    writer.commit({"model": "random", "layer": 0, "d_model": d_model, "dtype": dtype,
                   "n_tokens": {"train": rows, "eval": rows // 8}, "chunk_rows": layout.chunk_rows,
                   "shard_rows": layout.shard_rows})


def rate(batches, work=None) -> tuple[float, float]:
    """Tokens/s of the loop, and the share of its time spent waiting for the next batch."""
    start, tokens, waiting, batches = time.perf_counter(), 0, 0.0, iter(batches)
    while True:
        t = time.perf_counter()
        b = next(batches, None)
        waiting += time.perf_counter() - t
        if b is None:
            break
        x = b if isinstance(b, torch.Tensor) else b.activations
        if work is not None:
            work(x)
        tokens += len(x)
    total = time.perf_counter() - start
    return tokens / total, waiting / total


def sae_step(d_model: int, width: int):
    """A stand-in for a training step's compute: encode and decode one SAE level."""
    enc, dec = torch.randn(d_model, width) / d_model**0.5, torch.randn(width, d_model) / width**0.5

    def work(x: torch.Tensor) -> None:
        ((torch.relu(x @ enc) @ dec - x) ** 2).mean().item()
    return work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=262144)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--width", type=int, default=4096, help="SAE width of the stand-in consumer")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hsae-bench-") as tmp:
        path = Path(tmp) / "store.zarr"
        start = time.perf_counter()
        write_random_store(path, args.rows, args.d_model, args.dtype)
        store = open_store(path)
        mb = (args.rows * args.d_model
              * np.dtype(to_storage(torch.zeros(1, 1), args.dtype).dtype).itemsize / 2**20)
        print(f"wrote {args.rows} train rows, d={args.d_model}, {args.dtype} ({mb:.0f} MB) in "
              f"{time.perf_counter() - start:.1f} s; chunk {store.attrs['chunk_rows']} rows, "
              f"shard {store.attrs['shard_rows']} rows")
        print(f"\n{'reader':34s}{'tokens/s':>12s}{'MB/s (float32 out)':>20s}")
        for name, reader in [
            ("train, in line (default)", TrainActivations(store, 1.0, batch_size=args.batch_size)),
            ("train, prefetch thread (8)", TrainActivations(store, 1.0, batch_size=args.batch_size,
                                                             prefetch=8)),
            ("eval, in order with ids", EvalActivations(store, 1.0, batch_size=args.batch_size)),
        ]:
            tokens_per_s, _ = rate(reader)
            print(f"{name:34s}{tokens_per_s:12.0f}{tokens_per_s * args.d_model * 4 / 2**20:20.0f}")
        work = sae_step(args.d_model, args.width)
        fixed = [torch.randn(args.batch_size, args.d_model) for _ in range(8)]
        n_batches = min(64, args.rows // args.batch_size)
        alone, _ = rate((fixed[i % 8] for i in range(n_batches)), work)
        print(f"\nconsumer doing an SAE step (width {args.width}) per batch, {n_batches} batches:")
        print(f"{'  in-memory batches (compute only)':34s}{alone:12.0f}")
        for prefetch in (0, 8):
            reader = TrainActivations(store, 1.0, batch_size=args.batch_size, prefetch=prefetch,
                                      max_tokens=n_batches * args.batch_size)
            fed, waiting = rate(reader, work)
            print(f"{f'  fed by train reader, prefetch={prefetch}':34s}{fed:12.0f}"
                  f"   ({fed / alone:.2f} of compute-only; {100 * waiting:.1f}% of the loop spent "
                  f"waiting for batches)")


if __name__ == "__main__":
    main()
