"""Stage train-baselines: independent JumpReLU SAEs of the same sizes and L0 target (rho = r = 0,
no hierarchy updates; METHOD §4) -> data/baseline/.

    python -m stages.train_baselines [--params params.yaml] [--out data/baseline]

Reads only ``sae:`` and ``train:``, so changing ``rho``, ``r`` or a ``hierarchy:`` key never
re-runs it. Resumes from data/checkpoints/baseline.pt; curves logged with DVCLive to
dvclive/baseline/.
"""

from __future__ import annotations

from pathlib import Path

import typer

from stages.train_hsae import train_stage

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file (sections sae, train)"),
    store: str = typer.Option("data/activations.zarr",
                              help="activation store (path or fsspec URL)"),
    normalization: Path = typer.Option(Path("data/normalization.json"), help="normalisation JSON"),
    out: str = typer.Option("data/baseline",
                            help="folder of the trained independent SAEs (path or URL)"),
    checkpoint: str = typer.Option("data/checkpoints/baseline.pt",
                                   help="resumable checkpoint (path or URL)"),
    curves: Path = typer.Option(Path("dvclive/baseline"),
                                help="DVCLive folder of the per-level curves"),
) -> None:
    train_stage("train-baselines", "baseline", params, store, normalization, out, checkpoint,
                curves)


if __name__ == "__main__":
    app()
