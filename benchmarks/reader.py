"""Reader throughput: shuffled train batches and ordered eval batches, in tokens/s.

    .venv/bin/python benchmarks/reader.py [--rows 262144] [--d-model 576] [--dtype float32]
        [--checksums both|on|off] [--repeat 7]

``--checksums both`` (the default) writes the same rows twice, as the store format writes them
(a crc32c after every inner chunk, verified on every read) and without it (``compressors=None``,
the format before issue 25), and times the three readers on each, alternating, ``--repeat``
times: the checksums' read cost measured side by side on the same machine at the same time.

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

import hsae_core.data.store as store_module  # noqa: E402
from hsae_core.data.reader import EvalActivations, TrainActivations  # noqa: E402
from hsae_core.data.store import COLUMNS, Layout, StoreWriter, open_store, to_storage  # noqa: E402


def write_random_store(path: Path, rows: int, d_model: int, dtype: str,
                       checksums: bool = True) -> None:
    layout = Layout.from_bytes(d_model, dtype, 1 << 20, 300 << 20)
    saved = store_module.CHECKSUM
    store_module.CHECKSUM = saved if checksums else None  # None: raw chunks, no crc32c
    try:
        writer = StoreWriter(path, layout, {"benchmark": True})
    finally:
        store_module.CHECKSUM = saved
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", rows), ("eval", rows // 8)):
        for start in range(0, n, layout.shard_rows):
            k = min(layout.shard_rows, n - start)
            acts = to_storage(torch.randn(k, d_model, generator=gen), dtype)
            cols = {c: np.arange(start, start + k).astype(t) for c, t in COLUMNS.items()}
            cols["outlier"] = np.zeros(k, np.uint8)  # no attention-sink rows: every row served
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


class WholeShards:
    """Every train shard read whole through the store's array (zarr's decoding alone: no
    shuffling, no conversion): where the checksum's cost shows undiluted."""

    def __init__(self, store):
        self.arr = store.array("train")

    def __iter__(self):
        step = self.arr.shards[0]
        for start in range(0, self.arr.shape[0], step):
            yield torch.from_numpy(self.arr[start:start + step])


def readers(store, batch_size: int) -> list[tuple[str, object]]:
    return [("train shards, whole (zarr only)", WholeShards(store)),
            ("train, in line (default)", TrainActivations(store, 1.0, batch_size=batch_size)),
            ("train, prefetch thread (8)", TrainActivations(store, 1.0, batch_size=batch_size,
                                                             prefetch=8)),
            ("eval, in order with ids", EvalActivations(store, 1.0, batch_size=batch_size))]


def compare_checksums(tmp: str, args) -> None:
    """Both variants of the same rows, each reader timed on each variant in turn, repeated."""
    stores = {}
    for name, on in (("crc32c", True), ("raw", False)):
        path = Path(tmp) / f"{name}.zarr"
        write_random_store(path, args.rows, args.d_model, args.dtype, checksums=on)
        stores[name] = open_store(path)
    codecs = {n: type(s.array("train").metadata.codecs[0].codecs[-1]).__name__
              for n, s in stores.items()}
    print(f"{args.rows} train rows, d={args.d_model}, {args.dtype}; inner chunk codecs: "
          f"{codecs}")
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeat + 1):  # the first pass warms the page cache: not counted
        for name, store in stores.items():
            for reader_name, reader in readers(store, args.batch_size):
                rates.setdefault((reader_name, name), []).append(rate(reader)[0])
    print(f"\n{'reader':34s}{'raw tok/s':>26s}{'crc32c tok/s':>26s}{'crc32c / raw':>22s}"
          f"{'best / best':>13s}")
    for reader_name, _ in readers(stores["raw"], args.batch_size):
        raw, crc = rates[(reader_name, "raw")][1:], rates[(reader_name, "crc32c")][1:]
        ratio = [c / r for c, r in zip(crc, raw)]
        print(f"{reader_name:34s}{_spread(raw):>26s}{_spread(crc):>26s}"
              f"{_spread(ratio, '.3f'):>22s}{max(crc) / max(raw):13.3f}")
    print(f"(median [min, max] of {args.repeat} passes after a warm-up pass, each reader on "
          "each variant in turn; best / best: the fastest pass of each, the least disturbed "
          "by other work on a shared machine)")


def _spread(values: list[float], fmt: str = ".0f") -> str:
    v = sorted(values)
    return f"{v[len(v) // 2]:{fmt}} [{v[0]:{fmt}}, {v[-1]:{fmt}}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=262144)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--width", type=int, default=4096, help="SAE width of the stand-in consumer")
    ap.add_argument("--checksums", choices=("both", "on", "off"), default="both",
                    help="both: time the store with and without its per-chunk crc32c")
    ap.add_argument("--repeat", type=int, default=7, help="passes of --checksums both")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hsae-bench-") as tmp:
        if args.checksums == "both":
            compare_checksums(tmp, args)
            return
        path = Path(tmp) / "store.zarr"
        start = time.perf_counter()
        write_random_store(path, args.rows, args.d_model, args.dtype,
                           checksums=args.checksums == "on")
        store = open_store(path)
        mb = (args.rows * args.d_model
              * np.dtype(to_storage(torch.zeros(1, 1), args.dtype).dtype).itemsize / 2**20)
        print(f"wrote {args.rows} train rows, d={args.d_model}, {args.dtype} ({mb:.0f} MB) in "
              f"{time.perf_counter() - start:.1f} s; chunk {store.attrs['chunk_rows']} rows, "
              f"shard {store.attrs['shard_rows']} rows")
        print(f"\n{'reader':34s}{'tokens/s':>12s}{'MB/s (float32 out)':>20s}")
        for name, reader in readers(store, args.batch_size):
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
