"""Host synchronisations and dispatched ATen ops per training step, HSAE against independent
levels, counted on the CPU (issue 23's proxies for a GPU step's syncs and kernel launches).

    python benchmarks/step_counts.py                       # d 576, 512..4096 and 1024..8192
    python benchmarks/step_counts.py --d 2304 --sizes 2048,4096,8192,16384 --l0 50

Counts, not times: the same on any machine for a given torch and configuration. A steady-state
step (thresholds initialised, the HSAE with a real forest, swaps and PC loss; not a logging
step) is counted with :class:`gpu_counters.SyncCounter` (each by source line) and
:class:`gpu_counters.OpCounter` (views aside). The issue's targets: <= 2 syncs and <= 150 ops
for the HSAE at any forest size.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_counters import OpCounter, SyncCounter  # noqa: E402
from step_time import (  # noqa: E402
    add_shape_args, batches, ladders, make_trainer, paper_density_l0)


class _NamedOps(OpCounter):
    def __init__(self):
        super().__init__()
        self.names: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.VIEWS:
            self.names[func.overloadpacket.__name__] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def count(d: int, sizes: tuple[int, ...], batch: int, l0: float, independent: bool) -> dict:
    torch.manual_seed(0)
    t = make_trainer(d, sizes, batch, "cpu", independent, target_l0=l0)
    xs = batches(d, batch, 4, "cpu")
    t.train_step(xs[0])  # thresholds at the target L0
    if not independent:
        assert not t.update_hierarchy().is_empty()
    for i in range(4):
        t.train_step(xs[i % 4])
    with SyncCounter() as syncs:
        t.train_step(xs[1])
    with _NamedOps() as ops:
        t.train_step(xs[2])
    return {"syncs": syncs.total, "sync_sites": syncs.by_site(), "ops": ops.count,
            "top_ops": dict(ops.names.most_common(8))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--l0", type=float, default=None,
                    help="target L0 (default: the paper's per latent, 50 * n_1 / 2048)")
    ap.add_argument("--json", type=Path, default=None, help="also write the counts here")
    args = ap.parse_args(argv)
    out = {}
    print(f"torch {torch.__version__}; per steady-state training step, d={args.d}, "
          f"batch {args.batch}")
    for sizes in ladders(args):
        l0 = args.l0 if args.l0 is not None else paper_density_l0(sizes)
        row = {name: count(args.d, sizes, args.batch, l0, name == "independent")
               for name in ("hsae", "independent")}
        out[",".join(map(str, sizes))] = row
        h, i = row["hsae"], row["independent"]
        print(f"  {sizes} L0 {l0:g}: syncs HSAE {h['syncs']} / independent {i['syncs']};  "
              f"ATen ops HSAE {h['ops']} / independent {i['ops']}")
        print(f"    HSAE syncs by site: {h['sync_sites']}")
        print(f"    HSAE top ops: {h['top_ops']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
