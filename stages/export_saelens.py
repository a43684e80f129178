"""Stage export-saelens: every level of the HSAE and of the baseline (with its post-hoc forest) as
SAELens-loadable JumpReLU SAE folders, forest JSON beside them -> data/export/ (issue 7).

    python -m stages.export_saelens [--hsae data/hsae] [--baseline data/posthoc]
        [--store data/activations.zarr] [--normalization data/normalization.json]
        [--out data/export]

Writes ``<out>/hsae/level<l>/{cfg.json, sae_weights.safetensors}``, ``<out>/hsae/forest.json``
and the same under ``<out>/baseline/``. The normalisation scale is folded into the weights
(inputs are raw residual-stream activations; hsae_core.interop.saelens). Load a level with
``sae_lens.SAE.load_from_disk("data/export/hsae/level0")``; run SAEBench with
``python -m stages.saebench_eval`` (hsae_core.interop.saebench). ``--out`` also takes an fsspec
URL.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich import print as rprint

from hsae_core.common import fsio
from hsae_core.data.normalize import resolve_scale
from hsae_core.data.store import open_store
from hsae_core.interop.saelens import ExportMetadata, export_saelens
from hsae_core.pipeline.io import load_hsae

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    hsae: str = typer.Option("data/hsae", help="trained HSAE (save_hsae folder)"),
    baseline: str = typer.Option("data/posthoc", help="baseline with its post-hoc forest"),
    store: str = typer.Option("data/activations.zarr",
                              help="store (model, layer, context length)"),
    normalization: Path = typer.Option(Path("data/normalization.json"), help="normalisation JSON"),
    out: str = typer.Option("data/export", help="export folder (path or fsspec URL)"),
) -> None:
    try:
        info = open_store(store)
        meta = ExportMetadata.from_store(info.attrs, resolve_scale(normalization, info))
        models = {"hsae": load_hsae(hsae), "baseline": load_hsae(baseline)}
        for kind, model in models.items():
            if model.cfg.d_model != info.d_model:
                raise ValueError(f"{kind} has d_model {model.cfg.d_model}, "
                                 f"the store {info.d_model}")
    except (ValueError, FileNotFoundError) as err:
        rprint(f"[red]export-saelens: {err}[/red]")
        raise typer.Exit(2) from err
    # written whole under a temporary name, then swapped in: a stale level folder from a run
    # with more levels does not survive, and no file of the old export is rewritten in place
    with fsio.replacing_folder(out) as tmp:
        for kind, model in models.items():
            folders = export_saelens(model, fsio.join(tmp, kind), meta, kind=kind)
            rprint(f"export-saelens: {kind}: {len(folders)} levels "
                   f"{list(model.cfg.level_sizes)} -> {fsio.join(fsio.as_location(out), kind)}")
    rprint(f"export-saelens: model {meta.model_name}, hook {meta.hook_name}, "
           f"scale {meta.activation_scale:.6g} folded in")


if __name__ == "__main__":
    app()
