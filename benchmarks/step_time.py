"""Step time of the HSAE against the same levels trained independently, side by side.

    python benchmarks/step_time.py                 # d=576, both size ladders, batch 1024, CPU
    python benchmarks/step_time.py --device cuda --d 2304 --sizes 2048,4096,8192,16384

Both trainers run the same engine on the same batches, interleaved step by step (ABAB...) so
machine noise hits both alike; the ratio of medians is reported. Before timing, thresholds are
initialised at the target L0 and the HSAE gets a real forest (a hierarchy update), so the
coupling terms and swaps run at their steady-state size. The hierarchy update itself is timed
separately and amortised over the paper's update interval.

Beside them, in the same interleaved steps on the same batches, the plain dense JumpReLU step of
the same levels (benchmarks/dense_floor.py: what a user would write instead, issue 23's floor to
beat) in fp32 and under bf16 autocast, and HSAE / dense for each (``--no-dense`` leaves it out).

Also reported: tokens/s, latent-tokens/s, achieved GFLOP/s counted as 6 * d * latents per token
(the dense forward+backward work an SAE step stands for) against the measured fp32 matmul rate
of the encoder's shapes, and step time versus dictionary size for single levels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsae_core.model.config import HSAEConfig  # noqa: E402
from hsae_core.model.trainer import Trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dense_floor import build as build_dense_floor  # noqa: E402


def make_trainer(d, sizes, batch, device, independent: bool, target_l0=50.0,
                 autocast_dtype: str | None = None) -> Trainer:
    kw = dict(rho=0.0, swap_rate=0.0) if independent else dict(rho=0.01, swap_rate=0.05)
    cfg = HSAEConfig(d_model=d, level_sizes=sizes, batch_size=batch, total_steps=100_000,
                     target_l0=target_l0, update_interval=0, device=device,
                     autocast_dtype=autocast_dtype, **kw)
    return Trainer(cfg)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def batches(d, batch, n, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d, generator=gen).to(device) for _ in range(n)]


CLOCK = time.perf_counter


def timed_step(trainer, x, device) -> float:
    """One step of a :class:`Trainer` or a :class:`dense_floor.DenseFloor`."""
    step = getattr(trainer, "train_step", None) or trainer.step
    sync(device)
    t0 = CLOCK()
    step(x)
    sync(device)
    return CLOCK() - t0


def matmul_gflops(d, n, batch, device, reps=5) -> float:
    x = torch.randn(batch, d, device=device)
    w = torch.randn(n, d, device=device)
    x @ w.t()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x @ w.t()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * batch * d * n / best / 1e9


LADDERS = ("512,1024,2048,4096", "1024,2048,4096,8192")


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """``--d``, ``--sizes`` (repeatable ladders) and ``--batch``: the shapes of every
    step benchmark (step_time, step_counts, pair_index_ab)."""
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--sizes", action="append", help="comma-separated ladder; repeatable")
    ap.add_argument("--batch", type=int, default=1024)


def ladders(args: argparse.Namespace) -> list[tuple[int, ...]]:
    """The ladders of ``--sizes``, by default both of the embedded default's scale."""
    return [tuple(int(v) for v in x.split(",")) for x in (args.sizes or LADDERS)]


def paper_density_l0(sizes) -> float:
    """The paper's sparsity per latent (L0 50 on a first level of 2048) for this ladder."""
    return 50.0 * sizes[0] / 2048


def compare(d, sizes, batch, steps, warmup, device, target_l0=50.0, dense=True,
            autocast=False):
    data = batches(d, batch, 4, device)
    hsae = make_trainer(d, sizes, batch, device, independent=False, target_l0=target_l0)
    indep = make_trainer(d, sizes, batch, device, independent=True, target_l0=target_l0)
    runners = {"hsae": hsae, "independent": indep}
    if autocast:  # our own levels with sae.autocast_dtype: bfloat16 (the encoder matmul)
        for name, ind in (("hsae", False), ("independent", True)):
            runners[f"{name} bf16"] = make_trainer(d, sizes, batch, device, independent=ind,
                                                   target_l0=target_l0,
                                                   autocast_dtype="bfloat16")
    if dense:  # the floor to beat, fp32 and bf16 autocast (issue 23)
        for prec in ("fp32", "bf16"):
            runners[f"dense {prec}"] = build_dense_floor(d, sizes, batch, device,
                                                         target_l0=target_l0, autocast=prec)
    for t in runners.values():
        timed_step(t, data[0], device)  # threshold init at the target L0
    t0 = time.perf_counter()
    forest = hsae.update_hierarchy()
    update_s = time.perf_counter() - t0
    if autocast:
        runners["hsae bf16"].update_hierarchy()
    for i in range(warmup):
        for t in runners.values():
            timed_step(t, data[i % 4], device)
    times = {name: [] for name in runners}
    for i in range(steps):  # interleaved, the order reversed every other step (ABCD DCBA ...)
        x = data[i % 4]
        for name in (list(runners) if i % 2 == 0 else list(reversed(runners))):
            times[name].append(timed_step(runners[name], x, device))
    mh, mi = statistics.median(times["hsae"]), statistics.median(times["independent"])
    latents = sum(sizes)
    l0 = [round(float(v), 1) for v in hsae.controller.l0_ema]
    assigned = [forest.n_assigned(l) for l in range(forest.n_pairs)]
    print(f"\nlevels {sizes} (d={d}, batch={batch}, {device}, target L0 {target_l0:g}); "
          f"HSAE forest assigned {assigned}, L0 ema {l0}")
    print(f"  independent step  {mi * 1e3:8.1f} ms   {batch / mi:9.0f} tok/s   "
          f"{batch * latents / mi / 1e6:7.1f} M latent-tok/s   "
          f"{6 * d * latents * batch / mi / 1e9:6.1f} GFLOP/s-equiv")
    print(f"  HSAE step         {mh * 1e3:8.1f} ms   {batch / mh:9.0f} tok/s   "
          f"{batch * latents / mh / 1e6:7.1f} M latent-tok/s   "
          f"{6 * d * latents * batch / mh / 1e9:6.1f} GFLOP/s-equiv")
    dense_ms = {p: statistics.median(times[f"dense {p}"]) for p in ("fp32", "bf16")} if dense \
        else {}
    for prec, md in dense_ms.items():
        print(f"  dense floor {prec}  {md * 1e3:8.1f} ms   {batch / md:9.0f} tok/s   "
              f"{batch * latents / md / 1e6:7.1f} M latent-tok/s   "
              f"{6 * d * latents * batch / md / 1e9:6.1f} GFLOP/s-equiv   "
              f"L0 ema {[round(float(v), 1) for v in runners[f'dense {prec}'].l0_ema]}")
    print(f"  ratio HSAE / independent (median of {steps} interleaved steps): {mh / mi:.3f}")
    if autocast:
        hb, ib = (statistics.median(times[f"{n} bf16"]) for n in ("hsae", "independent"))
        print(f"  bf16 autocast (encoder matmul): HSAE {hb * 1e3:.1f} ms ({mh / hb:.2f}x faster "
              f"than fp32), independent {ib * 1e3:.1f} ms ({mi / ib:.2f}x); ratio HSAE / "
              f"independent {hb / ib:.3f}")
    if dense:
        print(f"  ratio HSAE / dense floor: fp32 {mh / dense_ms['fp32']:.3f}, bf16 "
              f"{mh / dense_ms['bf16']:.3f}; independent / dense floor: fp32 "
              f"{mi / dense_ms['fp32']:.3f}, bf16 {mi / dense_ms['bf16']:.3f} "
              f"(below 1: ours faster)")
    print(f"  hierarchy update {update_s * 1e3:.0f} ms, amortised over 5000 steps: "
          f"+{update_s / 5000 / mi * 100:.2f}% -> ratio {(mh + update_s / 5000) / mi:.3f}")
    rate = statistics.mean(matmul_gflops(d, n, batch, device) for n in sizes)
    print(f"  fp32 matmul rate of the encoder shapes: {rate:.0f} GFLOP/s; "
          f"dense-equivalent HSAE work at {6 * d * latents * batch / mh / 1e9 / rate:.2f}x that "
          "rate")
    return mh / mi


def scaling(d, batch, device, steps, sizes=(1024, 2048, 4096, 8192, 16384)):
    data = batches(d, batch, 2, device, seed=1)
    print(f"\nstep time versus dictionary size (one independent level, d={d}, batch={batch}):")
    base = None
    for n in sizes:
        t = make_trainer(d, (n,), batch, device, independent=True)
        t.train_step(data[0])
        for i in range(2):
            t.train_step(data[i % 2])
        ms = statistics.median(timed_step(t, data[i % 2], device) for i in range(steps)) * 1e3
        base = base or ms / n
        print(f"  n={n:6d}  {ms:8.1f} ms/step   {ms / n * 1e3:6.2f} us per latent   "
              f"(x{ms / (base * n):.2f} of linear from n={sizes[0]})")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--l0", default="50",
                    help="target L0: a number, or 'paper' for the paper's L0 per latent (50 on a "
                         "first level of 2048: 12.5 for 512..4096, 25 for 1024..8192)")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--no-dense", action="store_true",
                    help="leave out the plain dense floor (benchmarks/dense_floor.py)")
    ap.add_argument("--autocast", action="store_true",
                    help="also time both trainers with autocast_dtype bfloat16, interleaved")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this process's CPU time (robust on a shared machine with "
                         "--threads 1; tokens/s then count CPU seconds)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{args.clock} clock")
    for sizes in ladders(args):
        l0 = paper_density_l0(sizes) if args.l0 == "paper" else float(args.l0)
        compare(args.d, sizes, args.batch, args.steps, args.warmup, args.device, l0,
                dense=not args.no_dense, autocast=args.autocast)
    if not args.no_scaling:
        scaling(args.d, args.batch, args.device, max(5, args.steps // 4))


if __name__ == "__main__":
    main()
