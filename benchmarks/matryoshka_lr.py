"""The Matryoshka arm's learning rate (issue 26): train it at each given peak lr on the store with
everything else as params.yaml says, and print where each run ends on its own training objective
(the sum over prefixes of the MSE; FVE per prefix, L0 per group, dead latents, all on the last
training batch). The pipeline's ``matryoshka.lr`` is the best of these by that objective: chosen
on the arm's own loss, never on a metric that compares the arms.

    python benchmarks/matryoshka_lr.py --lr 2e-4 --lr 1e-3 --lr 3e-3 \\
        [--store data/activations.zarr] [--normalization data/normalization.json]
        [--params params.yaml] [--steps N]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsae_core.data.reader import TrainActivations  # noqa: E402
from hsae_core.data.store import open_store  # noqa: E402
from hsae_core.model.matryoshka import MatryoshkaTrainer  # noqa: E402
from hsae_core.pipeline.matryoshka_run import MatryoshkaParams, matryoshka_config  # noqa: E402
from hsae_core.pipeline.params import hsae_config, load_params, section_config  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def run(store: str, normalization: Path, params: Path, lr: float, steps: int | None) -> dict:
    """One run at peak ``lr``; its last record (the trainer's) with the run's seconds."""
    p = load_params(params)
    info = open_store(store)
    sae = hsae_config(p, info.d_model, independent=True)
    if steps:
        sae = sae.replace(total_steps=steps)
    arm = section_config(p, "matryoshka", MatryoshkaParams)
    cfg = matryoshka_config(sae, arm).replace(lr=lr)
    reader = TrainActivations(info, normalization, batch_size=cfg.batch_size, seed=cfg.seed,
                              epochs=None, max_tokens=cfg.total_steps * cfg.batch_size,
                              drop_last=True)
    t0 = time.perf_counter()
    trainer = MatryoshkaTrainer(cfg, log_every=cfg.total_steps)
    last: dict = {}
    trainer.on_log = lambda step, rec: last.update(rec)
    trainer.fit(reader)
    objective = sum(last[f"prefix{g}/mse"] for g in range(cfg.n_groups))
    return {**last, "lr": lr, "steps": cfg.total_steps, "objective": objective,
            "seconds": round(time.perf_counter() - t0, 1)}


@app.command()
def main(lr: list[float] = typer.Option(..., help="peak learning rates to try"),
         store: str = typer.Option("data/activations.zarr"),
         normalization: Path = typer.Option(Path("data/normalization.json")),
         params: Path = typer.Option(Path("params.yaml")),
         steps: int = typer.Option(0, help="steps per run (0: sae.total_steps)")) -> None:
    rows = [run(store, normalization, params, value, steps or None) for value in lr]
    n = sum(1 for k in rows[0] if k.startswith("prefix") and k.endswith("/fve"))
    print("| lr | sum of prefix MSE | FVE per prefix | L0 per group | dead | s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fve = " / ".join(f"{r[f'prefix{g}/fve']:.3f}" for g in range(n))
        l0 = " / ".join(f"{r[f'group{g}/l0']:.1f}" for g in range(n))
        print(f"| {r['lr']:g} | {r['objective']:.4g} | {fve} | {l0} | {r['dead']} | "
              f"{r['seconds']} |")
    best = min(rows, key=lambda r: r["objective"])
    print(f"best by the arm's objective: lr {best['lr']:g}")
    print(json.dumps(rows))


if __name__ == "__main__":
    app()
