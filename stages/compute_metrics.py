"""Stage compute-metrics: the HSAE, the post-hoc baseline and the Matryoshka arm (issue 26) on the
eval split (§4.2, App. D) -> metrics/metrics.json (every metric), metrics/headline.json (the
paper's headline numbers; both read by ``dvc metrics show/diff``) and metrics/table.md (printed
at the end). Layout and names: hsae_core.evaluation.compute.

    python -m stages.compute_metrics [--params params.yaml] [--hsae data/hsae]
        [--posthoc data/posthoc] [--matryoshka data/matryoshka_forest
        --matryoshka-prefixes data/matryoshka/prefixes] [--out metrics/metrics.json]
        [--headline metrics/headline.json]

Without ``--matryoshka`` only the HSAE and the baseline are evaluated (as before issue 26).

Reads ``metrics:``. Streams the eval split (one batch in memory); the spliced next-token loss
reloads the store's language model whole (hsae_core.evaluation.splice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from hsae_core.common.console import rprint

from hsae_core.common import fsio
from hsae_core.data.normalize import resolve_scale
from hsae_core.data.store import open_store
from hsae_core.evaluation.compute import (
    MetricsConfig,
    compute_metrics,
    format_table,
    headline,
    json_safe,
)
from hsae_core.pipeline.io import load_for_store, load_training
from hsae_core.pipeline.params import load_params, section_config

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file (section metrics)"),
    hsae: Path = typer.Option(Path("data/hsae"), help="trained HSAE"),
    posthoc: Path = typer.Option(Path("data/posthoc"), help="baseline with its post-hoc forest"),
    matryoshka: Optional[Path] = typer.Option(None, help="the Matryoshka's groups with their "
                                                         "post-hoc forest (optional)"),
    matryoshka_prefixes: Optional[Path] = typer.Option(None, help="the Matryoshka's prefixes "
                                                                  "(with --matryoshka)"),
    store: str = typer.Option("data/activations.zarr",
                              help="activation store (eval split) (path or fsspec URL)"),
    normalization: Path = typer.Option(Path("data/normalization.json"), help="normalisation JSON"),
    out: Path = typer.Option(Path("metrics/metrics.json"), help="metrics JSON"),
    headline_out: Optional[Path] = typer.Option(None, "--headline",
                                                help="the headline numbers' JSON (default: "
                                                     "headline.json beside --out)"),
    table: Optional[Path] = typer.Option(None, help="human-readable table (default: table.md "
                                                    "beside --out)"),
) -> None:
    headline_out = headline_out or out.with_name("headline.json")
    table = table or out.with_name("table.md")
    try:
        cfg = section_config(load_params(params), "metrics", MetricsConfig)
        info = open_store(store)
        scale = resolve_scale(normalization, info)
        folders = {"hsae": hsae, "posthoc": posthoc}
        prefixes = {}
        if matryoshka is not None:
            if matryoshka_prefixes is None:
                raise ValueError("--matryoshka needs --matryoshka-prefixes (the prefixes "
                                 "folder train-matryoshka wrote: data/matryoshka/prefixes)")
            folders["matryoshka"] = matryoshka
            prefixes = load_for_store({"matryoshka": matryoshka_prefixes}, info.d_model, store,
                                      cfg.device)
        models = load_for_store(folders, info.d_model, store, cfg.device)
        if prefixes and (prefixes["matryoshka"].n_levels != models["matryoshka"].n_levels):
            raise ValueError(f"{matryoshka_prefixes} has {prefixes['matryoshka'].n_levels} "
                             f"prefixes, {matryoshka} {models['matryoshka'].n_levels} groups: "
                             "both must come from one train-matryoshka run")
        training = {name: load_training(folder) for name, folder in folders.items()}
        metrics = compute_metrics(models, info, scale, cfg, training, prefixes)
    except (ValueError, FileNotFoundError) as err:
        rprint(f"[red]compute-metrics: {err}[/red]")
        raise typer.Exit(2) from err
    fsio.write_json(out, json_safe(metrics))  # atomic: a new file renamed; the order is kept
    fsio.write_json(headline_out, json_safe(headline(metrics)))
    text = format_table(metrics)
    fsio.write_text(table, text + "\n")
    print(text)
    print(f"compute-metrics: wrote {out}, {headline_out} and {table}")


if __name__ == "__main__":
    app()
