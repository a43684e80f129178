"""The hierarchy and level metrics with intervals over documents (issues 13 and 22, METHOD §4):
each metric against a brute-force recomputation, every resampling row against an explicitly
resampled data set with the links fixed on the full sample, the jackknife interval against its
closed form, and interval coverage where the truth is known
(tests/test_bootstrap_coverage.py checks coverage statistic by statistic)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hsae_core.evaluation.bootstrap import (
    doc_weights,
    interval,
    jackknife_weights,
    replicate_weights,
    t975,
)
from hsae_core.evaluation.evaluate import Bootstrap, evaluate_hsae
from hsae_core.evaluation.metrics import EvalCounts, level_metrics, pair_metrics
from hsae_core.model.config import HSAEConfig
from hsae_core.model.forest import Forest
from hsae_core.model.hsae import HSAE

SIZES = (6, 10, 16)


def random_data(seed: int, n_tokens: int = 400, n_docs: int = 23):
    """Per-level activity with parent-child structure, document ids, and a forest."""
    g = torch.Generator().manual_seed(seed)
    parent_of = [torch.where(torch.rand(m, generator=g) < 0.8,
                             torch.randint(0, n, (m,), generator=g), torch.tensor(-1))
                 for n, m in zip(SIZES[:-1], SIZES[1:])]
    forest = Forest(SIZES, parent_of)
    act = [torch.rand(n_tokens, SIZES[0], generator=g) < 0.3]
    for l, p in enumerate(parent_of):
        base = torch.rand(n_tokens, SIZES[l + 1], generator=g) < 0.15
        coin = torch.rand(n_tokens, SIZES[l + 1], generator=g) < 0.5
        follow = act[l][:, p.clamp(min=0)] & coin
        act.append(base | (follow & (p >= 0)))
    act[2][:, 3] = False  # a silent child
    lone = int(torch.nonzero(parent_of[1] >= 0)[-1])  # a linked child firing on one token
    act[2][:, lone] = False
    act[2][n_tokens // 2, lone] = True
    docs = torch.sort(torch.randint(0, n_docs, (n_tokens,), generator=g)).values * 7 + 3
    return forest, act, docs


def brute(forest: Forest, act: list[torch.Tensor], k: int,
          full: list[torch.Tensor] | None = None) -> dict:
    """Every pair metric by explicit loops over tokens and links. With ``full`` (the full
    sample, of which ``act`` is a resample) the macro averages run over the links eligible on
    ``full``, a link whose ratio is undefined in ``act`` keeping its ratio on ``full``."""
    out = {}
    n_tok = act[0].shape[0]
    for l, parent_of in enumerate(forest.parent_of):
        par, kid = act[l].numpy(), act[l + 1].numpy()
        fpar, fkid = (par, kid) if full is None else (full[l].numpy(), full[l + 1].numpy())
        p = parent_of.numpy()
        parents = sorted(set(p[p >= 0].tolist()))
        mism = 0
        for t in range(n_tok):
            for i in parents:
                mism += par[t, i] != any(kid[t, j] for j in np.flatnonzero(p == i))
        links = [(int(p[j]), j) for j in range(len(p)) if p[j] >= 0]
        pc, cp, pc_k, cp_k, joints, kids, pars = [], [], [], [], 0, 0, 0
        for i, j in links:
            joint = int((par[:, i] & kid[:, j]).sum())
            nk, np_ = int(kid[:, j].sum()), int(par[:, i].sum())
            fjoint = int((fpar[:, i] & fkid[:, j]).sum())
            fk, fp = int(fkid[:, j].sum()), int(fpar[:, i].sum())
            joints, kids, pars = joints + joint, kids + nk, pars + np_
            r_pc = joint / nk if nk else (fjoint / fk if fk else None)
            r_cp = joint / np_ if np_ else (fjoint / fp if fp else None)
            if fk:
                pc.append(r_pc)
            if fp:
                cp.append(r_cp)
            if fk >= k and fp >= k:
                pc_k.append(r_pc)
                cp_k.append(r_cp)
        mean = lambda v: sum(v) / len(v) if v else math.nan  # noqa: E731
        out[l] = {"hamming": mism / n_tok, "hamming_per_parent": mism / n_tok / len(parents),
                  "p_parent_given_child": mean(pc), "p_child_given_parent": mean(cp),
                  "p_parent_given_child_pooled": joints / kids,
                  "p_child_given_parent_pooled": joints / pars,
                  f"p_parent_given_child_min{k}": mean(pc_k),
                  f"p_child_given_parent_min{k}": mean(cp_k), f"links_min{k}": len(pc_k)}
    return out


def counted(forest, act, docs) -> EvalCounts:
    counts = EvalCounts(forest)
    for s in range(0, act[0].shape[0], 97):  # batches cut across documents
        counts.update(docs[s:s + 97], torch.zeros(0), None, [a[s:s + 97] for a in act])
    return counts


@pytest.mark.parametrize("seed", [0, 1])
def test_pair_metrics_match_brute_force(seed):
    forest, act, docs = random_data(seed)
    counts = counted(forest, act, docs)
    t = counts.totals(doc_weights(len(counts.documents()), 0, 0))
    want = brute(forest, act, k=12)
    for l in range(forest.n_pairs):
        got = pair_metrics(t, l, 12)
        for key, value in want[l].items():
            assert float(got[key][0]) == pytest.approx(value, rel=1e-12, abs=1e-12), (l, key)
        linked = [j for j in range(SIZES[l + 1]) if forest.parent_of[l][j] >= 0]
        assert got["pc_skipped"][0] == sum(int(act[l + 1][:, j].sum() == 0) for j in linked)


def test_level_metrics_match_brute_force():
    cfg = HSAEConfig(d_model=8, level_sizes=(6, 12), target_l0=2, seed=3)
    model = HSAE(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    for lv in model.levels:
        lv.init_thresholds_(x, 2)
    docs = torch.arange(300) // 11
    res = evaluate_hsae(model, [_Batch(x[s:s + 64], docs[s:s + 64]) for s in range(0, 300, 64)],
                        Bootstrap(n_boot=0))
    for l, lv in enumerate(model.levels):
        fve_tok, sse, sst, active, fired = [], 0.0, 0.0, 0, torch.zeros(lv.n_features)
        for s in range(0, 300, 64):
            xb = x[s:s + 64].double()
            with torch.no_grad():
                code = lv.encode(x[s:s + 64])
                rec = lv.decode(code).double()
            err = (xb - rec).pow(2).sum(1)
            cen = (xb - xb.mean(0)).pow(2).sum(1)
            fve_tok += (1 - err / cen).tolist()
            sse, sst = sse + float(err.sum()), sst + float(cen.sum())
            active += int(code.active.sum())
            fired += torch.bincount(code.pattern.cols[code.active], minlength=lv.n_features)
        got = res[f"level{l}"]
        assert got["fve"] == pytest.approx(sum(fve_tok) / 300, rel=1e-6)
        assert got["fve_pooled"] == pytest.approx(1 - sse / sst, rel=1e-6)
        assert got["l0"] == pytest.approx(active / 300, rel=1e-12)
        assert got["dead_frac"] == pytest.approx(float((fired == 0).double().mean()))
    assert res["tokens"] == 300 and res["documents"] == 28


class _Batch:
    def __init__(self, x, docs):
        self.activations, self.doc_ids = x, docs


def test_every_row_equals_the_resampled_data_set_with_links_fixed():
    """Bootstrap and jackknife rows against the resampled data set materialised: eligibility
    from the full sample, an undefined ratio keeping its full-sample value (issue 22)."""
    forest, act, docs = random_data(2)
    counts = counted(forest, act, docs)
    ids = counts.documents()
    w = torch.cat([doc_weights(len(ids), 3, seed=5), jackknife_weights(len(ids), 100, 0)])
    t = counts.totals(w)
    lonely = int(docs[act[0].shape[0] // 2])  # the one document random_data's lone child is in
    without = 4 + int(torch.nonzero(w[4:, int(torch.nonzero(ids == lonely))] == 0))
    rows = [1, 2, 3, without, 4 if without != 4 else 5]
    got = [pair_metrics(t, l, 12) for l in range(forest.n_pairs)]
    for r in rows:
        # materialise row r: each document repeated w[r, d] times
        keep = [torch.nonzero(docs == d).flatten() for d, n in zip(ids, w[r].long().tolist())
                for _ in range(n)]
        sel = torch.cat(keep)
        want = brute(forest, [a[sel] for a in act], k=12, full=act)
        for l in range(forest.n_pairs):
            for key, value in want[l].items():
                assert float(got[l][key][r]) == pytest.approx(value, rel=1e-9, abs=1e-12), \
                    (r, l, key)
        lm = level_metrics(t, 0)
        assert float(lm["l0"][r]) == pytest.approx(float(act[0][sel].sum(1).double().mean()))
    # the row leaving out the lone child's document: its link kept its full-sample ratio
    assert got[1]["pc_imputed"][without] >= 1 and got[1]["pc_imputed"][0] == 0


def test_weights_are_multinomial_resamples_and_replicate_zero_is_the_data():
    w = doc_weights(50, 400, seed=1)
    assert torch.equal(w[0], torch.ones(50))
    assert torch.all(w[1:].sum(1) == 50)
    assert abs(float(w[1:].mean()) - 1) < 0.02 and float(w[1:].std()) == pytest.approx(1, abs=0.05)


def test_jackknife_rows_leave_out_each_group_once():
    one = replicate_weights(30, 1000, seed=0)  # fewer documents than rows: delete-one
    assert torch.equal(one[0], torch.ones(30)) and one.shape == (31, 30)
    assert torch.equal(1 - one[1:], torch.eye(30)[torch.argmax(1 - one[1:], 1)])
    assert torch.equal((1 - one[1:]).sum(0), torch.ones(30))
    grouped = jackknife_weights(103, 10, seed=4)
    out = 1 - grouped
    assert grouped.shape == (10, 103) and torch.equal(out.sum(0), torch.ones(103))
    assert set(out.sum(1).long().tolist()) == {10, 11}  # groups differ by one document at most
    assert not torch.equal(grouped, jackknife_weights(103, 10, seed=5))
    assert replicate_weights(30, 0, 0).shape == (1, 30)  # no rows: the point alone


def test_jackknife_interval_of_a_mean_is_the_t_interval():
    """For a mean the jackknife has no bias and its standard error is s / sqrt(n): the
    interval is the t interval; t975 matches the exact quantile."""
    from scipy import stats
    x = torch.tensor(np.random.default_rng(0).gamma(2.0, size=40))
    values = torch.cat([x.mean().reshape(1), (x.sum() - x) / 39])  # point, leave-one-out
    point, lo, hi = interval(values)
    half = stats.t.ppf(0.975, 39) * float(x.std()) / math.sqrt(40)
    assert (lo, hi) == pytest.approx((point - half, point + half), rel=1e-3)
    for df in (1, 2, 3, 5, 10, 11, 12, 30, 928):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=3e-4)
    assert interval(torch.tensor([0.5, 0.5, 0.5])) == (0.5, 0.5, 0.5)
    assert math.isnan(interval(torch.tensor([0.5]))[1])


def test_a_rare_low_link_no_longer_moves_the_resampled_mean():
    """The bias of issue 22: ten children firing once each, never with their parent, beside
    twenty that usually do. Re-deciding eligibility per resample raised the resamples' mean
    above the point; with the links fixed the interval is centred on it and contains it."""
    rng = np.random.default_rng(0)
    n_docs, per = 40, 20
    forest = Forest((1, 30), [torch.zeros(30, dtype=torch.int64)])
    kid = torch.from_numpy(rng.random((n_docs * per, 30)) < 0.3)
    kid[:, 20:] = False
    for j in range(20, 30):  # one token each, in different documents
        kid[(j - 20) * 3 * per + 1, j] = True
    par = kid[:, :20].any(1, keepdim=True) & torch.from_numpy(rng.random((n_docs * per, 1)) < 0.8)
    par[kid[:, 20:].any(1)] = False
    docs = torch.arange(n_docs).repeat_interleave(per)
    counts = EvalCounts(forest)
    counts.update(docs, torch.zeros(0), None, [par, kid])
    t = counts.totals(replicate_weights(n_docs, 1000, 0))
    pc = pair_metrics(t, 0, 1)["p_parent_given_child"]
    point, lo, hi = interval(pc)
    assert lo <= point <= hi
    assert abs((lo + hi) / 2 - point) < 0.1 * (hi - lo)
    boot = counts.totals(doc_weights(n_docs, 300, 1))
    old = pair_metrics(boot, 0, 1)
    kid_b, joint_b = boot.fired[1], boot.joint[0]
    legacy = torch.where(kid_b > 0, joint_b / kid_b.clamp_min(1), 0).sum(1) / (kid_b > 0).sum(1)
    assert float(legacy[1:].mean()) > point + 0.01  # the old rule's shift, for the record
    assert abs(float(old["p_parent_given_child"][1:].mean()) - point) < 0.005


def test_intervals_cover_the_truth_about_95_percent():
    """Clustered data with a known P(parent | child): documents differ in how often the child
    fires and in how often its parent follows; the 95% interval of the pooled P(p|c) over
    documents must contain the true value in about 95% of simulated data sets."""
    rng = np.random.default_rng(0)
    forest = Forest((2, 2), [torch.tensor([0, -1])])
    truth, covered, sims = 0.6, 0, 150
    for _ in range(sims):
        n_docs = 60
        per_doc = rng.integers(5, 40, n_docs)
        follow = rng.beta(6, 4, n_docs)  # mean 0.6, drawn independently of the other two
        child_rate = rng.uniform(0.1, 0.5, n_docs)
        kid = [rng.random(n) < r for n, r in zip(per_doc, child_rate)]
        par = [k & (rng.random(len(k)) < f) for k, f in zip(kid, follow)]
        docs = torch.from_numpy(np.repeat(np.arange(n_docs), per_doc))
        kid_t = torch.from_numpy(np.concatenate(kid))
        par_t = torch.from_numpy(np.concatenate(par))
        a0 = torch.stack([par_t, torch.zeros_like(par_t)], 1)
        a1 = torch.stack([kid_t, torch.zeros_like(kid_t)], 1)
        counts = EvalCounts(forest)
        counts.update(docs, torch.zeros(0), None, [a0, a1])
        t = counts.totals(replicate_weights(n_docs, 1000, int(rng.integers(1 << 30))))
        _, lo, hi = interval(pair_metrics(t, 0, 1)["p_parent_given_child_pooled"])
        # size, child rate and follow rate are independent across documents, so the pooled
        # ratio sum(joint) / sum(child) estimates the mean follow rate, 0.6
        covered += lo <= truth <= hi
    assert 0.88 * sims <= covered <= 0.99 * sims, covered
