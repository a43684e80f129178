"""A real `dvc repro` of a micro configuration in a temporary git repo, then the behaviour a user
relies on: nothing re-runs when nothing changed, an ablation typed as the README shows it
(`dvc exp run -S rho=...`, `-S r=...`) re-runs the HSAE's side alone, `dvc metrics diff` shows
what it changed, the training curves are DVCLive's, and an unknown key stops the pipeline before
any output is touched."""

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

ALL = {"check-params", "extract-activations", "normalize", "train-hsae", "train-baselines",
       "build-posthoc-trees", "compute-metrics", "export-hsae", "export-baseline", "evidence-hsae",
       "evidence-baseline", "judge-hsae", "judge-baseline", "report",
       # issue 26's third arm
       "train-matryoshka", "build-matryoshka-forest", "export-matryoshka",
       "evidence-matryoshka"}
#: What an ablation of rho or r re-runs: the HSAE's side (check-params sees the new params.yaml).
HSAE_SIDE = {"check-params", "train-hsae", "compute-metrics", "export-hsae", "evidence-hsae",
             "judge-hsae", "report"}


def test_repro_ablation_and_metrics_diff(tmp_path):
    model, corpus = micro_assets(tmp_path / "assets")
    params = micro_params(model, corpus)
    root = micro_project(tmp_path / "project", params)

    assert ran_stages(dvc(root, "repro").stdout) == ALL
    metrics = json.loads((root / "metrics" / "metrics.json").read_text())
    for name in ("hsae", "posthoc", "matryoshka"):
        for l in range(4):
            level = metrics[name][f"level{l}"]
            assert 0 < level["l0"] < 8 and level["fve"] < 1 and 0 <= level["dead_frac"] <= 1
            assert math.isfinite(level["lm_loss"]) and math.isfinite(level["lm_loss_recovered"])
        for l in range(3):
            assert metrics[name][f"pair{l}"]["children_assigned"] > 0
            assert metrics[name][f"pair{l}"]["hamming"] >= 0
    assert metrics["eval_tokens"] > 0 and metrics["lm"]["tokens"] >= 120
    # the Matryoshka's L0 is per group (BatchTopK's k = 4 x 3 spread over them), its FVE per
    # prefix: non-decreasing as groups are added
    mat = metrics["matryoshka"]
    assert abs(sum(mat[f"level{l}"]["l0"] for l in range(4)) - 12) < 6
    fves = [mat[f"level{l}"]["fve"] for l in range(4)]
    assert all(a <= b + 1e-6 for a, b in zip(fves, fves[1:])), fves
    for name in ("hsae", "posthoc", "matryoshka"):  # intervals, robust forms, train-stream dead
        mean = metrics[name]["mean"]
        assert list(mean)[:9] == ["hamming", "hamming_lo", "hamming_hi", "p_pc", "p_pc_lo",
                                  "p_pc_hi", "p_cp", "p_cp_lo", "p_cp_hi"]
        for key in ("hamming", "hamming_per_parent", "p_pc_pooled", "fve"):
            assert mean[f"{key}_lo"] <= mean[f"{key}_hi"], key
        assert 0 <= metrics[name]["level0"]["dead_frac_train"] <= 1
    for diff in ("diff", "diff_matryoshka", "diff_matryoshka_posthoc"):
        assert {"hamming", "hamming_lo", "hamming_hi"} <= set(metrics[diff])
    assert math.isclose(metrics["diff_matryoshka"]["hamming"], metrics["hsae"]["mean"]["hamming"]
                        - metrics["matryoshka"]["mean"]["hamming"], rel_tol=1e-9, abs_tol=1e-12)
    headline = json.loads((root / "metrics" / "headline.json").read_text())
    assert list(headline["hsae"]) == ["hamming", "p_pc", "p_cp", "fve", "l0"]
    assert headline["delta"]["hamming"] == metrics["diff"]["hamming"]
    assert headline["delta_matryoshka"]["hamming"] == metrics["diff_matryoshka"]["hamming"]
    assert {"hsae", "posthoc", "matryoshka"} <= set(headline)
    exported = json.loads((root / "data" / "export" / "matryoshka" / "export.json").read_text())
    assert exported["kind"] == "matryoshka"
    assert (root / "data" / "report" / "site" / "index.html").is_file()
    shown = dvc(root, "metrics", "show").stdout
    assert shown.index("metrics/headline.json") < shown.index("metrics/metrics.json")
    # DVCLive's curves: latest values for `dvc exp show`, one TSV per quantity for `dvc plots`
    for name in ("hsae", "baseline"):
        latest = json.loads((root / "dvclive" / name / "metrics.json").read_text())
        assert latest["step"] == 40 and 0 < latest["train"][name]["level3"]["l0"] < 64
        curve = (root / "dvclive" / name / "plots" / "metrics" / "train" / name / "level3"
                 / "l0.tsv").read_text().splitlines()
        assert curve[0].split("\t") == ["step", "l0"] and len(curve) == 1 + 40 // 5
    plots = json.loads(dvc(root, "plots", "show", "--json").stdout)
    assert not plots.get("errors"), plots.get("errors")
    drawn = json.dumps(plots["data"])
    assert all(f"{m}/plots/metrics/train/{m}/level3/l0.tsv" in drawn for m in ("hsae", "baseline"))
    assert (root / "data" / "report" / "figures" / "fig_training.png").stat().st_size > 1000

    assert ran_stages(dvc(root, "repro").stdout) == set()

    # a sae: change invalidates both trainings (and, through their outputs, what follows) and
    # check-params (which reads every key), never the data stages
    changed = dict(params, sae=params["sae"] | {"lr": 1e-3})
    (root / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    assert (set(json.loads(dvc(root, "status", "--json").stdout))
            == {"check-params", "train-hsae", "train-baselines", "train-matryoshka"})
    # the Matryoshka's own knobs re-run its side alone
    changed = dict(params, matryoshka=params["matryoshka"] | {"lr": 1e-3})
    (root / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    assert (set(json.loads(dvc(root, "status", "--json").stdout))
            == {"check-params", "train-matryoshka"})
    git(root, "checkout", "params.yaml")

    # an unknown or misspelt key stops the pipeline in check-params, naming it, and no output
    # of any stage is removed
    def outs():  # check-params' own marker aside (DVC removes it before the check runs)
        return sorted(p for p in (root / "data").rglob("*")
                      if p.is_file() and p.name != "params.checked")

    before = outs()
    for override, named in (("+foo=1", "'foo'"), ("+hierarchy.rhoo=0.1", "hierarchy.rhoo")):
        failed = dvc(root, "exp", "run", "-S", override, check=False)
        assert failed.returncode != 0 and named in failed.stdout + failed.stderr, failed
        git(root, "checkout", "params.yaml")
    assert outs() == before

    git(root, "add", "dvc.lock", "metrics", "dvclive")
    git(root, "commit", "-q", "-m", "reference run")
    for override in ("rho=0.5", "r=0.2"):  # typed as the README shows them
        assert ran_stages(dvc(root, "exp", "run", "-S", override).stdout) == HSAE_SIDE, override
        diff = json.loads(dvc(root, "metrics", "diff", "--json").stdout)
        changed = [f"{path}:{key}" for path, keys in diff.items() for key in keys]
        assert any(":hsae.pair" in k for k in changed)
        # the baseline was neither retrained nor re-evaluated
        assert not [k for k in changed if ":posthoc." in k or "baseline" in k], changed
        # nor was the Matryoshka (only its differences from the HSAE move)
        assert not [k for k in changed if ":matryoshka." in k or "diff_matryoshka_posthoc" in k
                    or "dvclive/matryoshka" in k], changed

    table = subprocess.run([sys.executable, "-m", "stages.ablations", "table"], cwd=root,
                           env=env(), capture_output=True, text=True, check=True).stdout
    assert "(reference)" in table and "rho=0.5" in table and "r=0.2" in table
