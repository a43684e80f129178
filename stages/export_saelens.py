"""Stages export-hsae, export-baseline and export-matryoshka: every level of one model (the HSAE,
the baseline with its post-hoc forest, the Matryoshka's nested prefixes) as SAELens-loadable
JumpReLU SAE folders, forest JSON beside them -> data/export/<kind>/ (issues 7, 26). One stage
per model, so an ablation of the HSAE leaves the other exports alone.

    python -m stages.export_saelens --kind hsae --model data/hsae --out data/export/hsae
    python -m stages.export_saelens --kind baseline --model data/posthoc \
        --out data/export/baseline   [--store ...] [--normalization ...]
    python -m stages.export_saelens --kind matryoshka --model data/matryoshka/prefixes \
        --out data/export/matryoshka

Writes ``<out>/level<l>/{cfg.json, sae_weights.safetensors}``, ``<out>/forest.json`` and
``<out>/export.json``; the Matryoshka ``<out>/prefix<g>/`` (the reconstruction from its first
g+1 groups) and no forest.json (export.json: ``"forest": null``). The normalisation scale is
folded into the weights (inputs are raw residual-stream activations; hsae_core.interop.saelens).
Load a level with ``sae_lens.SAE.load_from_disk("data/export/hsae/level0")``; run SAEBench with
``python -m stages.saebench_eval`` (hsae_core.interop.saebench). ``--out`` also takes an fsspec
URL.
"""

from __future__ import annotations

from pathlib import Path

import typer
from hsae_core.common.console import rprint

from hsae_core.common import fsio
from hsae_core.data.normalize import resolve_scale
from hsae_core.data.store import open_store
from hsae_core.interop.saelens import KINDS, ExportMetadata, check_prefixes, export_saelens
from hsae_core.pipeline.io import load_hsae, load_training

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    kind: str = typer.Option("hsae", help="hsae, baseline or matryoshka (recorded in the "
                                          "metadata)"),
    model: str = typer.Option("data/hsae", help="the model: a save_hsae folder (the baseline: "
                                                "data/posthoc, which holds its forest; the "
                                                "matryoshka: data/matryoshka/prefixes)"),
    store: str = typer.Option("data/activations.zarr",
                              help="store (model, layer, context length)"),
    normalization: Path = typer.Option(Path("data/normalization.json"), help="normalisation JSON"),
    out: str = typer.Option("data/export/hsae", help="export folder (path or fsspec URL)"),
) -> None:
    try:
        if kind not in KINDS:
            raise ValueError(f"--kind {kind!r}: expected one of {KINDS}")
        info = open_store(store)
        meta = ExportMetadata.from_store(info.attrs, resolve_scale(normalization, info))
        sae = load_hsae(model)
        if sae.cfg.d_model != info.d_model:
            raise ValueError(f"{kind} has d_model {sae.cfg.d_model}, the store {info.d_model}")
        if kind == "matryoshka":
            check_prefixes(sae)
        training = load_training(model)
    except (ValueError, FileNotFoundError) as err:
        rprint(f"[red]export-{kind}: {err}[/red]")
        raise typer.Exit(2) from err
    # written whole under a temporary name, then swapped in: a stale level folder from a run
    # with more levels does not survive, and no file of the old export is rewritten in place
    with fsio.replacing_folder(out) as tmp:
        folders = export_saelens(sae, tmp, meta, kind=kind, training=training)
    what = "prefixes" if kind == "matryoshka" else "levels"
    rprint(f"export-{kind}: {len(folders)} {what} {list(sae.cfg.level_sizes)} -> {out}; model "
           f"{meta.model_name}, hook {meta.hook_name}, scale {meta.activation_scale:.6g} "
           "folded in")


if __name__ == "__main__":
    app()
