"""The paper's configuration, every stage, on random weights: a paper-shaped dry run (issue 24).

On a GPU machine, from the repository root (about 5 minutes on one H100; --time-limit is a hard
limit, and what ran by then is reported):

    python benchmarks/paper_dry_run.py --out "$OUT/dry_run"

On the CPU at toy sizes (tests/test_paper_dry_run.py runs this, so it cannot rot):

    python benchmarks/paper_dry_run.py --small --out /tmp/dry_run

What it does, in order (benchmarks/paper_dry_run_assets.py builds the inputs,
benchmarks/paper_dry_run_report.py the tables):

1. store: writes rows of the paper's width (d 2304) in bfloat16 through the store's own writer
   (hsae_core.data.store.StoreWriter, configs/paper.yaml's chunk and shard sizes) and reads
   them back with the training and evaluation readers: write and read GB/s;
2. assets: a Gemma2ForCausalLM with gemma-2-2b's published dimensions (2.61B parameters,
   d 2304, 26 layers) and random bfloat16 weights, built on the device and saved as a local
   model folder with a word-level tokenizer; a generated .jsonl corpus with topic labels;
3. a temp project (hsae_core, stages, dvc.yaml copied; a git + DVC repository) whose
   params.yaml is configs/paper.yaml with that model and corpus, the paper's levels (2048..16384),
   L0 50, a bfloat16 store, ``device`` set to the run's device in every section, and token counts
   scaled to fit (paper_dry_run_assets.PAPER; the JSON lists every key that differs from
   configs/paper.yaml);
4. every stage of dvc.yaml, unchanged: ``python -m dvc repro`` when DVC imports, else the same
   stage commands in the DAG's order (``--runner``; the JSON says which ran). Each stage's
   process is observed by benchmarks/paper_dry_run_hook/sitecustomize.py: wall time, imports,
   model loading, CUDA and host peak memory;
5. per stage the work's rate (tokens/s, or pairs/s for the judge) and from it a projection of
   the paper's full run (100M training tokens): wall time per stage and disk, marked as a
   projection from measured rates.

Writes ``paper_dry_run.json`` (rewritten after every phase, so a run cut short keeps what it
measured), ``paper_dry_run.md`` (the tables), ``pipeline.log`` (its last 2 MB) and
``nvidia-smi.txt`` into ``--out``; the model, corpus and project go to ``--work`` (default: a
temp folder, removed at the end unless ``--keep``). Exit status 0 when every stage ran.

Dependencies: what the stages need. A GPU machine without zarr, numcodecs, DVC or umap-learn
gets them as wheels (scripts/gpu_wheels.sh downloads them; docs/gpu-and-scaling.md, "Next GPU
session", has the one command that installs them and runs this).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "benchmarks" / "paper_dry_run_hook"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import paper_dry_run_report as report  # noqa: E402
from paper_dry_run_assets import (  # noqa: E402
    PAPER,
    SMALL,
    Scale,
    dry_params,
    write_corpus,
    write_model,
)

LOG_TAIL = 2 << 20


# ---------------------------------------------------------------- the stages' order

def stages_of(dvc_yaml: Path) -> dict[str, dict]:
    """dvc.yaml's stages: ``{name: {"cmd", "deps", "outs"}}`` in file order."""
    def paths(items) -> list[str]:
        return [i if isinstance(i, str) else next(iter(i)) for i in items or []]

    return {name: {"cmd": st["cmd"], "deps": paths(st.get("deps")),
                   "outs": paths(st.get("outs"))}
            for name, st in yaml.safe_load(dvc_yaml.read_text())["stages"].items()}


def _under(a: str, b: str) -> bool:
    """``a`` is ``b`` or inside it, or ``b`` inside ``a``."""
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def dag_order(stages: dict[str, dict]) -> list[str]:
    """The stages in an order where each runs after every stage whose outputs it reads (file
    order among those ready): the order the command runner uses."""
    needs = {n: {m for m in stages if m != n
                 and any(_under(d, o) for d in st["deps"] for o in stages[m]["outs"])}
             for n, st in stages.items()}
    order: list[str] = []
    while len(order) < len(stages):
        ready = [n for n in stages if n not in order and needs[n] <= set(order)]
        if not ready:
            raise ValueError(f"dvc.yaml has a cycle among {sorted(set(stages) - set(order))}")
        order.append(ready[0])
    return order


# ---------------------------------------------------------------- store write / read

def store_bench(folder: Path, rows: int, d_model: int, dtype: str, chunk_bytes: int,
                shard_bytes: int) -> dict:
    """Write ``rows`` train rows (and rows // 8 eval rows) of width ``d_model`` through
    StoreWriter, timing the writes alone (rows made beforehand), then read them back with
    TrainActivations (shuffled batches of 1024) and EvalActivations (in order): GB/s of stored
    bytes. Reads come from the page cache, as later epochs of a store that fits in RAM do."""
    from reader import WholeShards, rate

    from hsae_core.data.reader import EvalActivations, TrainActivations
    from hsae_core.data.store import COLUMNS, Layout, StoreWriter, open_store, to_storage

    layout = Layout.from_bytes(d_model, dtype, chunk_bytes, shard_bytes)
    path = folder / "bench.zarr"
    gen = torch.Generator().manual_seed(0)
    block = to_storage(torch.randn(min(rows, layout.shard_rows), d_model, generator=gen), dtype)
    itemsize = block.dtype.itemsize
    writer = StoreWriter(path, layout, {"benchmark": True})
    written, t_write = 0, 0.0
    for split, n in (("train", rows), ("eval", rows // 8)):
        for start in range(0, n, layout.shard_rows):
            k = min(layout.shard_rows, n - start)
            cols = {c: np.arange(start, start + k).astype(t) for c, t in COLUMNS.items()}
            cols["outlier"] = np.zeros(k, np.uint8)
            t = time.perf_counter()
            writer.write_shard(split, start, block[:k], cols)
            t_write += time.perf_counter() - t
            written += k
        writer.mark(split, n, max_doc_id=n - 1, done=True)
    writer.write_documents(np.zeros(1), np.zeros(1), [])
    t = time.perf_counter()
    writer.commit({"model": "random", "layer": 0, "d_model": d_model, "dtype": dtype,
                   "n_tokens": {"train": rows, "eval": rows // 8},
                   "chunk_rows": layout.chunk_rows, "shard_rows": layout.shard_rows})
    t_write += time.perf_counter() - t
    store = open_store(path)
    gb = lambda n: n * d_model * itemsize / 1e9  # noqa: E731
    out = {"rows": written, "d_model": d_model, "dtype": dtype, "chunk_rows": layout.chunk_rows,
           "shard_rows": layout.shard_rows, "bytes_stored": report.du(path),
           "write_s": round(t_write, 3), "write_GBps": round(gb(written) / t_write, 3)}
    for name, reader, n in (
            ("read_whole_shards", WholeShards(store), rows),
            ("read_train_batches", TrainActivations(store, 1.0, batch_size=1024), rows),
            ("read_eval_batches", EvalActivations(store, 1.0, batch_size=1024), rows // 8)):
        tokens_per_s, _ = rate(reader)
        out[f"{name}_GBps"] = round(gb(tokens_per_s), 3)
        out[f"{name}_tokens_per_s"] = round(tokens_per_s)
    shutil.rmtree(path)
    return out


# ---------------------------------------------------------------- the temp project

def make_project(root: Path, params: dict, use_git: bool) -> None:
    """The pipeline (hsae_core, stages, dvc.yaml) in ``root`` with ``params``: a git + DVC
    repository, or DVC alone (``dvc init --no-scm``) on a machine without git."""
    root.mkdir(parents=True)
    for name in ("hsae_core", "stages"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if use_git:
        for args in (["init", "-q"], ["config", "user.email", "dry-run@example.com"],
                     ["config", "user.name", "dry-run"]):
            subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def dvc_init(root: Path, env: dict, use_git: bool) -> bool:
    cmd = [sys.executable, "-m", "dvc", "init", "-q"] + ([] if use_git else ["--no-scm"])
    subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, text=True)
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")
    if use_git:
        subprocess.run(["git", "add", "-A"], cwd=root, check=True, capture_output=True)
        subprocess.run(["git", "commit", "-q", "-m", "paper dry run"], cwd=root, check=True,
                       capture_output=True)
    return True


def dvc_available(env: dict) -> tuple[bool, str]:
    proc = subprocess.run([sys.executable, "-m", "dvc", "--version"], env=env,
                          capture_output=True, text=True)
    why = (proc.stdout.strip() or proc.stderr.strip().splitlines()[-1:] or ["?"])
    return proc.returncode == 0, why if isinstance(why, str) else why[0]


def stage_env(stats: Path, small: bool) -> dict:
    """The stages' environment: this interpreter first on PATH, the hook first on PYTHONPATH
    (before the carried wheels), DVC's analytics off (no network). At toy sizes one thread
    (unless OMP_NUM_THREADS says otherwise): on a shared 2-core machine, two threads made the
    toy HSAE's 40 steps take 39 s instead of 2 s."""
    env = dict(os.environ)
    if small:
        env.setdefault("OMP_NUM_THREADS", "1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOOK), env.get("PYTHONPATH")) if p)
    env |= {"HSAE_DRY_RUN_STATS": str(stats), "DVC_NO_ANALYTICS": "1",
            "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return env


def run_logged(cmd, cwd: Path, env: dict, log, deadline: float, shell: bool = False) -> dict:
    """Run ``cmd`` in its own process group, output appended to ``log``; killed (the whole
    group) at ``deadline``."""
    t0 = time.perf_counter()
    log.write(f"\n$ {cmd if shell else ' '.join(map(str, cmd))}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            shell=shell, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = proc.returncode
    return {"rc": rc, "timed_out": timed_out, "wall_s": round(time.perf_counter() - t0, 2)}


def run_pipeline(project: Path, runner: str, env: dict, log_path: Path, deadline: float) -> dict:
    """Every stage: ``dvc repro`` or the stage commands in the DAG's order."""
    stages = stages_of(project / "dvc.yaml")
    with log_path.open("a") as log:
        if runner == "dvc":
            res = run_logged([sys.executable, "-m", "dvc", "repro"], project, env, log,
                             deadline)
            lock = project / "dvc.lock"
            done = set(yaml.safe_load(lock.read_text())["stages"]) if lock.is_file() else set()
            res["completed"] = [n for n in stages if n in done]
        else:
            res = {"rc": 0, "timed_out": False, "wall_s": 0.0, "completed": []}
            for name in dag_order(stages):
                one = run_logged(stages[name]["cmd"], project,
                                 env | {"HSAE_DRY_RUN_STAGE": name}, log, deadline, shell=True)
                res["wall_s"] = round(res["wall_s"] + one["wall_s"], 2)
                if one["rc"] != 0 or one["timed_out"]:
                    res |= {"rc": one["rc"], "timed_out": one["timed_out"]}
                    break
                res["completed"].append(name)
    res["runner"] = runner
    res["order"] = list(stages) if runner == "dvc" else dag_order(stages)
    return res


# ---------------------------------------------------------------- the run

class Run:
    """The JSON report, rewritten after every phase."""

    def __init__(self, out: Path, data: dict):
        self.out, self.data = out, data
        self.save()

    def save(self) -> None:
        (self.out / "paper_dry_run.json").write_text(
            json.dumps(self.data, indent=2, default=str) + "\n")

    def phase(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            value = fn(*args, **kwargs)
            self.data.setdefault("phases", {})[name] = {
                "status": "done", "wall_s": round(time.perf_counter() - t0, 2)}
            return value
        except Exception as err:  # noqa: BLE001 - reported; later phases may still run
            self.data.setdefault("phases", {})[name] = {
                "status": "failed", "wall_s": round(time.perf_counter() - t0, 2),
                "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            print(f"paper_dry_run: {name} failed: {type(err).__name__}: {err}", flush=True)
            return None
        finally:
            self.save()


def environment(device: str) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "cpus": os.cpu_count(),
           "git": shutil.which("git") is not None, "host": platform.node()}
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env |= {"gpu": p.name, "gpu_memory_GiB": round(p.total_memory / 2**30, 1),
                "cuda": torch.version.cuda}
    for name in ("zarr", "numcodecs", "dvc", "dvclive", "umap"):
        try:
            module = __import__(name)
            env[name] = f"{getattr(module, '__version__', '?')} " \
                        f"({Path(module.__file__).parent.parent})"
        except Exception as err:  # noqa: BLE001 - a missing package is a finding
            env[name] = f"missing: {type(err).__name__}: {err}"
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the JSON, tables, log")
    ap.add_argument("--small", action="store_true", help="toy sizes (the CPU run of the tests)")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (default with --small)")
    ap.add_argument("--runner", choices=("auto", "dvc", "commands"), default="auto",
                    help="auto: dvc repro when DVC imports, else the stage commands")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds for the whole run (default 300, 240 with --small)")
    ap.add_argument("--work", type=Path, default=None, help="folder for model, corpus, project")
    ap.add_argument("--keep", action="store_true", help="keep --work (default: removed)")
    ap.add_argument("--modules", action="store_true",
                    help="record the modules each stage imported, and from where")
    args = ap.parse_args(argv)
    scale: Scale = SMALL if args.small else PAPER
    if args.small and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    device = args.device or ("cpu" if args.small else "cuda")
    limit = args.time_limit or (240.0 if args.small else 300.0)
    start = time.time()
    deadline = start + limit
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="hsae-dry-run-"))
    work.mkdir(parents=True, exist_ok=True)
    stats = work / "stats"
    stats.mkdir(exist_ok=True)
    if not args.small:
        smi = subprocess.run("nvidia-smi", shell=True, capture_output=True, text=True)
        (args.out / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)

    run = Run(args.out, {"issue": 24, "mode": scale.name, "device": device,
                         "started": datetime.datetime.now().isoformat(timespec="seconds"),
                         "time_limit_s": limit, "work": str(work),
                         "environment": environment(device)})
    print(f"paper_dry_run: {scale.name} sizes on {device}, limit {limit:.0f} s, work {work}",
          flush=True)
    try:
        ex = dry_params(scale, "MODEL", "CORPUS", device)[0]["extract"]
        run.data["store_bench"] = run.phase(
            "store_bench", store_bench, work, scale.store_bench_rows, scale.model["hidden_size"],
            ex["dtype"], ex["chunk_bytes"], ex["shard_bytes"])
        model = run.phase("model", write_model, work / "model", scale,
                          device if device.startswith("cuda") else "cpu")
        corpus = run.phase("corpus", write_corpus, work / "corpus.jsonl", scale)
        run.data["assets"] = {"model": model, "corpus": corpus}
        if model is None or corpus is None:
            return finish(run, work, args, ok=False)
        params, overrides, filled = dry_params(scale, model["path"], corpus["path"], device)
        run.data["params"], run.data["overrides_of_configs_paper_yaml"] = params, overrides
        # keys dvc.yaml's stages declare that configs/paper.yaml lacks: `cp configs/paper.yaml
        # params.yaml && make repro` stops at the first stage that reads one
        run.data["missing_from_configs_paper_yaml"] = filled
        env = stage_env(stats, args.small)
        if args.modules:
            env["HSAE_DRY_RUN_MODULES"] = "1"
        use_git = shutil.which("git") is not None
        runner = args.runner
        if runner != "commands":
            ok, why = dvc_available(env)
            run.data["dvc"] = why
            if not ok and runner == "dvc":
                raise SystemExit(f"paper_dry_run: --runner dvc, but DVC does not run: {why}")
            runner = "dvc" if ok else "commands"
        project = work / "project"
        run.phase("project", make_project, project, params, use_git)
        if runner == "dvc" and run.phase("dvc_init", dvc_init, project, env, use_git) is None:
            runner = "commands"
        print(f"paper_dry_run: running every stage ({runner})", flush=True)
        pipe = run.phase("pipeline", run_pipeline, project, runner, env, work / "pipeline.log",
                         deadline - 15)
        run.data["pipeline"] = pipe
        if pipe and pipe["runner"] == "dvc" and (project / "data" / "activations.zarr").exists():
            run.data["dvc_hash"] = run.phase("dvc_hash_rate", report.md5_rate,
                                             project / "data" / "activations.zarr")
        run.data["stages"] = run.phase("collect", report.collect, project, stats, pipe, params)
        run.data["projection"] = run.phase("projection", report.project, run.data, scale)
        ok = bool(pipe) and pipe["rc"] == 0 and not pipe["timed_out"] and len(
            pipe["completed"]) == len(pipe["order"])
        return finish(run, work, args, ok=ok)
    except BaseException:
        run.data["error"] = traceback.format_exc()
        finish(run, work, args, ok=False)
        raise


def finish(run: Run, work: Path, args, ok: bool) -> int:
    run.data["ok"] = ok
    run.data["wall_s"] = round(time.time() - datetime.datetime.fromisoformat(
        run.data["started"]).timestamp(), 1)
    log = work / "pipeline.log"
    if log.is_file():
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - LOG_TAIL))
            (args.out / "pipeline.log").write_bytes(f.read())
    run.save()
    (args.out / "paper_dry_run.md").write_text(report.markdown(run.data))
    print(report.markdown(run.data), flush=True)
    print(f"paper_dry_run: {'every stage ran' if ok else 'NOT every stage ran'} "
          f"({run.data['wall_s']:.0f} s); {args.out / 'paper_dry_run.json'}", flush=True)
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
