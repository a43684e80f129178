"""benchmarks/gpu_check.py at toy sizes on the CPU, as CI runs it (issue 17), so the one command
a GPU machine runs cannot rot: every phase runs, the CUDA-marked correctness tests pass on the
CPU, the JSON holds what a GPU run reports, and nothing outside torch and the repository gets
imported (a GPU machine has no zarr, dvc, pydantic or gguf). Timings are recorded, never
checked."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = {"correctness", "step_time_fp32", "step_time_bf16", "profile", "train", "crossover"}


def test_gpu_check_runs_every_phase_on_the_cpu(tmp_path):
    out = tmp_path / "gpucheck"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--small",
                           "--out", str(out), "--time-limit", "200"],
                          cwd=ROOT, capture_output=True, text=True, timeout=260)
    assert (out / "gpu_check.json").exists(), proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert set(report["phases"]) == PHASES
    assert all(p["status"] == "done" for p in report["phases"].values()), report["phases"]
    assert "gpu_check:" in (out / "gpu_check.log").read_text()
    assert report["heavy_modules_loaded"] == []
    assert proc.returncode == (0 if report["ok"] else 1)

    core = report["correctness"]["core"]
    assert report["checks"]["correctness"] is True, core["failed"]
    assert len(core["passed"]) >= 15 and not core["skipped"]
    assert report["checks"]["sync_tests"] is True

    for mode in ("fp32", "bf16"):
        st = report[f"step_time_{mode}"]
        for name in ("hsae", "independent", "dense"):
            assert st[name]["ms_per_step"] > 0 and st[name]["tokens_per_s"] > 0
        assert st["ratio"] > 0 and all(st["forest_assigned"])
        assert st["hsae_over_dense"] > 0 and len(st["dense"]["l0"]) == 4
    assert report["goals"]["hsae_over_independent"]["goal"] == 1.25  # issue 23
    assert set(report["goals"]["hsae_over_dense"]) == {"fp32", "bf16", "goal", "met"}

    prof = report["profile"]
    assert 0 < prof["syncs_per_step_patched"] <= 34
    assert any("sparse_ops.py" in site for site in prof["syncs_by_site_patched"])
    assert len(prof["top_kernels"]) == 10 and prof["aten_ops_per_step"] > 0

    train = report["train"]
    assert train["completed"] and train["steps_done"] == train["steps"] == 600
    assert report["checks"]["train_finite"] is True
    assert len(train["l0_end"]) == 4 and train["hierarchy_updates"] == 3
    assert train["stream_true_features_per_token"] > 1.7 * train["target_l0"]
    assert isinstance(report["checks"]["train_l0_within_2pct"], bool)

    rows = report["crossover"]["rows"]
    assert len(rows) == 3 and all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 for r in rows)
