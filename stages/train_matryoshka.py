"""Stage train-matryoshka: the third arm (issue 26), a Matryoshka BatchTopK SAE whose nested groups
have the HSAE's level sizes, on the same store, normalisation and tokens -> data/matryoshka/
(``groups/`` and ``prefixes/``, each a save_hsae folder; hsae_core.pipeline.matryoshka_run).

    python -m stages.train_matryoshka [--params params.yaml] [--out data/matryoshka]

Reads ``sae:`` (sizes, tokens, seed, device; BatchTopK keeps ``n_levels * sae.target_l0``
latents per token over the whole dictionary: the HSAE's total L0), ``matryoshka:`` (the arm's own
knobs) and ``train:`` (checkpoints, curves). Never reads ``rho``, ``r`` or ``hierarchy:``, so an
HSAE ablation does not re-run it. Resumes from data/checkpoints/matryoshka.pt; curves logged with
DVCLive to dvclive/matryoshka/.
"""

from __future__ import annotations

from pathlib import Path

import typer

from hsae_core.common.console import rprint
from hsae_core.data.store import open_store
from hsae_core.pipeline.matryoshka_run import (
    MatryoshkaParams,
    matryoshka_config,
    save_matryoshka,
    train_matryoshka_on_store,
)
from hsae_core.pipeline.params import check_device, hsae_config, load_params, section_config
from hsae_core.pipeline.train_run import TrainRunConfig

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"),
                                help="params file (sections sae, matryoshka, train)"),
    store: str = typer.Option("data/activations.zarr",
                              help="activation store (path or fsspec URL)"),
    normalization: Path = typer.Option(Path("data/normalization.json"), help="normalisation JSON"),
    out: str = typer.Option("data/matryoshka", help="folder of the trained arm (path or URL)"),
    checkpoint: str = typer.Option("data/checkpoints/matryoshka.pt",
                                   help="resumable checkpoint (path or URL)"),
    curves: Path = typer.Option(Path("dvclive/matryoshka"),
                                help="DVCLive folder of the training curves"),
) -> None:
    try:
        p = load_params(params)
        run = section_config(p, "train", TrainRunConfig)
        arm = section_config(p, "matryoshka", MatryoshkaParams)
        info = open_store(store)
        sae = hsae_config(p, info.d_model, independent=True)
        cfg = matryoshka_config(sae, arm)
        check_device(cfg.device, "sae.device")
        rprint(f"train-matryoshka: groups {list(cfg.group_sizes)} (prefixes "
               f"{list(cfg.prefix_sizes)}) on d = {cfg.d_model}, BatchTopK k = {cfg.k:g} per "
               f"token over the dictionary, {cfg.total_steps} steps x {cfg.batch_size} tokens, "
               f"lr {cfg.lr:g}")
        trainer = train_matryoshka_on_store(cfg, info, normalization, checkpoint=checkpoint,
                                            curves=curves, run=run)
    except (ValueError, FloatingPointError) as err:
        rprint(f"[red]train-matryoshka: {err}[/red]")
        raise typer.Exit(2) from err
    tokens = trainer.step * cfg.batch_size
    window = min(cfg.dead_window_tokens or tokens, tokens)
    records = save_matryoshka(trainer.model, sae, out, trainer.firing.dead(window)[0], window,
                              trainer.step)
    dead = " ".join(f"{d:.3f}" for d in records["groups"]["dead_frac_train"])
    rprint(f"train-matryoshka: inference threshold {records['groups']['threshold']:.4g}; dead on "
           f"the last {window} train tokens per group [{dead}]; wrote {out}")


if __name__ == "__main__":
    app()
