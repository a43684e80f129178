"""Stages evidence-hsae and evidence-baseline: per feature of every level of one model, the
top and activation-sampled contexts of the eval split (Appendix C; format in
hsae_core.evaluation.evidence) -> data/evidence/<name>/. One stage per model, so an ablation
of the HSAE leaves the baseline's evidence alone.

    python -m stages.collect_evidence --name hsae --model data/hsae --out data/evidence/hsae
    python -m stages.collect_evidence --name baseline --model data/baseline \
        --out data/evidence/baseline   [--params params.yaml] [--store ...]

Reads ``evidence:``. Token strings come from the store's model tokenizer (vocab.json).
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from hsae_core.common.console import rprint

from hsae_core.data.normalize import resolve_scale
from hsae_core.data.reader import EvalActivations
from hsae_core.data.store import open_store
from hsae_core.evaluation.evidence import (
    EvidenceConfig,
    collect_evidence,
    decode_vocab,
    save_evidence,
)
from hsae_core.pipeline.io import load_for_store
from hsae_core.pipeline.params import load_params, section_config

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    from hsae_core.data.lm import _kwargs, resolve_model

    src = resolve_model(model)
    return AutoTokenizer.from_pretrained(src.name_or_path, **_kwargs(src))


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file (section evidence)"),
    name: str = typer.Option("hsae", help="hsae or baseline (recorded in the evidence)"),
    model: Path = typer.Option(Path("data/hsae"),
                               help="the model (the baseline: data/baseline; its forest is in "
                                    "data/posthoc)"),
    store: Path = typer.Option(Path("data/activations.zarr"),
                               help="activation store (eval split)"),
    normalization: Path = typer.Option(Path("data/normalization.json"), help="normalisation JSON"),
    out: Path = typer.Option(Path("data/evidence/hsae"), help="output folder"),
) -> None:
    try:
        cfg = section_config(load_params(params), "evidence", EvidenceConfig)
        info = open_store(store)
        scale = resolve_scale(normalization, info)
        sae = load_for_store({name: model}, info.d_model, store, cfg.device)[name]
        vocab = decode_vocab(load_tokenizer(info.attrs["model"]))
    except (ValueError, FileNotFoundError, OSError) as err:
        rprint(f"[red]evidence-{name}: {err}[/red]")
        raise typer.Exit(2) from err

    def batches():
        return EvalActivations(info, scale, batch_size=cfg.batch_size, max_tokens=cfg.eval_tokens)

    t0 = time.perf_counter()
    levels = collect_evidence(sae, batches, cfg)
    meta = {"source": name, "model_dir": str(model), "store": str(store),
            "lm": info.attrs["model"], "layer": info.attrs["layer"],
            "eval_tokens": min(info.n_rows("eval"), cfg.eval_tokens or 10**18)}
    save_evidence(levels, out, vocab=vocab, meta=meta, cfg=cfg)
    with_ex = [int((ev.rows[:, 0] >= 0).sum()) for ev in levels]
    print(f"evidence-{name}: {meta['eval_tokens']} eval tokens, features with examples per "
          f"level {with_ex} of {[ev.n_features for ev in levels]} "
          f"({time.perf_counter() - t0:.1f} s) -> {out}")


if __name__ == "__main__":
    app()
