"""Does every level end on its target L0? The sparsity controller measured (issue 21).

Trains the HSAE and the independent levels (the baseline) and reports, per level, the batch L0
averaged over the last 10% of the steps (and, on a store, the L0 on the eval split) against the
target, with lambda's maximum over the last third of the steps. Sources:

    python benchmarks/l0_control.py store --steps 500 1000 4000     # params.yaml on data/
    python benchmarks/l0_control.py small --steps 600               # the GPU check's toy sizes
    python benchmarks/l0_control.py paper --steps 200               # the paper's sizes
    python benchmarks/l0_control.py natural small                   # the stream's natural L0

``store`` reads the embedded default's ``sae:`` / ``hierarchy:`` sections and trains on
``data/activations.zarr`` (``dvc repro normalize`` first); ``small`` and ``paper`` train on the
synthetic stream of benchmarks/streams.py with the GPU check's short-run recipe.
``--variant before`` is the controller before issue 21 (no threshold learning-rate floor, no
bounds on lambda, integration whatever the learning rate); ``after`` the current defaults;
``--set key=value`` overrides any HSAEConfig field. ``natural`` measures a synthetic stream's
natural L0 two ways: distinct true features per token, and the L0 an unpenalised run (lambda
~0) reaches. Results are appended as JSON lines to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from hsae_core.model.config import HSAEConfig  # noqa: E402
from hsae_core.model.trainer import Trainer  # noqa: E402
from streams import PAPER, SMALL, stream  # noqa: E402

#: The controller before issue 21 (params.yaml and the library's defaults then): every parameter
#: on the cosine schedule, lambda unbounded, a 100-step desired decay, steps of exp(+-0.02).
BEFORE = dict(threshold_lr_scale=1.0, threshold_lr_floor=0.0, lambda_min=0.0, lambda_max=1e30,
              lambda_rate=0.02, l0_decay_rate=0.01)
#: The GPU check's short-run recipe on the synthetic streams (gpu_check.train).
SYNTHETIC_RECIPE = dict(lr=3e-3)
#: An unpenalised run: lambda starts and stays near zero.
UNPENALISED = dict(lambda_init=1e-9, lambda_min=0.0, lambda_rate=1e-12)


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = json.loads(value) if value not in ("inf", "true", "false") else (
            math.inf if value == "inf" else value == "true")
    return out


class Recorder:
    """Per-step batch L0 and lambda, read where the controller consumes them."""

    def __init__(self, trainer: Trainer):
        self.l0: list[list[float]] = []
        self.lam: list[list[float]] = []
        ctl, update = trainer.controller, trainer.controller.update

        def recorded(l0_batch):
            update(l0_batch)
            self.l0.append(l0_batch.detach().float().cpu().tolist())
            self.lam.append(ctl.lambdas.cpu().tolist())

        ctl.update = recorded
        self.fve: list[list[float]] = []
        trainer.log_every = max(1, trainer.cfg.total_steps // 100)
        trainer.on_log = lambda step, rec: self.fve.append(
            [rec[f"level{l}/fve"] for l in range(trainer.cfg.n_levels)])

    def summary(self, target: float) -> dict:
        n = len(self.l0)
        tail = self.l0[n - max(1, n // 10):]
        third = self.lam[n - max(1, n // 3):]
        levels = range(len(self.l0[0]))
        l0_tail = [sum(r[l] for r in tail) / len(tail) for l in levels]
        fve = self.fve[len(self.fve) - max(1, len(self.fve) // 10):]
        return {"l0_tail": [round(v, 3) for v in l0_tail],
                "fve_tail": [round(sum(r[l] for r in fve) / len(fve), 4) for l in levels],
                "l0_tail_rel": [round(v / target - 1, 4) for v in l0_tail],
                "lambda_max_last_third": [round(max(r[l] for r in third), 4) for l in levels],
                "lambda_end": [round(v, 4) for v in self.lam[-1]],
                "lambda_max_ratio_last_third": [
                    round(max(r[l] for r in third) / max(third[0][l], 1e-30), 3)
                    for l in levels]}


def store_setup(steps: int, overrides: dict, independent: bool):
    from hsae_core.data.reader import TrainActivations
    from hsae_core.data.store import open_store
    from hsae_core.pipeline.params import hsae_config, load_params

    info = open_store(ROOT / "data" / "activations.zarr")
    cfg = hsae_config(load_params(ROOT / "params.yaml"), info.d_model, independent=independent)
    cfg = cfg.replace(total_steps=steps, **overrides)
    reader = TrainActivations(info, ROOT / "data" / "normalization.json",
                              batch_size=cfg.batch_size, seed=cfg.seed, epochs=None,
                              max_tokens=steps * cfg.batch_size, drop_last=True)
    return cfg, reader, info


@torch.no_grad()
def eval_l0(model, info) -> list[float]:
    from hsae_core.data.reader import EvalActivations

    total, n = torch.zeros(model.n_levels, dtype=torch.float64), 0
    for batch in EvalActivations(info, ROOT / "data" / "normalization.json", batch_size=4096):
        x = batch.activations
        for l, lv in enumerate(model.levels):
            total[l] += float(lv.encode(x).active.sum())
        n += x.shape[0]
    return (total / n).tolist()


def synthetic_setup(sz: dict, steps: int, overrides: dict, independent: bool, paths=None):
    coupling = dict(rho=0.0, swap_rate=0.0) if independent else {}
    interval = -(-steps // 4)
    cfg = HSAEConfig(d_model=sz["d"], level_sizes=sz["sizes"], batch_size=sz["batch"],
                     target_l0=sz["l0"], total_steps=steps, update_interval=interval,
                     resample_interval=max(1, steps // 20),
                     **{**SYNTHETIC_RECIPE, **coupling, **overrides})
    return cfg, stream(sz, "cpu", seed=3, paths=paths)


def run(source: str, steps: int, variant: str, model: str, extra: dict, paths=None) -> dict:
    overrides = {**(BEFORE if variant == "before" else {}), **extra}
    independent = model == "baseline"
    info = None
    if source == "store":
        cfg, data, info = store_setup(steps, overrides, independent)
    else:
        cfg, data = synthetic_setup(SMALL if source == "small" else PAPER, steps, overrides,
                                    independent, paths)
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    rec = Recorder(trainer)
    t0 = time.perf_counter()
    trainer.fit(data)
    out = {"source": source, "steps": steps, "variant": variant, "model": model,
           "set": {k: (str(v) if isinstance(v, float) and math.isinf(v) else v)
                   for k, v in extra.items()},
           "target": cfg.target_l0, "seconds": round(time.perf_counter() - t0, 1),
           **rec.summary(cfg.target_l0),
           "unreachable": trainer.controller.unreachable.tolist()}
    if paths is not None:
        out["paths"] = paths
    if info is not None:
        ev = eval_l0(trainer.model, info)
        out["l0_eval"] = [round(v, 3) for v in ev]
        out["l0_eval_rel"] = [round(v / cfg.target_l0 - 1, 4) for v in ev]
    return out


def natural(source: str, steps: int, paths=None) -> dict:
    sz = SMALL if source == "small" else PAPER
    s = stream(sz, "cpu", seed=3, paths=paths)
    row = run(source, steps, "after", "baseline", UNPENALISED, paths)
    return {"source": source, "natural": True, "target": sz["l0"], "paths": s.paths,
            "true_features_per_token": round(s.true_l0(), 2),
            "unpenalised_l0_tail": row["l0_tail"], "steps": steps, "seconds": row["seconds"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", choices=("store", "small", "paper", "natural"))
    ap.add_argument("what", nargs="?", choices=("small", "paper"),
                    help="natural: which synthetic stream")
    ap.add_argument("--steps", type=int, nargs="+", default=[1000])
    ap.add_argument("--variant", nargs="+", default=["before", "after"],
                    choices=("before", "after"))
    ap.add_argument("--models", nargs="+", default=["hsae", "baseline"],
                    choices=("hsae", "baseline"))
    ap.add_argument("--paths", type=int, default=None,
                    help="synthetic streams: leaves per token (default: the target L0)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=Path("/tmp/l0_control.jsonl"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    if args.source == "natural":
        rows.append(natural(args.what or "small", args.steps[0], args.paths))
    else:
        for steps in args.steps:
            for variant in args.variant:
                for model in args.models:
                    rows.append(run(args.source, steps, variant, model, parse_set(args.set),
                                    args.paths))
                    print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    if args.source == "natural":
        print(json.dumps(rows[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
