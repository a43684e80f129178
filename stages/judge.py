"""Stages judge-hsae and judge-baseline: an LLM judges sampled parent-child pairs (§4.3,
Appendix C) of the HSAE forest with random non-linked HSAE pairs as the base rate (side
``hsae``), or of the post-hoc baseline forest (side ``baseline``) -> <out>/pairs.jsonl (one
record per pair) and a metrics JSON (Yes rates with 95% intervals, ``dvc metrics``). One stage
per side, so an ablation of the HSAE never asks about the baseline's pairs again.

    python -m stages.judge --side hsae --out data/judge/hsae --metrics metrics/judge/hsae.json
    python -m stages.judge --side baseline --out data/judge/baseline \
        --metrics metrics/judge/baseline.json
    python -m stages.judge          # --side both: every source in one run
        [--params params.yaml] [--hsae data/hsae] [--posthoc data/posthoc]
        [--evidence data/evidence]

Reads ``judge:``. Each side draws its pairs with a generator of its own (``judge.seed`` and the
side), so one side's sample does not depend on the other's forest. Answers are cached in
<out>/cache (keyed by backend, model, settings and prompt), so a re-run or an interrupted run
pays only for pairs not yet answered. The cache is not a DVC output (dvc.yaml): it grows with
every run, and a finished stage must not look changed because of it; a record in pairs.jsonl
does not say whether its answer came from the cache, so the same answers give the same bytes.

A run in which no pair was judged, or more than ``judge.max_failed_share`` of the pairs failed
for good, exits 2 with the reason in one line and records nothing (DVC does not mark the stage
done): the records with their errors go to <out>/pairs.failed.jsonl, not pairs.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import typer
from hsae_core.common.console import rprint

from hsae_core.common import fsio
from hsae_core.common.errors import ConfigError
from hsae_core.evaluation.evidence import load_evidence
from hsae_core.judge.backends import (
    JudgeBackendError,
    LocalChatBackend,
    OpenAIChatBackend,
    ResponseCache,
    RetryPolicy,
)
from hsae_core.judge.pairs import (
    JudgeConfig,
    Pair,
    judge_failure,
    judge_pairs,
    sample_linked,
    sample_random,
    summarize,
    with_orders,
)
from hsae_core.pipeline.io import load_forest
from hsae_core.pipeline.params import check_unchanged, load_params, section_config

#: side -> (its linked source, its model's forest option, its evidence folder, other sources)
SIDES = {"hsae": ("hsae", "hsae", "hsae", ("random",)),
         "baseline": ("posthoc", "posthoc", "baseline", ())}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def make_backend(cfg: JudgeConfig):
    if cfg.backend == "openai":
        return OpenAIChatBackend(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env,
                                 concurrency=cfg.concurrency, timeout_s=cfg.timeout_s,
                                 max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                 retry=RetryPolicy(cfg.max_retries, cfg.backoff_base_s,
                                                   cfg.backoff_max_s, cfg.max_wait_s,
                                                   cfg.max_request_s))
    return LocalChatBackend(cfg.model, max_new_tokens=cfg.max_tokens, batch_size=cfg.batch_size,
                            answer_prefix=cfg.answer_prefix, device=cfg.device)


def sample_side(side: str, forest, evidence, cfg: JudgeConfig) -> tuple[list[Pair], dict]:
    """The pairs of one side: ``n_pairs`` links of its forest (hsae_core.judge.pairs.
    sample_linked) and, for the HSAE, ``n_random`` random non-linked pairs in the links' level
    mix; drawn with the generator (``cfg.seed``, side)."""
    source, _, _, extra = SIDES[side]
    rng = np.random.default_rng([cfg.seed, list(SIDES).index(side)])
    links, skipped = sample_linked(forest, evidence, cfg.n_pairs, rng)
    pairs = with_orders(source, links, rng)
    if "random" in extra:
        n_random = cfg.n_pairs if cfg.n_random is None else cfg.n_random
        pairs += with_orders("random", sample_random(forest, evidence, [l for l, _, _ in links],
                                                     rng, n_random), rng)
    return pairs, {f"{source}_links_without_contexts": skipped}


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file (section judge)"),
    side: str = typer.Option("both", help="hsae (HSAE links + random pairs), baseline "
                                          "(post-hoc links) or both"),
    hsae: Path = typer.Option(Path("data/hsae"), help="trained HSAE (its forest.json)"),
    posthoc: Path = typer.Option(Path("data/posthoc"), help="baseline with its post-hoc forest"),
    evidence: Path = typer.Option(Path("data/evidence"),
                                  help="evidence folders (<evidence>/hsae, <evidence>/baseline)"),
    out: Path = typer.Option(Path("data/judge"), help="pairs.jsonl and the response cache"),
    metrics: Path = typer.Option(Path("metrics/judge.json"), help="metrics JSON"),
) -> None:
    t0 = time.perf_counter()
    stage = "judge" if side == "both" else f"judge-{side}"
    try:
        if side not in (*SIDES, "both"):
            raise ValueError(f"--side {side!r}: expected hsae, baseline or both")
        cfg = section_config(load_params(params), "judge", JudgeConfig)
        folders = {"hsae": hsae, "posthoc": posthoc}
        pairs, info, ev = [], {}, {}
        for name in (SIDES if side == "both" else (side,)):
            source, model, folder, extra = SIDES[name]
            forest = load_forest(_need(folders[model] / "forest.json"))
            ev[source] = load_evidence(evidence / folder)
            for other in extra:
                ev[other] = ev[source]
            got = tuple(ev[source].index["level_sizes"])
            if got != forest.level_sizes:
                raise ValueError(f"evidence for {source} has level sizes {got}, its forest "
                                 f"{forest.level_sizes}: re-run its evidence stage")
            drawn, drawn_info = sample_side(name, forest, ev[source], cfg)
            pairs += drawn
            info |= drawn_info
        backend = make_backend(cfg)
    except (ValueError, FileNotFoundError, OSError, JudgeBackendError) as err:
        rprint(f"[red]{stage}: {err}[/red]")
        raise typer.Exit(2) from err
    sources = [s for s in ("hsae", "posthoc", "random") if s in ev]
    counts = {s: sum(p.source == s for p in pairs) for s in sources}
    print(f"{stage}: {counts} pairs, backend {backend.name} model {backend.model}")
    cache, stats = ResponseCache(out / "cache"), {}
    try:
        records = judge_pairs(pairs, ev, backend, cache, cfg.max_answer_chars, stats)
    except JudgeBackendError as err:
        rprint(f"[red]{stage}: {err}[/red]")
        raise typer.Exit(2) from err
    finally:
        cache.close()
    failed = sum(r["error"] is not None for r in records)
    print(f"{stage}: {len(records)} pairs, {len(records) - stats['cached']} asked, "
          f"{stats['cached']} from cache, {failed} failed ({time.perf_counter() - t0:.0f} s)")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    try:
        reason = judge_failure(records, cfg.max_failed_share)
        if reason is None:
            check_unchanged(stage)  # under DVC: params.yaml as this run read it
    except ConfigError as err:
        reason = str(err)
    if reason is not None:
        if records:
            fsio.write_text(out / "pairs.failed.jsonl", text)
            reason += f" (records with their errors: {out / 'pairs.failed.jsonl'})"
        print(f"{stage}: {reason}", file=sys.stderr)  # one line, never wrapped
        raise typer.Exit(2)
    # new files renamed into place: DVC links pairs.jsonl to its cache (never rewrite in place)
    fsio.write_text(out / "pairs.jsonl", text)
    fsio.remove(out / "pairs.failed.jsonl")
    summary = {s: _rate_first(v) for s, v in summarize(records).items() if s in sources}
    summary["sampling"] = info
    fsio.write_json(metrics, summary)
    cut = sum(r["raw_truncated"] for r in records)
    if cut:
        print(f"{stage}: {cut} answers longer than judge.max_answer_chars = "
              f"{cfg.max_answer_chars} were cut to it and recorded unparseable")
    for source in sources:
        s = summary[source]
        shown = "n/a" if s["yes_rate"] is None else \
            f"{s['yes_rate']:.3f} [{s['yes_rate_lo']:.3f}, {s['yes_rate_hi']:.3f}]"
        print(f"  {source:8s} yes rate {shown} of {s['n_yes'] + s['n_no']} parsed, "
              f"{s['n_unparseable']} unparseable")
    print(f"{stage}: wrote {out / 'pairs.jsonl'} and {metrics}")


def _rate_first(summary: dict) -> dict:
    """The Yes rate and its interval first (the columns `dvc exp show` leads with)."""
    first = ("yes_rate", "yes_rate_lo", "yes_rate_hi")
    return {k: summary[k] for k in first} | {k: v for k, v in summary.items() if k not in first}


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the training stages first (dvc repro)")
    return path


if __name__ == "__main__":
    app()
