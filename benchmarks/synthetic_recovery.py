"""HSAE against independent SAEs + post-hoc assignment on synthetic forests, over seeds.

    python benchmarks/synthetic_recovery.py                       # seeds 0-4, encoder similarity
    python benchmarks/synthetic_recovery.py --similarity coactivation --seeds 0,1,2,3,4
    python benchmarks/synthetic_recovery.py --leaf-only --parent-weight 0.8   # feature splitting
    python benchmarks/synthetic_recovery.py --d 64 --steps 3000 --rho 0.01
    python benchmarks/synthetic_recovery.py --set lambda_rate=0.02 --set threshold_lr_floor=0

The generator and the metrics are the recovery test's (tests/synthetic.py,
tests/test_core_recovery.py): a three-level forest whose child activity implies its parent's,
the learned features matched to true nodes by F1, link precision against the true forest,
Hamming distance (METHOD §4) and P(parent | child). Both models use the same similarity: the
HSAE in its hierarchy updates (§3.3), the baseline once, post hoc. One line per seed, then the
means. Each seed trains two models of 1,500 steps (about a minute on one idle core).

The defaults are the test's generator and config (d 32, every node on a path adds its own
direction, parent weight 0.3, two paths per token, rho 0.05, r 0.05). The generator options
change only the data (the models' d follows --d, the target L0 stays the test's 2.0 unless
--target-l0 is given). Besides the test's metrics the table shows, per model:

  f1       match quality: the mean over learned features (all levels) of their best F1
           against a true node of the same depth (the F1 that match_features takes the
           argmax of). Link precision mixes this feature recovery with the assignment.
  prec@f1  diagnostic only: link precision over the learned links whose parent and child
           both have best F1 >= --min-f1 (default 0.5); n@ is how many links that keeps.
  s        wall seconds to train the model.

After the means: mean best F1 per level and link precision per level pair, per model. A learned
feature that never fires on the evaluation tokens has nothing to match: match_features gives it
-1 and the test's precision leaves its links out (they counted, matched to true node 0, before).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsae_core.model.config import HSAEConfig  # noqa: E402
from hsae_core.model.hierarchy import assign_forest  # noqa: E402
from hsae_core.model.posthoc import coactivation_stats  # noqa: E402
from hsae_core.model.trainer import Trainer  # noqa: E402
from tests import test_core_recovery as recovery  # noqa: E402
from tests.synthetic import SyntheticForest  # noqa: E402

KEYS = ("precision", "hamming", "p_parent_given_child")
EXTRA = ("f1", "prec_f1", "n_f1", "secs")


def best_f1(levels, x: torch.Tensor,
            truth: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per level, each learned feature's best F1 against a true node of its depth and that node
    (the same F1 as tests/synthetic.match_features)."""
    out = []
    with torch.no_grad():
        for lv, t in zip(levels, truth):
            a = (lv.encode(x).dense() > 0).float()
            t = t.float()
            f1 = 2 * (a.t() @ t) / (a.sum(0)[:, None] + t.sum(0)[None, :]).clamp_min(1)
            out.append(f1.max(1))
    return out


def diagnostics(model, forest, syn: SyntheticForest, x, truth, min_f1: float) -> dict:
    """Match quality and link precision restricted to well-recovered endpoints."""
    bf = best_f1(model.levels, x, truth)
    f1 = torch.cat([v for v, _ in bf])
    correct = total = 0
    per_pair = []
    for l, parent_of in enumerate(forest.parent_of):
        kids = (parent_of >= 0).nonzero(as_tuple=True)[0]
        par = parent_of[kids]
        per_pair.append(float(
            (syn.parent_of[l][bf[l + 1][1][kids]] == bf[l][1][par]).float().mean()))
        good = (bf[l + 1][0][kids] >= min_f1) & (bf[l][0][par] >= min_f1)
        kids, par = kids[good], par[good]
        ok = syn.parent_of[l][bf[l + 1][1][kids]] == bf[l][1][par]
        correct += int(ok.sum())
        total += kids.numel()
    return {"f1": float(f1.mean()), "prec_f1": correct / total if total else float("nan"),
            "n_f1": total, "f1_levels": [float(v.mean()) for v, _ in bf],
            "prec_pairs": per_pair}


def run_seed(seed: int, args) -> tuple[dict, dict]:
    syn = SyntheticForest.make(d=args.d, branching=(3, 3), n_roots=8,
                               paths_per_token=args.paths_per_token,
                               parent_weight=args.parent_weight, seed=seed,
                               leaf_only=args.leaf_only)
    recovery.SYN = syn  # evaluate() scores links against this generator's forest
    common = dict(recovery.COMMON, level_sizes=syn.sizes, similarity=args.similarity,
                  d_model=args.d)
    if args.steps is not None:
        common["total_steps"] = args.steps
    if args.target_l0 is not None:
        common["target_l0"] = args.target_l0
    if args.update_interval is not None:
        common["update_interval"] = args.update_interval
    for item in args.set:
        key, _, value = item.partition("=")
        common[key] = json.loads(value)
    torch.manual_seed(0)
    x, truth = syn.sample(4000, torch.Generator().manual_seed(123))
    t0 = time.perf_counter()
    hsae = Trainer(HSAEConfig(
        **common, rho=args.rho, swap_rate=args.swap_rate,
        exclude_quantile=args.exclude_quantile)).fit(syn.batches(256, seed=10))
    t1 = time.perf_counter()
    indep = Trainer(HSAEConfig(**common, rho=0.0, swap_rate=0.0)).fit(syn.batches(256, seed=10))
    t2 = time.perf_counter()
    co = None
    if args.similarity == "coactivation":
        co = coactivation_stats(indep, (x[i:i + 256] for i in range(0, x.shape[0], 256)),
                                common.get("coactivation_momentum", 0.999), 256)
    posthoc = assign_forest(indep.levels, args.similarity, exclude_quantile=args.exclude_quantile,
                            tree="partial", coactivation=co)
    h = recovery.evaluate(hsae, hsae.forest, x, truth)
    b = recovery.evaluate(indep, posthoc, x, truth)
    h.update(diagnostics(hsae, hsae.forest, syn, x, truth, args.min_f1), secs=t1 - t0)
    b.update(diagnostics(indep, posthoc, syn, x, truth, args.min_f1), secs=t2 - t1)
    return h, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--similarity", default="encoder",
                    choices=("encoder", "decoder", "coactivation"))
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--swap-rate", type=float, default=0.05)
    ap.add_argument("--exclude-quantile", type=float, default=0.2)
    ap.add_argument("--update-interval", type=int, default=None, help="default: the test's (100)")
    ap.add_argument("--steps", type=int, default=None, help="default: the test's (1500)")
    ap.add_argument("--target-l0", type=float, default=None, help="default: the test's (2.0)")
    ap.add_argument("--d", type=int, default=32, help="generator and model width")
    ap.add_argument("--leaf-only", action="store_true",
                    help="a path adds only its leaf's direction (feature splitting)")
    ap.add_argument("--parent-weight", type=float, default=0.3)
    ap.add_argument("--paths-per-token", type=int, default=2)
    ap.add_argument("--min-f1", type=float, default=0.5, help="endpoint F1 for prec@f1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an HSAEConfig field for both models, e.g. --set lambda_rate=0.02 "
                         "(a JSON value)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = {"hsae": [], "baseline": []}
    print(f"similarity {args.similarity}, rho {args.rho}, r {args.swap_rate}, "
          f"q {args.exclude_quantile}, "
          f"update {args.update_interval or recovery.COMMON['update_interval']}, "
          f"steps {args.steps or recovery.COMMON['total_steps']}; generator d {args.d}, "
          f"leaf_only {args.leaf_only}, parent_weight {args.parent_weight}, "
          f"paths {args.paths_per_token}")
    print("seed | " + " | ".join(f"{k} HSAE / baseline" for k in KEYS)
          + f" || f1 | prec@f1>={args.min_f1} (n@) | s  HSAE / baseline")

    def extra(h, b):
        return (f" || {h['f1']:.3f} / {b['f1']:.3f} | {h['prec_f1']:.3f} ({h['n_f1']:.0f}) / "
                f"{b['prec_f1']:.3f} ({b['n_f1']:.0f}) | {h['secs']:.0f} / {b['secs']:.0f}")

    for seed in (int(s) for s in args.seeds.split(",")):
        h, b = run_seed(seed, args)
        rows["hsae"].append(h)
        rows["baseline"].append(b)
        print(f"{seed} | " + " | ".join(f"{h[k]:.3f} / {b[k]:.3f}" for k in KEYS) + extra(h, b),
              flush=True)
    mean = {m: {k: statistics.mean(r[k] for r in rs) for k in KEYS + EXTRA}
            for m, rs in rows.items()}
    print("mean | " + " | ".join(f"{mean['hsae'][k]:.3f} / {mean['baseline'][k]:.3f}"
                                 for k in KEYS)
          + extra(mean["hsae"], mean["baseline"]))
    for m, rs in rows.items():
        per = [statistics.mean(r["f1_levels"][l] for r in rs)
               for l in range(len(rs[0]["f1_levels"]))]
        print(f"f1 per level ({m}): " + " / ".join(f"{v:.3f}" for v in per))
        per = [statistics.mean(r["prec_pairs"][l] for r in rs)
               for l in range(len(rs[0]["prec_pairs"]))]
        print(f"precision per level pair ({m}): " + " / ".join(f"{v:.3f}" for v in per))
    pairs = list(zip(rows["hsae"], rows["baseline"]))
    wins = sum(h["precision"] > b["precision"] for h, b in pairs)
    print(f"HSAE link precision higher in {wins} of {len(pairs)} seeds")
    gaps = [h["precision"] - b["precision"] for h, b in pairs]
    wins_f1 = sum(h["prec_f1"] > b["prec_f1"] for h, b in pairs)
    print(f"precision gap HSAE - baseline: mean {statistics.mean(gaps):+.3f}, "
          f"min {min(gaps):+.3f}; "
          f"prec@f1 higher in {wins_f1} of {len(pairs)}")


if __name__ == "__main__":
    main()
