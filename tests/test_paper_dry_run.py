"""benchmarks/paper_dry_run.py at toy sizes on the CPU, as CI runs it (issue 24), so the command
a GPU machine runs cannot rot: a Gemma2 model built in process, a generated corpus,
configs/paper.yaml with a bfloat16 store, and every stage of dvc.yaml through a real `dvc repro`
in a temp project, each stage's timings, count and rate recorded, and the paper's run projected
from them. Timings are recorded, never checked. Also: the command runner's order (the GPU
machine's fallback when DVC does not import there) is a topological order of dvc.yaml, the
paper-sized params keep the paper's shape, and the wheel list the GPU command carries pins one
version of each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import paper_dry_run  # noqa: E402
from paper_dry_run_assets import GEMMA2_2B, PAPER, dry_params, missing_params  # noqa: E402

STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def test_small_dry_run_runs_every_stage_through_dvc(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "benchmarks/paper_dry_run.py", "--small", "--out",
                           str(out), "--work", str(tmp_path / "work"), "--runner", "dvc",
                           "--time-limit", "600"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert (out / "paper_dry_run.json").exists(), proc.stdout + proc.stderr
    report = json.loads((out / "paper_dry_run.json").read_text())
    assert proc.returncode == 0 and report["ok"], (proc.stdout[-3000:], proc.stderr[-3000:])
    assert all(p["status"] == "done" for p in report["phases"].values()), report["phases"]

    pipe = report["pipeline"]
    assert pipe["runner"] == "dvc" and pipe["rc"] == 0 and pipe["completed"] == STAGES
    params = report["params"]
    assert params["extract"]["dtype"] == "bfloat16" and params["sae"]["autocast_dtype"]
    assert all(params[s]["device"] == "cpu"
               for s in ("extract", "sae", "metrics", "evidence", "judge", "report"))
    assert report["assets"]["model"]["architecture"] == "Gemma2ForCausalLM"

    stages = report["stages"]
    assert list(stages) == STAGES
    for name, st in stages.items():
        assert st["status"] == "done", name
        assert st["wall_s"] > 0 and st["imports_s"] > 0 and st["peak_rss"] > 0, name
        assert not st.get("patch_errors"), (name, st.get("patch_errors"))
        if st["count"]:
            assert st["rate"] > 0, name
    assert stages["extract-activations"]["count"] == params["extract"]["max_tokens"]
    for name in ("extract-activations", "compute-metrics", "judge-hsae", "judge-baseline"):
        assert stages[name]["load_s"] > 0, name  # the model loaders were timed
    assert stages["report"]["fixed_s"] > 0  # the UMAP figures and the site
    assert stages["judge-hsae"]["unit"] == "pairs" and stages["judge-hsae"]["count"] > 0

    proj = report["projection"]
    assert proj["complete"] and proj["total_s"] > 0 and "PROJECTION" in proj["note"]
    assert set(STAGES) <= set(proj["stages"]) and "(dvc between stages)" in proj["stages"]
    assert proj["disk"]["store_bytes"] > 0
    sb = report["store_bench"]
    assert sb["write_GBps"] > 0 and sb["read_train_batches_GBps"] > 0
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    assert set(report["missing_from_configs_paper_yaml"]) == set(missing_params(paper))
    md = (out / "paper_dry_run.md").read_text()
    assert "PROJECTION" in md and "| report | done |" in md
    assert (out / "pipeline.log").stat().st_size > 0


def test_command_runner_order_is_topological_and_complete():
    stages = paper_dry_run.stages_of(ROOT / "dvc.yaml")
    order = paper_dry_run.dag_order(stages)
    assert sorted(order) == sorted(STAGES)
    done: set[str] = set()
    for name in order:
        for dep in stages[name]["deps"]:
            makers = [m for m in stages if m != name and any(
                paper_dry_run._under(dep, o) for o in stages[m]["outs"])]
            assert set(makers) <= done, (name, dep, makers)
        done.add(name)
    assert order[0] == "check-params" and order[-1] == "report"


def test_paper_params_keep_the_papers_shape():
    params, overrides, filled = dry_params(PAPER, "/m", "/c.jsonl", "cuda")
    assert GEMMA2_2B["hidden_size"] == 2304 and GEMMA2_2B["num_hidden_layers"] == 26
    assert params["sae"]["level_sizes"] == [2048, 4096, 8192, 16384]
    assert params["sae"]["target_l0"] == 50 and params["extract"]["dtype"] == "bfloat16"
    assert params["extract"]["layer"] == 13 and params["extract"]["context_len"] == 1024
    assert all(params[s]["device"] == "cuda"
               for s in ("extract", "sae", "metrics", "evidence", "judge", "report"))
    assert not missing_params(params)  # DVC finds every key a stage declares
    assert set(filled) == set(missing_params(
        yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())))
    assert "level_sizes" not in overrides.get("sae", {})


def test_carried_wheels_pin_one_version_each():
    lines = [line.strip() for line in (ROOT / "benchmarks" / "gpu_wheels.txt").read_text()
             .splitlines() if line.strip() and not line.startswith("#")]
    names = [line.split("==")[0].lower() for line in lines]
    assert all("==" in line for line in lines) and len(names) == len(set(names))
    for needed in ("zarr", "numcodecs", "google-crc32c", "donfig", "dvc", "dvclive",
                   "umap-learn", "pynndescent"):
        assert needed in names, needed
