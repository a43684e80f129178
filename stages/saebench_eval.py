"""SAEBench on every exported level (hsae_core.interop.saebench). Not a DVC stage: it needs
internet (the model and SAEBench's datasets) and a GPU, and was not run in this project.

    pip install sae-bench
    python -m stages.saebench_eval --export data/export --evals core,sparse_probing \\
        --model-name gemma-2-2b --device cuda --llm-dtype bfloat16 --out eval_results
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import typer
from hsae_core.common.console import rprint

from hsae_core.interop.saebench import EVALS, run_saebench, saebench_selection

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    export: str = typer.Option("data/export", help="output of the export-* stages"),
    evals: str = typer.Option("core,sparse_probing",
                              help=f"comma-separated, from {', '.join(EVALS)}"),
    model_name: str = typer.Option(..., help="TransformerLens name of the model, e.g. gemma-2-2b"),
    kinds: str = typer.Option("hsae,baseline", help="which exported models (add matryoshka "
                                                     "for its prefixes)"),
    device: str = typer.Option("cuda"),
    llm_dtype: str = typer.Option("bfloat16", help="dtype of the LM and the SAEs"),
    llm_batch_size: int = typer.Option(32),
    out: Path = typer.Option(Path("eval_results"), help="SAEBench result folder"),
    api_key_file: Optional[Path] = typer.Option(None, help="OpenAI key file (autointerp only)"),
) -> None:
    try:
        selection = saebench_selection(export, tuple(kinds.split(",")), device,
                                       getattr(torch, llm_dtype))
        key = api_key_file.read_text().strip() if api_key_file else None
        rprint(f"saebench: {len(selection)} SAEs: {', '.join(n for n, _ in selection)}")
        run_saebench(selection, evals.split(","), model_name, device, llm_dtype, llm_batch_size,
                     str(out), key)
    except (ValueError, FileNotFoundError, ImportError) as err:
        rprint(f"[red]saebench-eval: {err}[/red]")
        raise typer.Exit(2) from err


if __name__ == "__main__":
    app()
