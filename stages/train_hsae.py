"""Stage train-hsae: the HSAE (§3) on the normalised train split -> data/hsae/ (save_hsae folder).

    python -m stages.train_hsae [--params params.yaml] [--store data/activations.zarr]
        [--normalization data/normalization.json] [--out data/hsae]

Reads ``sae:`` + ``hierarchy:`` + ``rho`` + ``r`` (HSAEConfig fields, d_model from the store)
and ``train:`` (checkpoints, curves). A killed run resumes from data/checkpoints/hsae.pt when
rerun; the curves per level are logged with DVCLive to dvclive/hsae/ (``dvc exp show`` while it
trains, ``dvc plots show``; layout in hsae_core.pipeline.train_run).

Data-parallel on N processes (Gloo on CPU, NCCL on CUDA; rank 0 writes every output)::

    torchrun --nproc_per_node N -m stages.train_hsae --params params.yaml

``--store``, ``--checkpoint`` and ``--out`` also take fsspec URLs (``s3://...``).
"""

from __future__ import annotations

from pathlib import Path

import typer
from hsae_core.common.console import rprint

from hsae_core.common.distributed import init_from_env, shutdown
from hsae_core.data.store import open_store
from hsae_core.pipeline.io import save_hsae
from hsae_core.pipeline.params import hsae_config, load_params, section_config
from hsae_core.pipeline.train_run import TrainRunConfig, train_on_store

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def train_stage(stage: str, name: str, params: Path, store: str, normalization: Path,
                out: str, checkpoint: str, curves: Path) -> None:
    """Shared body of train-hsae and train-baselines: validate, train (resuming), save.
    Under torchrun every rank trains its slice of each batch and rank 0 writes the outputs."""
    try:
        p = load_params(params)
        run = section_config(p, "train", TrainRunConfig)
        info = open_store(store)
        cfg = hsae_config(p, info.d_model, independent=name == "baseline")
        dist = init_from_env(cfg.device)
        if dist.is_main:
            ranks = f" on {dist.world_size} ranks ({dist.device})" if dist.active else ""
            rprint(f"{stage}: levels {list(cfg.level_sizes)} on d = {cfg.d_model}, "
                   f"target L0 {cfg.target_l0}, {cfg.total_steps} steps x {cfg.batch_size} "
                   f"tokens, rho {cfg.rho}, r {cfg.swap_rate}{ranks}")
        ended: dict = {}
        model = train_on_store(cfg, info, normalization, checkpoint=checkpoint, curves=curves,
                               run=run, name=name, dist=dist,
                               on_finish=lambda t: ended.update(t.summary()))
    except (ValueError, FloatingPointError) as err:
        # config, store (missing shards, NaN rows), device and normalisation errors and a
        # diverged run name the key or rows and the fix
        rprint(f"[red]{stage}: {err}[/red]")
        raise typer.Exit(2) from err
    if dist.is_main:
        save_hsae(model, out, training=ended)
        dead = " ".join(f"{d:.3f}" for d in ended["dead_frac_train"])
        rprint(f"{stage}: dead on the last {ended['dead_window_tokens']} train tokens per level "
               f"[{dead}]; wrote {out}")
    shutdown(dist)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"),
                                help="params file (rho, r, sections sae, hierarchy, train)"),
    store: str = typer.Option("data/activations.zarr",
                              help="activation store (path or fsspec URL)"),
    normalization: Path = typer.Option(Path("data/normalization.json"), help="normalisation JSON"),
    out: str = typer.Option("data/hsae", help="folder of the trained HSAE (path or fsspec URL)"),
    checkpoint: str = typer.Option("data/checkpoints/hsae.pt",
                                   help="resumable checkpoint (path or URL)"),
    curves: Path = typer.Option(Path("dvclive/hsae"),
                                help="DVCLive folder of the per-level training curves"),
) -> None:
    train_stage("train-hsae", "hsae", params, store, normalization, out, checkpoint, curves)


if __name__ == "__main__":
    app()
