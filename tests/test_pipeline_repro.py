"""A real `dvc repro` of a micro configuration in a temporary git repo, then the behaviour a user
relies on: nothing re-runs when nothing changed, an ablation (`dvc exp run -S hierarchy.rho=...`)
re-runs only train-hsae and compute-metrics, and `dvc metrics diff` shows what it changed."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import yaml

from tests.pipeline_helpers import (
    dvc,
    env,
    git,
    micro_assets,
    micro_params,
    micro_project,
    ran_stages,
)

ALL = {"extract-activations", "normalize", "train-hsae", "train-baselines", "build-posthoc-trees",
       "compute-metrics", "export-saelens", "collect-evidence", "judge", "report"}


def test_repro_ablation_and_metrics_diff(tmp_path):
    model, corpus = micro_assets(tmp_path / "assets")
    params = micro_params(model, corpus)
    root = micro_project(tmp_path / "project", params)

    assert ran_stages(dvc(root, "repro").stdout) == ALL
    metrics = json.loads((root / "metrics" / "metrics.json").read_text())
    for name in ("hsae", "posthoc"):
        for l in range(4):
            level = metrics[name][f"level{l}"]
            assert 0 < level["l0"] < 8 and level["fve"] < 1 and 0 <= level["dead_frac"] <= 1
            assert math.isfinite(level["lm_loss"]) and math.isfinite(level["lm_loss_recovered"])
        for l in range(3):
            assert metrics[name][f"pair{l}"]["children_assigned"] > 0
            assert metrics[name][f"pair{l}"]["hamming"] >= 0
    assert metrics["eval_tokens"] > 0 and metrics["lm"]["tokens"] >= 120
    for name in ("hsae", "posthoc"):  # intervals, robust forms, the train-stream dead fraction
        mean = metrics[name]["mean"]
        for key in ("hamming", "hamming_per_parent", "p_parent_given_child_pooled", "fve"):
            assert mean[f"{key}_lo"] <= mean[f"{key}_hi"], key
        assert 0 <= metrics[name]["level0"]["dead_frac_train"] <= 1
    assert {"hamming", "hamming_lo", "hamming_hi"} <= set(metrics["diff"])
    shown = json.loads(dvc(root, "metrics", "show", "--json").stdout)
    assert "hsae" in json.dumps(shown) and "p_parent_given_child" in json.dumps(shown)
    plots = json.loads(dvc(root, "plots", "show", "--json").stdout)
    assert not plots.get("errors") and len(plots["data"]) == 6
    curve = (root / "plots" / "train" / "hsae" / "level3.tsv").read_text().splitlines()
    assert curve[0].split("\t")[:2] == ["step", "loss"] and len(curve) == 1 + 40 // 5

    assert ran_stages(dvc(root, "repro").stdout) == set()

    # a sae: change invalidates both trainings (and, through their outputs, what follows),
    # never the data stages
    changed = dict(params, sae=params["sae"] | {"lr": 1e-3})
    (root / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    assert (set(json.loads(dvc(root, "status", "--json").stdout))
            == {"train-hsae", "train-baselines"})
    git(root, "checkout", "params.yaml")

    git(root, "add", "dvc.lock", "metrics", "plots")
    git(root, "commit", "-q", "-m", "reference run")
    assert ran_stages(dvc(root, "exp", "run", "-S", "hierarchy.rho=0.5").stdout) == {
        "train-hsae", "compute-metrics", "export-saelens", "collect-evidence", "judge", "report"}
    diff = json.loads(dvc(root, "metrics", "diff", "--json").stdout)["metrics/metrics.json"]
    assert any(k.startswith("hsae.pair") for k in diff)
    assert not [k for k in diff if k.startswith("posthoc.")]  # the baseline was not retrained

    table = subprocess.run([sys.executable, "-m", "stages.ablations", "table"], cwd=root,
                           env=env(), capture_output=True, text=True, check=True).stdout
    assert "(reference)" in table and "hierarchy.rho=0.5" in table
