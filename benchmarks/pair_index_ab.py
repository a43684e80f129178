"""The HSAE training step with every level pair's index lists built in one pass
(``hsae_core/model/pair_index.py``) against pair by pair, interleaved in one process.

    python benchmarks/pair_index_ab.py                       # d 576, both ladders, fp32 and bf16
    python benchmarks/pair_index_ab.py --d 32 --sizes 64,128,256,512 --batch 128 --steps 4

The two ways give the same bits (tests/test_core_coupling.py), so one trainer alternates them
step by step (``pair_index.BATCHED``) and the medians are compared; also the ATen ops each way
dispatches in one step (benchmarks/gpu_counters.py), the proxy for a GPU's kernel launches.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_counters import OpCounter  # noqa: E402
from step_time import (  # noqa: E402
    add_shape_args, batches, ladders, make_trainer, paper_density_l0)

from hsae_core.model import pair_index  # noqa: E402


def alternate(t, xs: list[torch.Tensor], steps: int, device="cpu") -> dict:
    """On a trainer ``t`` with a forest: the ATen ops of one step and the median time of
    ``steps`` steps each way, the two ways alternating step by step; ``pair_index.BATCHED`` is
    restored after. benchmarks/gpu_check.py runs this in its profile phase at the paper's
    sizes."""
    cuda = torch.device(device).type == "cuda"
    ops = {}
    times: dict[bool, list[float]] = {True: [], False: []}
    before = pair_index.BATCHED
    try:
        for way in (True, False):
            pair_index.BATCHED = way
            with OpCounter() as c:
                t.train_step(xs[1 % len(xs)])
            ops[way] = c.count
        for i in range(2 * steps):
            way = i % 2 == 0
            pair_index.BATCHED = way
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            t.train_step(xs[i % len(xs)])
            if cuda:
                torch.cuda.synchronize(device)
            times[way].append(time.perf_counter() - t0)
    finally:
        pair_index.BATCHED = before
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"one_pass_ms": med[True], "pair_by_pair_ms": med[False],
            "one_pass_ops": ops[True], "pair_by_pair_ops": ops[False], "steps_each": steps}


def compare(d: int, sizes: tuple[int, ...], batch: int, steps: int, autocast: str | None,
            l0: float) -> dict:
    torch.manual_seed(0)
    t = make_trainer(d, sizes, batch, "cpu", False, target_l0=l0, autocast_dtype=autocast)
    xs = batches(d, batch, 4, "cpu")
    t.train_step(xs[0])  # thresholds at the target L0
    assert not t.update_hierarchy().is_empty()
    for i in range(3):
        t.train_step(xs[i % 4])
    return alternate(t, xs, steps)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--steps", type=int, default=30, help="timed steps each way")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d={args.d}, "
          f"batch={args.batch}, the paper's L0 per latent, {args.steps} steps each way "
          f"interleaved (median)")
    out = {}
    for sizes in ladders(args):
        for autocast in (None, "bfloat16"):
            r = compare(args.d, sizes, args.batch, args.steps, autocast, paper_density_l0(sizes))
            out[f"{','.join(map(str, sizes))} {autocast or 'fp32'}"] = r
            print(f"  {sizes} {autocast or 'fp32':8s}: pair by pair {r['pair_by_pair_ms']:7.1f} "
                  f"ms {r['pair_by_pair_ops']:5d} ops; one pass {r['one_pass_ms']:7.1f} ms "
                  f"{r['one_pass_ops']:5d} ops")
    return out


if __name__ == "__main__":
    main()
