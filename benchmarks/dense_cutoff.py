"""Where a dense matmul starts to beat the sparse kernels (sparse_ops.DENSE_CUTOFF).

    python benchmarks/dense_cutoff.py                 # CPU, d=576, one level of 1024 latents
    python benchmarks/dense_cutoff.py --device cuda --d 2304 --n 16384

Trains one independent level at several target L0 (support densities) twice, once with every
product forced dense and once forced sparse, interleaved step by step, and prints the median
step times side by side. The density where the two cross is the cutoff for that device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsae_core.model import sparse_ops  # noqa: E402
from hsae_core.model.config import HSAEConfig  # noqa: E402
from hsae_core.model.trainer import Trainer  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--densities", default="0.05,0.1,0.2,0.3,0.45")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(args.batch, args.d, generator=gen).to(args.device) for _ in range(2)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, "
          f"d={args.d}, n={args.n}, batch={args.batch}")
    forced = {"dense": 0.0, "sparse": 1.1}
    for density in (float(s) for s in args.densities.split(",")):
        trainers = {}
        for name, cut in forced.items():
            sparse_ops.DENSE_CUTOFF = cut
            t = Trainer(HSAEConfig(d_model=args.d, level_sizes=(args.n,), batch_size=args.batch,
                                   total_steps=100_000, target_l0=density * args.n,
                                   update_interval=0, rho=0.0, swap_rate=0.0,
                                   device=args.device))
            t.train_step(data[0])  # thresholds at the target L0
            t.train_step(data[1])
            trainers[name] = t
        times = {name: [] for name in forced}
        for i in range(args.steps):
            for name, cut in forced.items():
                sparse_ops.DENSE_CUTOFF = cut
                sync(args.device)
                t0 = time.perf_counter()
                trainers[name].train_step(data[i % 2])
                sync(args.device)
                times[name].append(time.perf_counter() - t0)
        with torch.no_grad():
            real = trainers["sparse"].model.levels[0].encode(data[0]).pattern.density
        dense, sparse = (statistics.median(times[k]) * 1e3 for k in forced)
        print(f"density {real:.3f}: dense {dense:7.1f} ms   sparse {sparse:7.1f} ms   "
              f"sparse/dense {sparse / dense:.2f}")


if __name__ == "__main__":
    main()
