"""HSAE against independent SAEs + post-hoc assignment on synthetic forests, over seeds.

    python benchmarks/synthetic_recovery.py                          # seeds 0-4, encoder similarity
    python benchmarks/synthetic_recovery.py --similarity coactivation --seeds 0,1,2,3,4

The generator and the metrics are the recovery test's (tests/synthetic.py,
tests/test_core_recovery.py): a three-level forest whose child activity implies its parent's,
the learned features matched to true nodes by F1, link precision against the true forest,
Hamming distance (METHOD §4) and P(parent | child). Both models use the same similarity: the
HSAE in its hierarchy updates (§3.3), the baseline once, post hoc. One line per seed, then the
means. Each seed trains two models of 1,500 steps (about a minute on one idle core).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsae_core.config import HSAEConfig  # noqa: E402
from hsae_core.hierarchy import assign_forest  # noqa: E402
from hsae_core.posthoc import coactivation_stats  # noqa: E402
from hsae_core.trainer import Trainer  # noqa: E402
from tests import test_core_recovery as recovery  # noqa: E402
from tests.synthetic import SyntheticForest  # noqa: E402

KEYS = ("precision", "hamming", "p_parent_given_child")


def run_seed(seed: int, similarity: str, rho: float, swap_rate: float) -> tuple[dict, dict]:
    syn = SyntheticForest.make(d=32, branching=(3, 3), n_roots=8, paths_per_token=2,
                               parent_weight=0.3, seed=seed, leaf_only=False)
    recovery.SYN = syn  # evaluate() scores links against this generator's forest
    common = dict(recovery.COMMON, level_sizes=syn.sizes, similarity=similarity)
    torch.manual_seed(0)
    x, truth = syn.sample(4000, torch.Generator().manual_seed(123))
    hsae = Trainer(HSAEConfig(**common, rho=rho, swap_rate=swap_rate)).fit(syn.batches(256, seed=10))
    indep = Trainer(HSAEConfig(**common, rho=0.0, swap_rate=0.0)).fit(syn.batches(256, seed=10))
    co = None
    if similarity == "coactivation":
        co = coactivation_stats(indep, (x[i:i + 256] for i in range(0, x.shape[0], 256)),
                                common.get("coactivation_momentum", 0.999), 256)
    posthoc = assign_forest(indep.levels, similarity, exclude_quantile=0.2, tree="partial", coactivation=co)
    return recovery.evaluate(hsae, hsae.forest, x, truth), recovery.evaluate(indep, posthoc, x, truth)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--similarity", default="encoder", choices=("encoder", "decoder", "coactivation"))
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--swap-rate", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = {"hsae": [], "baseline": []}
    print(f"similarity {args.similarity}, rho {args.rho}, r {args.swap_rate}")
    print("seed | " + " | ".join(f"{k} HSAE / baseline" for k in KEYS))
    for seed in (int(s) for s in args.seeds.split(",")):
        h, b = run_seed(seed, args.similarity, args.rho, args.swap_rate)
        rows["hsae"].append(h)
        rows["baseline"].append(b)
        print(f"{seed} | " + " | ".join(f"{h[k]:.3f} / {b[k]:.3f}" for k in KEYS), flush=True)
    mean = {m: {k: statistics.mean(r[k] for r in rs) for k in KEYS} for m, rs in rows.items()}
    print("mean | " + " | ".join(f"{mean['hsae'][k]:.3f} / {mean['baseline'][k]:.3f}" for k in KEYS))
    wins = sum(h["precision"] > b["precision"] for h, b in zip(rows["hsae"], rows["baseline"]))
    print(f"HSAE link precision higher in {wins} of {len(rows['hsae'])} seeds")


if __name__ == "__main__":
    main()
