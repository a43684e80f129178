"""How much of a post-hoc forest's quality is the linking rule's (issue 26)? For trained models
without a forest (the independent baseline, the Matryoshka's groups), build the post-hoc forest
with each similarity the library has (encoder, decoder, co-activation; otherwise exactly
build-posthoc-trees: the same live-feature window, exclusion quantile, tree and co-activation
stream) and score each on the eval split: the mean over level pairs of the paper's Hamming,
macro and pooled P(parent|child), pooled P(child|parent), and the rate at which the linked
parents fire on any token (the chance level of P(parent|child) for links drawn at random among
those parents). No intervals: a diagnostic of the rule, not a result of the method.

    python benchmarks/forest_linking.py --model baseline=data/baseline \\
        --model matryoshka=data/matryoshka/groups [--params params.yaml]
        [--store data/activations.zarr] [--normalization data/normalization.json]
        [--eval-tokens N]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsae_core.data.reader import EvalActivations, TrainActivations  # noqa: E402
from hsae_core.data.store import open_store  # noqa: E402
from hsae_core.evaluation.bootstrap import replicate_weights  # noqa: E402
from hsae_core.evaluation.evaluate import Bootstrap, count_model, replicate_metrics  # noqa: E402
from hsae_core.model.config import SIMILARITIES  # noqa: E402
from hsae_core.model.posthoc import (  # noqa: E402
    PosthocConfig,
    coactivation_stats,
    live_features,
    posthoc_forest,
)
from hsae_core.pipeline.io import load_hsae  # noqa: E402
from hsae_core.pipeline.params import hsae_config, load_params, section_config  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def link_table(folder: str, store: str, normalization: Path, params: Path,
               eval_tokens: int | None) -> list[dict]:
    """One row per similarity: the forest's mean pair metrics on the eval split."""
    p = load_params(params)
    post = section_config(p, "posthoc", PosthocConfig)
    model = load_hsae(folder)
    hier = hsae_config(p, model.cfg.d_model)
    info = open_store(store)

    def train_tokens(n: int, seed: int) -> TrainActivations:
        return TrainActivations(info, normalization, batch_size=model.cfg.batch_size,
                                seed=seed, epochs=None, max_tokens=n)

    window = max(1, hier.update_interval) * hier.batch_size
    live = live_features(model, train_tokens(window, model.cfg.seed + 1))
    rows = []
    for similarity in SIMILARITIES:
        coact = None
        if similarity == "coactivation":
            coact = coactivation_stats(model, train_tokens(post.coactivation_tokens,
                                                           model.cfg.seed),
                                       hier.coactivation_momentum, hier.coactivation_tokens)
        model.forest = posthoc_forest(model, similarity, hier.exclude_quantile, hier.tree,
                                      coact, live)
        batches = (b.activations for b in EvalActivations(info, normalization, batch_size=2048,
                                                          max_tokens=eval_tokens))
        counts = count_model(model, batches)
        reps = replicate_metrics(counts, Bootstrap(n_boot=0))
        totals = counts.totals(replicate_weights(len(counts.documents()), 0, 0))
        base = [float(totals.fired[l][0].double()[model.forest.has_children(l)].mean())
                / counts.tokens for l in range(model.n_levels - 1)]
        rows.append({
            "similarity": similarity,
            "hamming": float(reps["mean/hamming"][0]),
            "p_pc": float(reps["mean/p_parent_given_child"][0]),
            "p_pc_pooled": float(reps["mean/p_parent_given_child_pooled"][0]),
            "p_cp_pooled": float(reps["mean/p_child_given_parent_pooled"][0]),
            "parent_rate": sum(base) / len(base) if base else float("nan"),
            "children_assigned": [model.forest.n_assigned(l)
                                  for l in range(model.n_levels - 1)]})
    return rows


@app.command()
def main(model: list[str] = typer.Option(..., help="name=folder of a save_hsae model"),
         store: str = typer.Option("data/activations.zarr"),
         normalization: Path = typer.Option(Path("data/normalization.json")),
         params: Path = typer.Option(Path("params.yaml")),
         eval_tokens: int = typer.Option(0, help="eval tokens (0: the whole split)")) -> None:
    out = {}
    print("| model | similarity | Hamming | P(p\\|c) macro | P(p\\|c) pooled | P(c\\|p) pooled "
          "| linked parents' firing rate |")
    print("|---|---|---|---|---|---|---|")
    for spec in model:
        name, _, folder = spec.partition("=")
        out[name] = link_table(folder, store, normalization, params, eval_tokens or None)
        for r in out[name]:
            print(f"| {name} | {r['similarity']} | {r['hamming']:.3f} | {r['p_pc']:.3f} | "
                  f"{r['p_pc_pooled']:.3f} | {r['p_cp_pooled']:.3f} | {r['parent_rate']:.4f} |")
    print(json.dumps(out))


if __name__ == "__main__":
    app()
