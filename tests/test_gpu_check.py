"""benchmarks/gpu_check.py at toy sizes on the CPU, as CI runs it (issue 17), so the one command
a GPU machine runs cannot rot: every phase runs, the CUDA-marked correctness tests pass on the
CPU, the JSON holds what a GPU run reports, and nothing outside torch and the repository gets
imported (a GPU machine has no zarr, dvc, pydantic or gguf). Timings are recorded, never
checked. The step time runs at two batches (issue 23: 1,024 and 4,096 at the paper's sizes; 128
and 512 here), and the second batch's numbers must be in the report."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: In the order they run: the goal batch's step times first, the second batch's after training.
PHASES = ["correctness", "step_time_fp32", "step_time_bf16", "profile", "train",
          "step_time_fp32_b512", "step_time_bf16_b512", "crossover"]


def _gpu_check():
    """benchmarks/gpu_check.py as a module (shared with tests/test_sync_count.py)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check",
                                                      ROOT / "benchmarks" / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def test_gpu_check_runs_every_phase_on_the_cpu(tmp_path):
    out = tmp_path / "gpucheck"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--small",
                           "--out", str(out), "--time-limit", "200"],
                          cwd=ROOT, capture_output=True, text=True, timeout=260)
    assert (out / "gpu_check.json").exists(), proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report["phases"]) == PHASES
    assert all(p["status"] == "done" for p in report["phases"].values()), report["phases"]
    assert "gpu_check:" in (out / "gpu_check.log").read_text()
    assert report["heavy_modules_loaded"] == []
    assert proc.returncode == (0 if report["ok"] else 1)

    core = report["correctness"]["core"]
    assert report["checks"]["correctness"] is True, core["failed"]
    assert len(core["passed"]) >= 15 and not core["skipped"]
    assert report["checks"]["sync_tests"] is True

    assert report["sizes"]["step_time_batches"] == [128, 512]
    for mode in ("fp32", "bf16"):
        for key, batch in ((f"step_time_{mode}", 128), (f"step_time_{mode}_b512", 512)):
            st = report[key]
            assert st["mode"] == mode and st["batch"] == batch, key
            for name in ("hsae", "independent", "dense"):
                assert st[name]["ms_per_step"] > 0 and st[name]["tokens_per_s"] > 0
                assert "peak_mib" in st[name]  # None on the CPU
            assert st["ratio"] > 0 and all(st["forest_assigned"])
            assert st["hsae_over_dense"] > 0 and len(st["dense"]["l0"]) == 4
    goals = report["goals"]
    assert goals["batch"] == 128 and goals["hsae_tokens_per_s"]["batch"] == 128
    assert goals["hsae_tokens_per_s"]["goal"] == 250_000  # at the goal batch only
    assert goals["hsae_over_independent"]["goal"] == 1.25  # issue 23
    assert set(goals["hsae_over_dense"]) == {"fp32", "bf16", "goal", "met"}
    beside = goals["other_batches"]["b512"]  # the second batch, judged against nothing
    for what in ("hsae_tokens_per_s", "hsae_over_independent", "hsae_over_dense"):
        assert set(beside[what]) == {"fp32", "bf16"} and all(
            v > 0 for v in beside[what].values()), what
    assert beside["hsae_tokens_per_s"]["bf16"] == report["step_time_bf16_b512"]["hsae"][
        "tokens_per_s"]

    prof = report["profile"]
    assert 0 < prof["syncs_per_step_patched"] <= 34
    assert any("sparse_ops.py" in site for site in prof["syncs_by_site_patched"])
    assert len(prof["top_kernels"]) == 10 and prof["aten_ops_per_step"] > 0
    ab = prof["pair_index_ab"]  # issue 23: one pass against pair by pair, same trainer
    assert ab["one_pass_ops"] < ab["pair_by_pair_ops"] and ab["steps_each"] == prof["steps"]
    assert ab["one_pass_ms"] > 0 and ab["pair_by_pair_ms"] > 0

    train = report["train"]
    assert train["completed"] and train["steps_done"] == train["steps"] == 600
    assert report["checks"]["train_finite"] is True
    assert len(train["l0_end"]) == 4 and train["hierarchy_updates"] == 3
    assert train["stream_true_features_per_token"] > 1.7 * train["target_l0"]
    assert isinstance(report["checks"]["train_l0_within_2pct"], bool)

    rows = report["crossover"]["rows"]
    assert len(rows) == 3 and all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 for r in rows)


def test_paper_sizes_time_both_batches_in_priority_order():
    """At the paper's sizes on CUDA: batch 1,024 in fp32 and bf16 first, then the profile and
    training, then 4,096, the crossover, and TF32 last (nothing runs: the plan only)."""
    gc = _gpu_check()
    args = gc.parse(["--out", "unused"])
    assert args.batches == [1024, 4096] and not args.small
    args.device = "cuda"  # the plan only: no CUDA needed
    assert [name for name, _, _ in gc.plan(args, None, gc.PAPER)] == [
        "correctness", "step_time_fp32", "step_time_bf16", "profile", "train",
        "step_time_fp32_b4096", "step_time_bf16_b4096", "crossover",
        "step_time_tf32", "step_time_tf32_b4096"]
    skip = gc.parse(["--out", "x", "--skip", "correctness,step_time_bf16_b4096"])
    skip.device = "cuda"
    names = [name for name, _, _ in gc.plan(skip, None, gc.PAPER)]
    assert names[:2] == ["step_time_fp32", "step_time_bf16"] and len(names) == 8
    assert "step_time_fp32_b4096" in names and "step_time_bf16_b4096" not in names
    assert gc.parse(["--out", "x", "--small"]).batches == [128, 512]
    assert gc.parse(["--out", "x", "--batches", "4096,1024,4096"]).batches == [4096, 1024]


def _timing(mode, batch, tokens, ratio, over_dense):
    return {"mode": mode, "batch": batch, "ratio": ratio, "hsae_over_dense": over_dense,
            "hsae": {"tokens_per_s": tokens, "peak_mib": 100.0}}


def test_goals_judge_batch_1024_and_report_4096_beside():
    gc = _gpu_check()
    report = {"step_time_fp32": _timing("fp32", 1024, 30_000, 1.8, 0.9),
              "step_time_bf16": _timing("bf16", 1024, 260_000, 1.2, 0.8),
              "step_time_bf16_b4096": _timing("bf16", 4096, 900_000, 2.0, 1.5),
              "step_time_fp32_b4096": _timing("fp32", 4096, 90_000, 1.1, 0.5),
              "train": {"tokens_per_s": 1}}
    goals = gc.goals(report, 1024)
    tps = goals["hsae_tokens_per_s"]
    assert (tps["best"], tps["mode"], tps["batch"], tps["met"]) == (260_000, "bf16", 1024, True)
    assert goals["hsae_over_independent"] == {"fp32": 1.8, "bf16": 1.2, "goal": 1.25,
                                              "met": False}
    assert goals["hsae_over_dense"]["met"] is True  # batch 4,096's 1.5 is not judged
    assert goals["other_batches"] == {"b4096": {
        "hsae_tokens_per_s": {"bf16": 900_000, "fp32": 90_000},
        "hsae_over_independent": {"bf16": 2.0, "fp32": 1.1},
        "hsae_over_dense": {"bf16": 1.5, "fp32": 0.5},
        "hsae_peak_mib": {"bf16": 100.0, "fp32": 100.0}}}
    # a report without the second batch has nothing beside the goals
    del report["step_time_bf16_b4096"], report["step_time_fp32_b4096"]
    assert gc.goals(report, 1024)["other_batches"] == {}
    assert gc.parse_key("step_time_tf32_b4096", 1024) == ("tf32", 4096)
    assert gc.phase_name("bf16", 1024, 1024) == "step_time_bf16"
