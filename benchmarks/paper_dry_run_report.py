"""The paper dry run's measurements per stage, the projection of the paper's full run from them,
and the Markdown tables (benchmarks/paper_dry_run.py).

Per stage (from the hook's record, benchmarks/paper_dry_run_hook/sitecustomize.py): ``wall_s``
of its process; ``imports_s`` until its Typer app was called; ``load_s`` inside the model
loaders; ``fixed_s`` in work sized by the SAEs, not the tokens (UMAP figures, writing the
browser, the post-hoc forest); ``work_s`` the rest. ``count`` is what the work scales with
(tokens; pairs for the judge; nothing for check-params and the exports, whose work is fixed at
the paper's sizes) and ``paper_count`` the same quantity in configs/paper.yaml (class defaults
for the sections it leaves out: judge 5000 pairs, evidence and report on the whole eval split).

Projection of a stage = ``imports_s + load_s + fixed_s + work_s * paper_count / count``: the
work taken as linear in its count at the measured rate, the rest as fixed. DVC's own time
between stages is projected as the measured time plus hashing the paper's larger store once
(md5 at the rate measured on this run's store, from the page cache). Disk: the store at its
measured bytes per token, every other output as measured (their sizes follow the paper's
levels, not the token counts).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def du(path: Path) -> int:
    """Bytes of the files under ``path`` (hard links counted once)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    seen, total = set(), 0
    for root, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def md5_rate(path: Path, max_bytes: int = 1 << 30) -> dict:
    """MB/s of hashlib's md5 (what DVC hashes outputs with) over up to ``max_bytes`` of the
    files under ``path``, read after the run (from the page cache)."""
    import hashlib
    import time

    done, t0 = 0, time.perf_counter()
    for root, _, files in os.walk(path):
        for name in sorted(files):
            h = hashlib.md5()
            with open(os.path.join(root, name), "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
                    done += len(chunk)
            if done >= max_bytes:
                break
        if done >= max_bytes:
            break
    seconds = time.perf_counter() - t0
    return {"bytes": done, "MBps": round(done / 1e6 / seconds, 1) if seconds > 0 else None}


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def stage_records(stats: Path) -> dict[str, dict]:
    """The hook's records per stage: the process that lived longest is the stage's; peaks are
    the maximum over its processes."""
    by_stage: dict[str, list[dict]] = {}
    for f in sorted(stats.glob("*.json")):
        rec = json.loads(f.read_text())
        if rec.get("is_stage"):  # (the others, DVC's own, list modules only)
            by_stage.setdefault(rec["stage"], []).append(rec)
    out = {}
    for stage, recs in by_stage.items():
        main = max(recs, key=lambda r: r["t_end"] - r["t_start"])
        cuda = [r["cuda"] for r in recs if "cuda" in r]
        wall = main["t_end"] - main["t_start"]
        imports = main.get("t_ready", main["t_start"]) - main["t_start"]
        out[stage] = {
            "wall_s": round(wall, 2), "imports_s": round(imports, 2),
            "load_s": round(main["load_s"], 2), "fixed_s": round(main["fixed_s"], 2),
            "work_s": round(max(0.0, wall - imports - main["load_s"] - main["fixed_s"]), 2),
            "timed": main["timed"], "processes": len(recs), "t_start": main["t_start"],
            "peak_rss": max((r.get("peak_rss", 0) for r in recs), default=0),
            "cuda_peak_allocated": max((c["peak_allocated"] for c in cuda), default=None),
            "cuda_peak_reserved": max((c["peak_reserved"] for c in cuda), default=None),
            "gpu": cuda[0]["device"] if cuda else None}
        for key in ("patch_errors", "cuda_error", "modules"):
            if any(key in r for r in recs):
                out[stage][key] = [r.get(key) for r in recs if key in r]
    return out


def counts(project: Path, params: dict) -> dict[str, tuple[int | None, str]]:
    """What each stage's work scales with, read from its outputs (or params)."""
    attrs = _json(project / "data" / "activations.zarr" / "zarr.json").get("attributes", {})
    n_tok = attrs.get("n_tokens", {})
    eval_rows = n_tok.get("eval")
    sae, hier = params["sae"], params.get("hierarchy", {})
    metrics = _json(project / "metrics" / "metrics.json")
    out: dict[str, tuple[int | None, str]] = {
        "check-params": (None, ""),
        "extract-activations": (sum(n_tok.values()) if n_tok else None, "tokens"),
        "normalize": (min(params["normalize"]["n_tokens"], n_tok.get("train", 10**18)),
                      "tokens"),
        "train-hsae": (sae["total_steps"] * sae["batch_size"], "tokens"),
        "train-baselines": (sae["total_steps"] * sae["batch_size"], "tokens"),
        "build-posthoc-trees": (max(1, hier.get("update_interval", 1)) * sae["batch_size"],
                                "tokens"),
        "compute-metrics": (metrics.get("eval_tokens"), "tokens"),
        "export-hsae": (None, ""), "export-baseline": (None, ""),
        "report": (min(eval_rows, params["report"].get("eval_tokens") or 10**18)
                   if eval_rows else None, "tokens"),
    }
    for side in ("hsae", "baseline"):
        index = _json(project / "data" / "evidence" / side / "index.json")
        out[f"evidence-{side}"] = (index.get("eval_tokens"), "tokens")
        pairs = project / "data" / "judge" / side / "pairs.jsonl"
        n = sum(1 for line in pairs.read_text().splitlines() if line.strip()) \
            if pairs.is_file() else None
        out[f"judge-{side}"] = (n, "pairs")
    return out


def paper_counts() -> dict[str, int | None]:
    """The same quantities for configs/paper.yaml."""
    from hsae_core.judge.pairs import JudgeConfig

    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    ex, sae = paper["extract"], paper["sae"]
    eval_split = round(ex["max_tokens"] * ex["eval_fraction"])
    judge = JudgeConfig(**paper.get("judge", {}))
    n_random = judge.n_pairs if judge.n_random is None else judge.n_random
    return {"check-params": None, "extract-activations": ex["max_tokens"],
            "normalize": paper["normalize"]["n_tokens"],
            "train-hsae": sae["total_steps"] * sae["batch_size"],
            "train-baselines": sae["total_steps"] * sae["batch_size"],
            "build-posthoc-trees": paper["hierarchy"]["update_interval"] * sae["batch_size"],
            "compute-metrics": paper["metrics"].get("eval_tokens") or eval_split,
            "export-hsae": None, "export-baseline": None,
            "evidence-hsae": eval_split, "evidence-baseline": eval_split,
            "judge-hsae": judge.n_pairs + n_random, "judge-baseline": judge.n_pairs,
            "report": eval_split}


#: Each stage's outputs on disk (dvc.yaml's outs, plus the trainings' checkpoints and the
#: judge's answer cache, resume state outside DVC).
OUTPUTS = {"extract-activations": ["data/activations.zarr"],
           "normalize": ["data/normalization.json"],
           "train-hsae": ["data/hsae", "dvclive/hsae", "data/checkpoints/hsae.pt"],
           "train-baselines": ["data/baseline", "dvclive/baseline",
                               "data/checkpoints/baseline.pt"],
           "build-posthoc-trees": ["data/posthoc"], "compute-metrics": ["metrics"],
           "export-hsae": ["data/export/hsae"], "export-baseline": ["data/export/baseline"],
           "evidence-hsae": ["data/evidence/hsae"],
           "evidence-baseline": ["data/evidence/baseline"],
           "judge-hsae": ["data/judge/hsae"], "judge-baseline": ["data/judge/baseline"],
           "report": ["data/report"]}


def collect(project: Path, stats: Path, pipe: dict | None, params: dict) -> dict[str, dict]:
    """Per stage of dvc.yaml: status, the hook's timings and peaks, count, rate, output bytes."""
    recs = stage_records(stats)
    cnt = counts(project, params)
    completed = set((pipe or {}).get("completed", []))
    out = {}
    for name in (pipe or {}).get("order", []):
        rec = recs.get(name, {})
        status = ("done" if name in completed else "failed" if name in recs else "not run")
        count, unit = cnt.get(name, (None, ""))
        row = {"status": status, **rec, "count": count, "unit": unit}
        if count and rec.get("work_s"):
            row["rate"] = round(count / rec["work_s"], 1)
        outs = [project / p for p in OUTPUTS.get(name, [])]
        row["out_bytes"] = sum(du(p) for p in outs if p.exists())
        out[name] = row
    return out


def project(data: dict, scale) -> dict:
    """The paper's full run projected from this run's measured stages (see the module
    docstring); None for a stage that did not complete."""
    stages, pipe = data.get("stages") or {}, data.get("pipeline") or {}
    paper = paper_counts()
    rows, total = {}, 0.0
    for name, st in stages.items():
        if st["status"] != "done" or "wall_s" not in st:
            rows[name] = None
            continue
        factor = (paper.get(name) / st["count"]) if paper.get(name) and st.get("count") else 1.0
        seconds = st["imports_s"] + st["load_s"] + st["fixed_s"] + st["work_s"] * factor
        rows[name] = {"paper_count": paper.get(name), "factor": round(factor, 2),
                      "projected_s": round(seconds, 1)}
        total += seconds
    store = stages.get("extract-activations", {})
    tokens = store.get("count")
    store_bytes = store.get("out_bytes") or 0
    per_token = store_bytes / tokens if tokens else None
    paper_store = per_token * paper["extract-activations"] if per_token else None
    overhead = None
    if pipe.get("runner") == "dvc" and stages and all(r for r in rows.values()):
        overhead = max(0.0, pipe["wall_s"] - sum(s["wall_s"] for s in stages.values()))
        mbps = (data.get("dvc_hash") or {}).get("MBps")
        hashing = ((paper_store - store_bytes) / 1e6 / mbps) if mbps and paper_store else 0.0
        rows["(dvc between stages)"] = {"paper_count": None, "factor": None,
                                        "measured_s": round(overhead, 1),
                                        "hash_MBps": mbps,
                                        "projected_s": round(overhead + hashing, 1)}
        total += overhead + hashing
    others = {n: s.get("out_bytes", 0) for n, s in stages.items() if n != "extract-activations"}
    disk = {"store_bytes_per_token": round(per_token, 1) if per_token else None,
            "store_bytes": round(paper_store) if paper_store else None,
            "other_outputs_bytes": sum(others.values()), "other_outputs": others,
            "model_bytes": (data.get("assets") or {}).get("model", {}).get("bytes")}
    disk["total_bytes"] = ((disk["store_bytes"] or 0) + disk["other_outputs_bytes"]
                           + (disk["model_bytes"] or 0))
    complete = all(r is not None for r in rows.values()) and bool(rows)
    return {"note": "PROJECTION from this run's measured rates (" + scale.name + " sizes on "
                    + data.get("device", "?") + "), not a measurement of the paper's run",
            "stages": rows, "total_s": round(total, 1) if complete else None,
            "complete": complete, "disk": disk}


# ---------------------------------------------------------------- Markdown

def _gib(n) -> str:
    return "" if n in (None, 0) else f"{n / GIB:.2f}"


def _num(x, fmt: str = ",.0f") -> str:
    return "" if x is None else format(x, fmt)


def markdown(data: dict) -> str:
    env = data.get("environment", {})
    pipe = data.get("pipeline") or {}
    lines = [f"# Paper dry run ({data.get('mode')} sizes, device {data.get('device')})", "",
             f"{data.get('started')}; {env.get('gpu') or 'no GPU'}; torch {env.get('torch')}, "
             f"transformers {env.get('transformers')}, Python {env.get('python')}; runner "
             f"{pipe.get('runner', '-')} (rc {pipe.get('rc', '-')}"
             f"{', stopped at the time limit' if pipe.get('timed_out') else ''}); "
             f"whole run {data.get('wall_s', '-')} s of a {data.get('time_limit_s')} s limit.",
             ""]
    model = (data.get("assets") or {}).get("model") or {}
    if model:
        lines += [f"Model: {model.get('architecture')} with random {model.get('dtype')} weights, "
                  f"{model.get('parameters', 0) / 1e6:,.1f}M parameters, "
                  f"{_gib(model.get('bytes'))} GiB on disk, built in {model.get('build_s')} s "
                  f"and saved in {model.get('save_s')} s.", ""]
    for name, ph in (data.get("phases") or {}).items():
        if ph["status"] != "done":
            lines += [f"**Phase {name} failed**: `{ph.get('error')}`", ""]
    sb = data.get("store_bench")
    if sb:
        lines += ["## Store (measured)", "",
                  f"{sb['rows']:,} rows of d {sb['d_model']} in {sb['dtype']} "
                  f"(chunk {sb['chunk_rows']} rows, shard {sb['shard_rows']} rows):", "",
                  "| write GB/s | read whole shards GB/s | read train batches GB/s | "
                  "read eval batches GB/s |", "|---|---|---|---|",
                  f"| {sb['write_GBps']} | {sb['read_whole_shards_GBps']} | "
                  f"{sb['read_train_batches_GBps']} | {sb['read_eval_batches_GBps']} |", ""]
    stages = data.get("stages") or {}
    if stages:
        lines += ["## Stages (measured)", "",
                  "| stage | status | wall s | imports s | model load s | fixed work s | work s | "
                  "count | rate /s | CUDA peak alloc GiB | CUDA peak reserved GiB | "
                  "host peak GiB | outputs GiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in stages.items():
            lines.append(
                f"| {name} | {s['status']} | {_num(s.get('wall_s'), '.1f')} | "
                f"{_num(s.get('imports_s'), '.1f')} | {_num(s.get('load_s'), '.1f')} | "
                f"{_num(s.get('fixed_s'), '.1f')} | {_num(s.get('work_s'), '.1f')} | "
                f"{_num(s.get('count'))} {s.get('unit', '')} | "
                f"{_num(s.get('rate'))} | {_gib(s.get('cuda_peak_allocated'))} | "
                f"{_gib(s.get('cuda_peak_reserved'))} | {_gib(s.get('peak_rss'))} | "
                f"{_gib(s.get('out_bytes'))} |")
        lines.append("")
    proj = data.get("projection")
    if proj:
        lines += ["## The paper's full run: a PROJECTION from the measured rates", "",
                  proj["note"] + ": each stage's work scaled linearly to configs/paper.yaml's "
                  "counts; imports, model loading and the work sized by the SAEs (UMAP, the "
                  "browser, the post-hoc forest) kept as measured; DVC's time between stages "
                  "plus hashing the larger store (benchmarks/paper_dry_run_report.py).", "",
                  "| stage | paper count | x measured | projected |", "|---|---|---|---|"]
        for name, r in proj["stages"].items():
            if r is None:
                lines.append(f"| {name} | | | not measured |")
                continue
            lines.append(f"| {name} | {_num(r['paper_count'])} | {_num(r['factor'], ',.1f')} | "
                         f"{_duration(r['projected_s'])} |")
        total = proj.get("total_s")
        lines += [f"| **total** | | | **{_duration(total) if total else 'incomplete'}** |", ""]
        d = proj["disk"]
        lines += [f"Disk (projected): store {_gib(d['store_bytes'])} GiB "
                  f"({_num(d['store_bytes_per_token'], ',.1f')} bytes per token), other outputs "
                  f"{_gib(d['other_outputs_bytes'])} GiB, the model {_gib(d['model_bytes'])} "
                  f"GiB: {_gib(d['total_bytes'])} GiB (DVC's cache links, not copies).", ""]
    lines += notes(data)
    return "\n".join(lines) + "\n"


def notes(data: dict) -> list[str]:
    """What the tables do not say: configs/paper.yaml's gaps, the runner, the judge."""
    out = ["## Notes", ""]
    missing = data.get("missing_from_configs_paper_yaml")
    if missing:
        out.append("- configs/paper.yaml lacks keys that dvc.yaml's stages declare, so `cp "
                   "configs/paper.yaml params.yaml && make repro` stops at the first stage that "
                   "reads one (`Parameters '...' are missing from 'params.yaml'`); this run "
                   "filled them with their class defaults: "
                   + ", ".join(f"`{k}`" for k in missing) + ".")
    pipe = data.get("pipeline") or {}
    if pipe.get("runner") == "commands":
        out.append(f"- DVC did not run here ({data.get('dvc', 'not tried')}): the stages ran as "
                   "dvc.yaml's commands in the DAG's order.")
    h = data.get("dvc_hash")
    if h:
        out.append(f"- md5 (DVC's output hash) ran at {h['MBps']} MB/s over {h['bytes'] / 1e9:.2f}"
                   " GB of the store, from the page cache.")
    out.append("- The judge is the local backend with this run's model (random weights: its "
               "answers are unparseable, the timing is real); configs/paper.yaml leaves "
               "`judge:` at its defaults (the embedded SmolLM2 on the CPU), the paper used an "
               "external LLM.")
    out.append("- build-posthoc-trees, the exports and check-params have no device key: they run "
               "on the CPU whatever the device.")
    return out + [""]


def _duration(seconds) -> str:
    if seconds is None:
        return ""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["collect", "counts", "du", "markdown", "md5_rate", "notes", "paper_counts",
           "project", "stage_records"]
