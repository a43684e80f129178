"""Stage judge: an LLM judges sampled parent-child pairs of the HSAE forest, the post-hoc
baseline forest and random non-linked pairs (§4.3, Appendix C) -> data/judge/pairs.jsonl
(one record per pair) and metrics/judge.json (Yes rates with 95% intervals, ``dvc metrics``).

    python -m stages.judge [--params params.yaml] [--hsae data/hsae] [--posthoc data/posthoc]
        [--evidence data/evidence] [--out data/judge] [--metrics metrics/judge.json]

Reads ``judge:``. Answers are cached in <out>/cache (keyed by backend, model, settings and
prompt), so a re-run or an interrupted run pays only for pairs not yet answered.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich import print as rprint

from hsae_core.common import fsio
from hsae_core.evaluation.evidence import load_evidence
from hsae_core.judge.backends import (
    JudgeBackendError,
    LocalChatBackend,
    OpenAIChatBackend,
    ResponseCache,
    RetryPolicy,
)
from hsae_core.judge.pairs import JudgeConfig, judge_pairs, sample_pairs, summarize
from hsae_core.pipeline.io import load_forest
from hsae_core.pipeline.params import load_params, section_config

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


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file (section judge)"),
    hsae: Path = typer.Option(Path("data/hsae"), help="trained HSAE (its forest.json)"),
    posthoc: Path = typer.Option(Path("data/posthoc"), help="baseline with its post-hoc forest"),
    evidence: Path = typer.Option(Path("data/evidence"),
                                  help="collect-evidence output (hsae/, baseline/)"),
    out: Path = typer.Option(Path("data/judge"), help="pairs.jsonl and the response cache"),
    metrics: Path = typer.Option(Path("metrics/judge.json"), help="metrics JSON"),
) -> None:
    t0 = time.perf_counter()
    try:
        cfg = section_config(load_params(params), "judge", JudgeConfig)
        forests = {"hsae": load_forest(_need(hsae / "forest.json")),
                   "posthoc": load_forest(_need(posthoc / "forest.json"))}
        ev = {"hsae": load_evidence(evidence / "hsae"),
              "posthoc": load_evidence(evidence / "baseline")}
        ev["random"] = ev["hsae"]
        for name, forest in forests.items():
            got = tuple(ev[name].index["level_sizes"])
            if got != forest.level_sizes:
                raise ValueError(f"evidence for {name} has level sizes {got}, its forest "
                                 f"{forest.level_sizes}: "
                                 "re-run collect-evidence on these models")
        pairs, info = sample_pairs(forests, ev, cfg)
        backend = make_backend(cfg)
    except (ValueError, FileNotFoundError, OSError, JudgeBackendError) as err:
        rprint(f"[red]judge: {err}[/red]")
        raise typer.Exit(2) from err
    counts = {s: sum(p.source == s for p in pairs) for s in ("hsae", "posthoc", "random")}
    print(f"judge: {counts} pairs, backend {backend.name} model {backend.model}")
    cache = ResponseCache(out / "cache")
    try:
        records = judge_pairs(pairs, ev, backend, cache, cfg.max_answer_chars)
    except JudgeBackendError as err:
        rprint(f"[red]judge: {err}[/red]")
        raise typer.Exit(2) from err
    finally:
        cache.close()
    # new files renamed into place: DVC links pairs.jsonl to its cache (never rewrite in place)
    fsio.write_text(out / "pairs.jsonl",
                    "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    summary = summarize(records) | {"sampling": info}
    fsio.write_json(metrics, summary, sort_keys=True)
    asked = sum(not r["cached"] for r in records)
    print(f"judge: {len(records)} pairs, {asked} asked, {len(records) - asked} from cache, "
          f"{sum(r['error'] is not None for r in records)} failed "
          f"({time.perf_counter() - t0:.0f} s)")
    cut = sum(r["raw_truncated"] for r in records)
    if cut:
        print(f"judge: {cut} answers longer than judge.max_answer_chars = "
              f"{cfg.max_answer_chars} were cut to it and recorded unparseable")
    for source in ("hsae", "posthoc", "random"):
        s = summary[source]
        shown = "n/a" if s["yes_rate"] is None else \
            f"{s['yes_rate']:.3f} [{s['yes_rate_lo']:.3f}, {s['yes_rate_hi']:.3f}]"
        print(f"  {source:8s} yes rate {shown} of {s['n_yes'] + s['n_no']} parsed, "
              f"{s['n_unparseable']} unparseable")
    print(f"judge: wrote {out / 'pairs.jsonl'} and {metrics}")


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the training stages first (dvc repro)")
    return path


if __name__ == "__main__":
    app()
