"""Dead-feature remedies on a store's clean train rows: how many features of each level stop
firing, and what each remedy costs in FVE and L0 (README, "The embedded default").

    python benchmarks/dead_features.py --variant resample [--steps 1000]
        [--sizes 512,1024,2048,4096] [--store data/activations.zarr]
        [--normalization data/normalization.json] [--set key=value ...]

Trains the levels independently (rho = r = 0) with the sae settings of params.yaml's embedded
default, on the store's train rows minus the last 40k (held out), and prints one JSON line per
run: L0, pooled FVE and the dead fraction on the held-out rows, the dead fraction on the train
stream (no firing in the last dead_window_tokens), the fraction of features firing 1-4 times
on the held-out rows, and the live features' median firing count. Variants: ``ghost`` (the
paper's ghost grads only), ``resample`` (sae.resample_interval 50). ``--set`` overrides any
HSAEConfig field, e.g. ``--set l0_ema_momentum=0.999 --set l0_decay_rate=0.001``.
One thread; about 20 CPU-minutes for the four levels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsae_core.data.reader import TrainActivations  # noqa: E402
from hsae_core.model.config import HSAEConfig  # noqa: E402
from hsae_core.model.trainer import Trainer  # noqa: E402

HELD = 40_000
VARIANTS = {"ghost": {}, "resample": {"resample_interval": 50}}


def value(text: str):
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        return float(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=sorted(VARIANTS), default="resample")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--sizes", default="512,1024,2048,4096")
    p.add_argument("--store", default="data/activations.zarr")
    p.add_argument("--normalization", default="data/normalization.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = torch.cat(list(TrainActivations(args.store, args.normalization, batch_size=65_536)))
    held, train = rows[-HELD:], rows[:-HELD]
    sizes = tuple(int(s) for s in args.sizes.split(","))
    fields = dict(d_model=rows.shape[1], level_sizes=sizes, target_l0=12.5, batch_size=1024,
                  total_steps=args.steps, lr=3e-3, dead_window_tokens=200_000, rho=0.0,
                  swap_rate=0.0, update_interval=0, seed=0)
    fields |= VARIANTS[args.variant]
    fields |= {k: value(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = HSAEConfig(**fields)

    def batches():
        gen = torch.Generator().manual_seed(1)
        while True:
            perm = torch.randperm(len(train), generator=gen)
            for i in range(0, len(perm) - cfg.batch_size + 1, cfg.batch_size):
                yield train[perm[i:i + cfg.batch_size]]

    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    model = trainer.fit(batches())
    seconds = time.perf_counter() - t0
    fired = [torch.zeros(n, dtype=torch.int64) for n in sizes]
    l0, sse, sst = [0.0] * len(sizes), [0.0] * len(sizes), 0.0
    with torch.no_grad():
        for i in range(0, HELD, 2048):
            x = held[i:i + 2048]
            sst += float((x - x.mean(0)).pow(2).sum())
            for l, lv in enumerate(model.levels):
                code = lv.encode(x)
                cols = code.pattern.cols[code.active]
                fired[l] += torch.bincount(cols, minlength=lv.n_features)
                l0[l] += float(code.active.sum())
                sse[l] += float((x - lv.decode(code)).pow(2).sum())
    summary = trainer.summary()
    print(json.dumps({
        "variant": args.variant, "set": args.set, "steps": args.steps,
        "train_seconds": round(seconds),
        "l0": [round(v / HELD, 2) for v in l0],
        "fve_pooled": [round(1 - s / sst, 4) for s in sse],
        "dead_held": [round(float((f == 0).double().mean()), 3) for f in fired],
        "dead_train_stream": [round(v, 3) for v in summary["dead_frac_train"]],
        "rare_1_to_4_held": [round(float(((f > 0) & (f < 5)).double().mean()), 3)
                             for f in fired],
        "median_live_fires": [int(np.median(f[f > 0].numpy())) for f in fired],
        "resampled": summary["resampled"]}))


if __name__ == "__main__":
    main()
