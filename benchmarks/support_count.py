"""Counting every level's support: ``mask.sum()`` against ``torch.count_nonzero(mask)``.

    python benchmarks/support_count.py                       # d 576's ladder 512..4096, L0 12.5
    python benchmarks/support_count.py --sizes 1024,2048,4096,8192 --l0 25

Every training step counts each level's ``[batch, n]`` support mask before compacting it
(``SupportPattern.from_masks_reading``). A bool ``sum`` casts every element to int64 on the
CPU; ``count_nonzero`` does not (issue 23). Both give the same integers; they are timed
alternately in one process on random masks at the given density (per level L0 / n), medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def measure(sizes: tuple[int, ...], batch: int, l0: float, reps: int = 30) -> dict:
    gen = torch.Generator().manual_seed(0)
    masks = [torch.rand(batch, n, generator=gen) < l0 / n for n in sizes]
    ways = {"bool sum": lambda m: m.sum(), "count_nonzero": torch.count_nonzero}
    assert all(int(ways["bool sum"](m)) == int(ways["count_nonzero"](m)) for m in masks)
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(reps):
        for name, count in ways.items():
            t0 = time.perf_counter()
            for m in masks:
                count(m)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,1024,2048,4096")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--l0", type=float, default=12.5)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    out = measure(sizes, args.batch, args.l0, args.reps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; levels {sizes}, "
          f"batch {args.batch}, L0 {args.l0}: all levels' counts per step, median of "
          f"{args.reps}")
    for name, ms in out.items():
        print(f"  {name:14s} {ms:8.2f} ms")
    print(f"  count_nonzero is {out['bool sum'] / out['count_nonzero']:.1f}x faster")
    return out


if __name__ == "__main__":
    main()
