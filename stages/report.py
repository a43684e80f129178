"""Stage report: the feature-forest browser and the paper's figures (issue 6) -> data/report/.

    python -m stages.report [--params params.yaml] [--hsae data/hsae] [--posthoc data/posthoc]
        [--matryoshka data/matryoshka_forest] [--evidence data/evidence]
        [--judge data/judge/hsae/pairs.jsonl
        --judge data/judge/baseline/pairs.jsonl] [--curves dvclive]
        [--metrics metrics/metrics.json] [--ablations metrics/ablations.json]
        [--scale-study results/scale_study.json] [--out data/report]

Reads ``report:``, ``rho``, ``r`` (Figure 8's reference point) and ``metrics.link_min_docs``
(which links the site scores, as compute-metrics does). The store's document labels give each
feature's top labels and each link's topic coherence (a corpus without labels: the site says
topic coherence is unavailable). Writes
data/report/site/index.html (open it from disk: no server), the figures
data/report/figures/fig*.{png,svg} (with fig_training: the training curves of
dvclive/{hsae,baseline}, viewable offline) and data/report/summary.json. The judge's pairs, the
curves and the ablation results are optional: where one is missing, the site and the figures
say so.
The Matryoshka arm (issue 26) is optional too: where ``--matryoshka`` (its groups as levels with
their post-hoc forest, build-matryoshka-forest) exists, it is the site's third forest (evidence
from ``<evidence>/matryoshka``, curves from ``<curves>/matryoshka``) and, where metrics.json has
its block, Figure 3's and fig_semantic's third series; where it does not (older runs), the
report is the two-arm one and says nothing of it.
``--ablations`` is either ``dvc exp show --json`` output (``dvc exp show --json >
metrics/ablations.json`` once the queued ablations have run) or a JSON list of the rows of
``hsae_core.pipeline.ablations.experiment_rows``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from hsae_core.common.console import rprint

from hsae_core.common.errors import ConfigError
from hsae_core.data.normalize import resolve_scale
from hsae_core.data.reader import EvalActivations
from hsae_core.data.store import open_store
from hsae_core.evaluation.compute import MetricsConfig
from hsae_core.evaluation.evidence import load_evidence
from hsae_core.evaluation.semantic import SemanticConfig
from hsae_core.pipeline.ablations import experiment_rows
from hsae_core.pipeline.io import load_for_store
from hsae_core.pipeline.params import load_params, section_config
from hsae_core.site.config import ReportConfig
from hsae_core.site.make import build_report, read_curves, read_judge

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def read_ablations(path: Path) -> tuple[list[dict] | None, str]:
    """Ablation rows from a ``dvc exp show --json`` dump or from saved rows; (None, why) if
    absent."""
    if not path.is_file():
        return None, f"{path} missing"
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list (dvc exp show --json, or ablation rows)")
    if data and "rev" in data[0]:
        data = experiment_rows(data)
    if any("changed" not in row for row in data):
        raise ValueError(f"{path}: rows need a 'changed' field "
                         "(hsae_core.pipeline.ablations.experiment_rows)")
    return data, f"{len(data)} rows from {path}"


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file (report, rho, r)"),
    hsae: Path = typer.Option(Path("data/hsae"), help="trained HSAE"),
    posthoc: Path = typer.Option(Path("data/posthoc"),
                                 help="baseline SAEs with their post-hoc forest"),
    matryoshka: Path = typer.Option(Path("data/matryoshka_forest"),
                                    help="the Matryoshka's groups with their post-hoc forest "
                                         "(optional: absent, two forests)"),
    evidence: Path = typer.Option(Path("data/evidence"),
                                  help="collected evidence (hsae/, baseline/, matryoshka/)"),
    judge: list[Path] = typer.Option([Path("data/judge/hsae/pairs.jsonl"),
                                      Path("data/judge/baseline/pairs.jsonl")],
                                     help="the judge's verdicts, one file per side (optional)"),
    curves: Path = typer.Option(Path("dvclive"),
                                help="DVCLive folders <curves>/hsae, <curves>/baseline "
                                     "(<curves>/matryoshka)"),
    metrics: Path = typer.Option(Path("metrics/metrics.json"),
                                 help="compute-metrics output (Figure 3)"),
    ablations: Path = typer.Option(Path("metrics/ablations.json"),
                                   help="ablation results (optional)"),
    scale_study: Path = typer.Option(Path("results/scale_study.json"),
                                     help="scale study results (optional; Figure S)"),
    store: Path = typer.Option(Path("data/activations.zarr"),
                               help="activation store (eval split)"),
    normalization: Path = typer.Option(Path("data/normalization.json"), help="normalisation JSON"),
    out: Path = typer.Option(Path("data/report"), help="output folder"),
) -> None:
    t0 = time.perf_counter()
    try:
        all_params = load_params(params)
        cfg = section_config(all_params, "report", ReportConfig)
        link_min_docs = section_config(all_params, "metrics", MetricsConfig).link_min_docs
        info = open_store(store)
        label_arr = info.group["documents/label"]  # names: [] when the corpus has no labels
        names = [str(n) for n in label_arr.attrs.get("label_names", [])]
        scale = resolve_scale(normalization, info)
        folders = {"hsae": hsae, "baseline": posthoc}
        if matryoshka.exists():
            folders["matryoshka"] = matryoshka
        models = load_for_store(folders, info.d_model, store, cfg.device)
        ev = {}
        for name in models:
            folder = evidence / name
            ev[name] = load_evidence(folder) if (folder / "index.json").is_file() else None
            if (ev[name] is not None
                    and ev[name].index["level_sizes"] != list(models[name].cfg.level_sizes)):
                raise ValueError(f"evidence {folder} has level sizes "
                                 f"{ev[name].index['level_sizes']}, the model "
                                 f"{list(models[name].cfg.level_sizes)}: rerun evidence-{name}")
            if ev[name] is None:
                rprint(f"[yellow]report: no evidence at {folder}: "
                       "the site shows no contexts[/yellow]")
        judge_pairs, notes = [], []
        for path in judge:
            pairs, note = read_judge(path)
            judge_pairs += pairs or []
            notes += [note] if note else []
        judge_pairs, judge_note = judge_pairs or None, "; ".join(notes) or None
        metrics_data = json.loads(metrics.read_text()) if metrics.is_file() else None
        rows, how = read_ablations(ablations)
        study = json.loads(scale_study.read_text()) if scale_study.is_file() else None
        reference = {k: float(all_params[k]) for k in ("rho", "r") if k in all_params}
        logged = {name: read_curves(curves / name, name) for name in models}
    except (ValueError, FileNotFoundError, ConfigError) as err:
        rprint(f"[red]report: {err}[/red]")
        raise typer.Exit(2) from err
    note = f" ({judge_note})" if judge_note else ""
    print(f"report: forests: {', '.join(models)}"
          + ("" if "matryoshka" in models else f" (no Matryoshka: {matryoshka} absent)"))
    print(f"report: judge: {len(judge_pairs or [])} pairs{note}"
          f"; ablations: {how}; curves: "
          + ", ".join(f"{k} {len(v)} series" for k, v in logged.items()))
    mcfg = MetricsConfig(eval_tokens=cfg.eval_tokens, batch_size=cfg.batch_size, lm_loss_tokens=0,
                         device=cfg.device)

    def batches():
        for batch in EvalActivations(info, scale, batch_size=mcfg.batch_size,
                                     max_tokens=mcfg.eval_tokens):
            yield batch

    summary = build_report(out, models, batches, cfg, evidence=ev, judge_pairs=judge_pairs,
                           judge_note=judge_note, metrics=metrics_data, ablation_rows=rows,
                           reference_params=reference, curves=logged, scale_study=study,
                           doc_labels=(label_arr[:], names) if names else None,
                           semantic=SemanticConfig(link_min_docs))
    print(f"report: {summary['trees']} trees; open {summary['site']} in a browser "
          f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    app()
