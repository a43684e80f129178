"""Stage extract-activations: LM residual stream over a corpus -> sharded Zarr store (issue 3).

    python -m stages.extract_activations --params params.yaml [--out data/activations.zarr]

Reads the ``extract:`` section of params.yaml (fields:
:class:`hsae_core.data.config.ExtractConfig`); options given on the command line override it. An
interrupted run resumes when rerun.

Distributed over N processes (each runs the model on its share of the windows; the store equals
a 1-process one)::

    torchrun --nproc_per_node N -m stages.extract_activations --params params.yaml

``--out`` also takes an fsspec URL (``s3://bucket/acts.zarr``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from hsae_core.common.console import rprint

from hsae_core.common.distributed import init_from_env, shutdown
from hsae_core.data.config import ExtractConfig, read_params_section
from hsae_core.data.extract import extract_activations

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    params: Optional[Path] = typer.Option(None,
                                          help="params.yaml whose `extract:` section is read"),
    out: str = typer.Option("data/activations.zarr", help="store to write (path or fsspec URL)"),
    model: Optional[str] = typer.Option(None,
                                        help="hub name, folder, .gguf file or embedded:smollm2"),
    layer: Optional[int] = typer.Option(None, help="residual stream after this block (0-based)"),
    corpus: Optional[str] = typer.Option(None,
                                         help="embedded:wiki, a file/folder, or an HF dataset"),
    text_column: Optional[str] = typer.Option(None),
    context_len: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    max_tokens: Optional[int] = typer.Option(None),
    dtype: Optional[str] = typer.Option(None, help="float32, float16 or bfloat16"),
    device: Optional[str] = typer.Option(None),
    overwrite: bool = typer.Option(False,
                                   help="replace an existing store once the new one is complete"),
) -> None:
    overrides = {"model": model, "layer": layer, "corpus": corpus, "text_column": text_column,
                 "context_len": context_len, "batch_size": batch_size, "max_tokens": max_tokens,
                 "dtype": dtype, "device": device}
    try:
        cfg = ExtractConfig.from_dict(read_params_section(params, "extract")
                                      | {k: v for k, v in overrides.items() if v is not None})
        dist = init_from_env(cfg.device)
        store = extract_activations(cfg, out, overwrite=overwrite, dist=dist)
    except ValueError as err:
        # config, model, corpus and store errors name the problem and the fix
        rprint(f"[red]extract-activations: {err}[/red]")
        raise typer.Exit(2) from err
    shutdown(dist)
    if not dist.is_main:
        return
    rprint(f"wrote {store.path}: {store.attrs['n_tokens']} tokens of {cfg.model} "
           f"layer {cfg.layer}, d={store.d_model}, {cfg.dtype}")


if __name__ == "__main__":
    app()
