"""Stage collect-evidence: per feature of every level, the top and activation-sampled contexts
of the eval split (Appendix C; format in hsae_core.evaluation.evidence) for the HSAE and the
independent baseline -> data/evidence/hsae/ and data/evidence/baseline/.

    python -m stages.collect_evidence [--params params.yaml] [--hsae data/hsae]
        [--baseline data/baseline] [--out data/evidence]

Reads ``evidence:``. Token strings come from the store's model tokenizer (vocab.json).
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich import print as rprint

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
    hsae: Path = typer.Option(Path("data/hsae"), help="trained HSAE"),
    baseline: Path = typer.Option(Path("data/baseline"),
                                  help="independent SAEs (forest: data/posthoc)"),
    store: Path = typer.Option(Path("data/activations.zarr"),
                               help="activation store (eval split)"),
    normalization: Path = typer.Option(Path("data/normalization.json"), help="normalisation JSON"),
    out: Path = typer.Option(Path("data/evidence"),
                             help="output folder (one subfolder per model)"),
) -> None:
    try:
        cfg = section_config(load_params(params), "evidence", EvidenceConfig)
        info = open_store(store)
        scale = resolve_scale(normalization, info)
        folders = {"hsae": hsae, "baseline": baseline}
        models = load_for_store(folders, info.d_model, store, cfg.device)
        vocab = decode_vocab(load_tokenizer(info.attrs["model"]))
    except (ValueError, FileNotFoundError, OSError) as err:
        rprint(f"[red]collect-evidence: {err}[/red]")
        raise typer.Exit(2) from err

    def batches():
        return EvalActivations(info, scale, batch_size=cfg.batch_size, max_tokens=cfg.eval_tokens)

    for name, model in models.items():
        t0 = time.perf_counter()
        levels = collect_evidence(model, batches, cfg)
        meta = {"source": name, "model_dir": str(folders[name]), "store": str(store),
                "lm": info.attrs["model"], "layer": info.attrs["layer"],
                "eval_tokens": min(info.n_rows("eval"), cfg.eval_tokens or 10**18)}
        save_evidence(levels, out / name, vocab=vocab, meta=meta, cfg=cfg)
        with_ex = [int((ev.rows[:, 0] >= 0).sum()) for ev in levels]
        print(f"collect-evidence: {name}: {meta['eval_tokens']} eval tokens, features with "
              f"examples per level {with_ex} of {[ev.n_features for ev in levels]} "
              f"({time.perf_counter() - t0:.1f} s) -> {out / name}")


if __name__ == "__main__":
    app()
