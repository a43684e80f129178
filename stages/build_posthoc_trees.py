"""Stage build-posthoc-trees: the baseline's forest, assigned once after training (METHOD §4)
-> data/posthoc/ (the baseline's weights with the forest).

    python -m stages.build_posthoc_trees [--params params.yaml] [--baseline data/baseline]
        [--out data/posthoc]

Reads ``hierarchy.similarity``, ``hierarchy.exclude_quantile``, ``hierarchy.tree`` (the same
assignment the HSAE uses), ``hierarchy.update_interval`` x ``sae.batch_size`` (the train tokens
on which a feature must fire to take part, as in the HSAE's updates) and, for co-activation
similarity, ``hierarchy.coactivation_*`` and ``posthoc.coactivation_tokens``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from hsae_core.common.console import rprint

from hsae_core.data.reader import TrainActivations
from hsae_core.model.posthoc import (
    PosthocConfig,
    coactivation_stats,
    live_features,
    posthoc_forest,
)
from hsae_core.pipeline.io import load_hsae, load_training, save_hsae
from hsae_core.pipeline.params import hsae_config, load_params, section_config

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file (hierarchy, posthoc)"),
    baseline: Path = typer.Option(Path("data/baseline"), help="trained independent SAEs"),
    store: str = typer.Option("data/activations.zarr", help="store (path or fsspec URL)"),
    normalization: Path = typer.Option(Path("data/normalization.json"), help="normalisation"),
    out: Path = typer.Option(Path("data/posthoc"), help="the baseline with its forest"),
) -> None:
    try:
        p = load_params(params)
        post = section_config(p, "posthoc", PosthocConfig)
        model = load_hsae(baseline)
        hier = hsae_config(p, model.cfg.d_model)  # validates hierarchy: against the sae: section

        def train_tokens(n: int, seed: int) -> TrainActivations:
            return TrainActivations(store, normalization, batch_size=model.cfg.batch_size,
                                    seed=seed, epochs=None, max_tokens=n)

        window = max(1, hier.update_interval) * hier.batch_size
        live = live_features(model, train_tokens(window, model.cfg.seed + 1))
        coact = None
        if hier.similarity == "coactivation":
            stream = train_tokens(post.coactivation_tokens, model.cfg.seed)
            coact = coactivation_stats(model, stream, hier.coactivation_momentum,
                                       hier.coactivation_tokens)
        model.forest = posthoc_forest(model, hier.similarity, hier.exclude_quantile, hier.tree,
                                      coact, live)
    except (ValueError, FileNotFoundError) as err:
        rprint(f"[red]build-posthoc-trees: {err}[/red]")
        raise typer.Exit(2) from err
    save_hsae(model, out, training=load_training(baseline))
    counts = ", ".join(f"{model.forest.n_assigned(l)}/{n}"
                       for l, n in enumerate(model.cfg.level_sizes[1:]))
    dead = ", ".join(f"{int((~m).sum())}" for m in live)
    rprint(f"build-posthoc-trees: {hier.similarity} similarity, {hier.tree} tree; features silent "
           f"on {window} train tokens (left out) per level {dead}; children assigned per level "
           f"pair {counts}; wrote {out}")


if __name__ == "__main__":
    app()
