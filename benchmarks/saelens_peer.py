"""Our JumpReLU training step against SAELens's, same activations, batch and machine.

SAELens is installed only in the benchmark's own environment (the ``bench`` extra):

    python -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0
    .venv-bench/bin/pip install -e ".[bench]"
    .venv-bench/bin/python benchmarks/saelens_peer.py            # d=576, 4096 latents, batch 1024

The peer step is SAELens's own ``SAETrainer._train_step`` (forward, firing statistics,
backward, grad clipping, Adam, schedulers) on a ``JumpReLUTrainingSAE``; ours is
``Trainer.train_step`` on a one-level independent config and on the 4-level HSAE. Steps are
interleaved so machine noise hits all alike; medians are reported, with latent-tokens/s
(tokens/s x total latents) as the common currency.

``--autocast`` times each side in its own bf16 mode instead of fp32: SAELens's
``SAETrainerConfig(autocast=True)`` (its whole training forward under bf16 autocast) against
our ``autocast_dtype="bfloat16"`` (the encoder matmul under bf16 autocast: what
``sae.autocast_dtype: auto`` picks on a CPU with native bf16 or a CUDA GPU).
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


def saelens_trainer(d: int, n: int, batch: int, steps: int, autocast: bool = False):
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d, d_sae=n, l0_coefficient=1.0))
    cfg = SAETrainerConfig(total_training_samples=batch * (steps + 100),
                           train_batch_size_samples=batch,
                           lr=5e-4, lr_end=5e-5, adam_beta1=0.0, adam_beta2=0.995,
                           autocast=autocast)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    return lambda x: trainer._train_step(sae, x)


def ours(d: int, sizes: tuple[int, ...], batch: int, hierarchical: bool,
         autocast: bool = False):
    kw = dict(rho=0.01, swap_rate=0.05) if hierarchical else dict(rho=0.0, swap_rate=0.0)
    trainer = Trainer(HSAEConfig(d_model=d, level_sizes=sizes, batch_size=batch,
                                 total_steps=100_000, update_interval=0,
                                 autocast_dtype="bfloat16" if autocast else None, **kw))
    return trainer


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--autocast", action="store_true",
                    help="each side in its bf16 autocast mode (SAELens's autocast=True, ours "
                         "autocast_dtype=bfloat16) instead of fp32")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import sae_lens

    d, n, batch = args.d, args.n, args.batch
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(batch, d, generator=gen) for _ in range(4)]  # E||x||^2 = d already

    peer = saelens_trainer(d, n, batch, args.steps, args.autocast)
    single = ours(d, (n,), batch, hierarchical=False, autocast=args.autocast)
    ladder = (n // 8, n // 4, n // 2, n)
    hsae = ours(d, ladder, batch, hierarchical=True, autocast=args.autocast)
    single.train_step(data[0])
    hsae.train_step(data[0])
    hsae.update_hierarchy()
    for i in range(3):  # warm-up
        peer(data[i % 4])
        single.train_step(data[i % 4])
        hsae.train_step(data[i % 4])

    times = {"saelens": [], "ours": [], "hsae": []}
    runners = [("saelens", peer), ("ours", single.train_step), ("hsae", hsae.train_step)]
    for i in range(args.steps):
        x = data[i % 4]
        order = runners if i % 2 == 0 else runners[::-1]
        for name, fn in order:
            t0 = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    latents = {"saelens": n, "ours": n, "hsae": sum(ladder)}
    print(f"torch {torch.__version__}, sae-lens {sae_lens.__version__}, "
          f"{torch.get_num_threads()} threads; "
          f"d={d}, batch={batch}, {args.steps} interleaved steps (median), "
          f"{'bf16 autocast on each side' if args.autocast else 'fp32'}")
    print(f"  L0 after the timed steps: ours {single.controller.l0_ema.tolist()}, "
          f"HSAE {[round(v, 1) for v in hsae.controller.l0_ema.tolist()]}")
    for k in ("saelens", "ours", "hsae"):
        tok = batch / med[k]
        print(f"  {k:8s} {str(latents[k]):>6s} latents  {med[k] * 1e3:8.1f} ms/step  "
              f"{tok:8.0f} tok/s  "
              f"{tok * latents[k] / 1e6:7.1f} M latent-tok/s  "
              f"(x{tok * latents[k] / (batch / med['saelens'] * n):.2f} of SAELens)")


if __name__ == "__main__":
    main()
