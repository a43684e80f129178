"""HSAE against independent SAEs + post-hoc assignment on data with a known forest (§4.2).

Seeded, CPU. The generator (tests/synthetic.py) makes every child's activity imply its
parent's. What the test holds HSAE to is what it optimises: a forest whose parents summarise
their children (clearly lower Hamming distance, METHOD §4), at the same sparsity and
reconstruction, with every level's L0 within 10% of target. Over seeds 0-4
(benchmarks/synthetic_recovery.py) the HSAE's Hamming is 18% under the baseline's with the
sparsity controller of issue 21 (0.335 vs 0.410, lower in 4 of 5 seeds; 27% with the controller
before it, whose thresholds froze with the schedule); one seed's ratio spreads from 0.61 to 1.06,
and this test's seed 0 sits at 0.84, so it asks for 10% lower. P(parent | child) and the
precision of the learned links against the true forest are measured and printed for both, and
asserted only not to fall clearly below the baseline's. The precision is close on average
(seeds 0-4: 0.876 vs 0.850, higher in 3 of 5; 0.843 vs 0.865 before issue 21): given
well-recovered features the post-hoc cosine assignment is already near-perfect, and HSAE does not
recover the leaves better (docs/limits.md), so a stronger assertion would claim what does not
hold.
"""

import torch

from hsae_core.evaluation.evaluate import Bootstrap, replicate_metrics, summarize
from hsae_core.evaluation.metrics import EvalCounts
from hsae_core.model.config import HSAEConfig
from hsae_core.model.hierarchy import assign_forest
from hsae_core.model.trainer import Trainer
from tests.synthetic import SyntheticForest, link_precision, match_features

SYN = SyntheticForest.make(d=32, branching=(3, 3), n_roots=8, paths_per_token=2,
                           parent_weight=0.3, seed=0, leaf_only=False)
COMMON = dict(d_model=32, level_sizes=SYN.sizes, target_l0=2.0, batch_size=256, total_steps=1500,
              update_interval=100, lr=3e-3, bandwidth=0.05, dead_window_tokens=50_000, seed=0)


def evaluate(model, forest, x, truth):
    counts = EvalCounts(forest)
    with torch.no_grad():
        active = [lv.encode(x).dense() > 0 for lv in model.levels]
    counts.update(torch.arange(x.shape[0]), x, None, active)
    mean = summarize(replicate_metrics(counts, Bootstrap(n_boot=0)), False)["mean"]
    fve = []
    for lv in model.levels:
        with torch.no_grad():
            err = (x - lv.decode(lv.encode(x))).pow(2).sum()
        fve.append(float(1 - err / (x - x.mean(0)).pow(2).sum()))
    return {
        "hamming": mean["hamming"],
        "p_parent_given_child": mean["p_parent_given_child"],
        "precision": link_precision(forest, match_features(model.levels, x, truth), SYN.parent_of),
        "l0": [float(a.float().sum(1).mean()) for a in active],
        "fve": fve,
    }


def test_hsae_forest_is_more_consistent_than_posthoc_baseline():
    torch.manual_seed(0)
    x, truth = SYN.sample(4000, torch.Generator().manual_seed(123))
    hsae = Trainer(HSAEConfig(**COMMON, rho=0.05, swap_rate=0.05)).fit(SYN.batches(256, seed=10))
    indep = Trainer(HSAEConfig(**COMMON, rho=0.0, swap_rate=0.0)).fit(SYN.batches(256, seed=10))
    posthoc = assign_forest(indep.levels, "encoder", exclude_quantile=0.2, tree="partial")

    h = evaluate(hsae, hsae.forest, x, truth)
    b = evaluate(indep, posthoc, x, truth)
    print(f"\nHSAE     {h}\nbaseline {b}")

    for res in (h, b):
        for l0 in res["l0"]:
            assert abs(l0 - 2.0) <= 0.2, res["l0"]
    assert h["hamming"] < 0.9 * b["hamming"]
    assert h["p_parent_given_child"] > b["p_parent_given_child"] - 0.03
    for fh, fb in zip(h["fve"], b["fve"]):
        assert fh > fb - 0.03
    assert h["precision"] > b["precision"] - 0.1
