"""Coverage of the intervals over eval documents where the truth is known (issue 22, METHOD §4).

A synthetic two-level forest generates documents from a known model, so the population value of
every metric is computable exactly: Hamming, the pooled and macro P(parent|child) and
P(child|parent), the restricted (min-k) macro average, document co-occurrence and topic
coherence. Each draw is one eval sample; its 95% interval (as compute-metrics builds it:
eligibility fixed on the sample, the bias-corrected jackknife over documents) must cover the
truth in 90-99% of the draws. The truth of a statistic that averages over an eligible set is
the population average over the set the draw selected (what the interval is about: these
links, other documents). Topic coherence is checked on links whose ends fire in >= 20
documents: at the default 5 its point estimate is biased by more than any interval here
corrects (docs/intervals.md).

The model, per document: a topic ``t`` (probabilities ``base``) and a length ``L`` (uniform
over ``LENGTHS``). Parent ``i`` is present with probability ``pi[i, t]`` and then fires on each
token with probability ``rho[i]``; child ``j`` is present with probability ``kappa[j, t]`` and
then fires on each token with probability ``sigma[j]``; each token where child ``j`` fires also
makes its parent fire with probability ``phi[j]`` if the parent is present. Given the topic,
features are independent at document level, which makes every expectation a short product.

``pytest -s`` prints the coverage table; ``benchmarks/bootstrap_coverage.py`` runs more draws
and compares bootstrap intervals (percentile, basic, BCa) and the rule before issue 22.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hsae_core.evaluation.bootstrap import doc_weights, interval, jackknife_weights
from hsae_core.evaluation.metrics import EvalCounts, pair_metrics
from hsae_core.evaluation.semantic import SemanticConfig, pair_semantics
from hsae_core.model.forest import Forest

LENGTHS = np.arange(8, 33)
#: statistic -> key of pair_metrics / pair_semantics
STATS = {"hamming": "hamming", "P(p|c) macro": "p_parent_given_child",
         "P(c|p) macro": "p_child_given_parent", "P(p|c) pooled": "p_parent_given_child_pooled",
         "P(c|p) pooled": "p_child_given_parent_pooled", "P(p|c) min-k": None,
         "doc co-occurrence": "doc_cooccurrence", "topic coherence": "topic_coherence"}


@dataclass
class DocModel:
    """The generating model (module docstring); ``parent_of[j]``: child j's parent or -1."""

    base: np.ndarray  # [T]
    parent_of: np.ndarray  # [n1]
    pi: np.ndarray  # [n0, T]
    rho: np.ndarray  # [n0]
    kappa: np.ndarray  # [n1, T]
    sigma: np.ndarray  # [n1]
    phi: np.ndarray  # [n1]

    @classmethod
    def make(cls, seed: int = 0, n_parents: int = 6, per_parent: int = 3, unassigned: int = 2,
             topics: int = 6, rare_every: int = 3) -> "DocModel":
        """Parents with random topic profiles; each child's profile mixes its parent's with a
        random one (weight uniform in [0, 1]: population coherences spread over about
        -0.5..1); one child in ``rare_every`` is rare (present in about 3% of the documents),
        so which links qualify changes from sample to sample; rare children pass their firing
        on to their parent less often (as rarely firing features do), so a rule that lets them
        drop out of a resample's average shifts it."""
        rng = np.random.default_rng(seed)
        base = rng.dirichlet(np.full(topics, 4.0))

        def profiles(n):  # [n, T], largest entry 1
            p = rng.dirichlet(np.full(topics, 0.8), n)
            return p / p.max(1, keepdims=True)
        pi = 0.05 + 0.65 * profiles(n_parents)
        parent_of = np.concatenate([np.repeat(np.arange(n_parents), per_parent),
                                    np.full(unassigned, -1)])
        n1 = parent_of.size
        mix = rng.uniform(0, 1, n1)[:, None]
        shape = mix * pi[np.clip(parent_of, 0, None)] / 0.7 + (1 - mix) * profiles(n1)
        rare = np.arange(n1) % rare_every == rare_every - 1
        scale = np.where(rare, 0.04, rng.uniform(0.3, 0.6, n1))
        kappa = scale[:, None] * (0.1 + 0.9 * shape / shape.max(1, keepdims=True))
        phi = np.where(rare, rng.uniform(0.05, 0.3, n1), rng.uniform(0.3, 0.9, n1))
        return cls(base, parent_of, pi, rng.uniform(0.05, 0.2, n_parents), kappa,
                   rng.uniform(0.1, 0.5, n1), phi)

    @property
    def forest(self) -> Forest:
        return Forest((self.pi.shape[0], self.kappa.shape[0]),
                      [torch.from_numpy(self.parent_of.astype(np.int64))])

    def sample(self, rng: np.random.Generator, n_docs: int):
        """Document topics ``[n_docs]`` and per token: document index, parent and child
        activity ``[tokens, n]`` (bool)."""
        topic = rng.choice(self.base.size, n_docs, p=self.base)
        length = rng.choice(LENGTHS, n_docs)
        present_p = rng.random((n_docs, self.pi.shape[0])) < self.pi[:, topic].T
        present_c = rng.random((n_docs, self.kappa.shape[0])) < self.kappa[:, topic].T
        doc = np.repeat(np.arange(n_docs), length)
        kid = present_c[doc] & (rng.random((doc.size, self.sigma.size)) < self.sigma)
        par = present_p[doc] & (rng.random((doc.size, self.rho.size)) < self.rho)
        linked = self.parent_of >= 0
        follow = kid & (rng.random(kid.shape) < self.phi) & linked
        follow &= present_p[doc][:, np.clip(self.parent_of, 0, None)]
        for j in np.flatnonzero(linked):
            par[:, self.parent_of[j]] |= follow[:, j]
        return topic, doc, par, kid

    # -- population values ----------------------------------------------------------------------
    def _g(self) -> np.ndarray:
        """``[n1, T]``: per token, the chance that child j fires and passes it on."""
        return self.kappa * (self.sigma * self.phi)[:, None]

    def _others(self, i: int, skip: int = -1) -> np.ndarray:
        return np.flatnonzero((self.parent_of == i) & (np.arange(self.parent_of.size) != skip))

    def token_rates(self) -> dict[str, np.ndarray]:
        """Per-token expectations (topic-averaged): ``kid [n1]``, ``joint [n1]``, ``par [n0]``
        and ``mismatch [n0]`` (0 for a parent without children)."""
        g, T = self._g(), self.base.size
        kid = self.kappa * self.sigma[:, None]  # [n1, T]
        joint = np.zeros_like(kid)
        for j in np.flatnonzero(self.parent_of >= 0):
            i = self.parent_of[j]
            rest = np.prod(1 - g[self._others(i, j)], axis=0) if self._others(i, j).size \
                else np.ones(T)
            joint[j] = kid[j] * self.pi[i] * (1 - (1 - self.rho[i]) * (1 - self.phi[j]) * rest)
        par = np.zeros_like(self.pi)
        mism = np.zeros_like(self.pi)
        for i in range(self.pi.shape[0]):
            ks = self._others(i)
            q = np.prod(1 - g[ks], axis=0) if ks.size else np.ones(T)
            p0 = np.prod(1 - kid[ks], axis=0) if ks.size else np.ones(T)
            pi, rho = self.pi[i], self.rho[i]
            par[i] = pi * (1 - (1 - rho) * q)
            if ks.size:
                mism[i] = pi * rho * p0 + pi * (1 - rho) * (q - p0) + (1 - pi) * (1 - p0)
        return {k: v @ self.base for k, v in
                (("kid", kid), ("joint", joint), ("par", par), ("mismatch", mism))}

    def doc_rates(self) -> dict[str, np.ndarray]:
        """Per topic: the chance that a feature fires in a document (``par [n0, T]``,
        ``kid [n1, T]``) and that child j and its parent both do (``both [n1, T]``)."""
        L = LENGTHS[:, None].astype(float)  # [lengths, 1] against [T]
        n0, T = self.pi.shape
        kid = self.kappa * (1 - ((1 - self.sigma[:, None, None]) ** L[None]).mean(1))

        def silent_rest(i: int, skip: int = -1) -> np.ndarray:  # [lengths, T]
            out = (1 - self.rho[i]) ** L * np.ones((1, T))
            for k in self._others(i, skip):
                out = out * ((1 - self.kappa[k]) + self.kappa[k]
                             * (1 - self.sigma[k] * self.phi[k]) ** L)
            return out

        par = np.stack([1 - (1 - self.pi[i]) - self.pi[i] * silent_rest(i).mean(0)
                        for i in range(n0)])
        both = np.zeros_like(kid)
        for j in np.flatnonzero(self.parent_of >= 0):
            i, s, f = self.parent_of[j], self.sigma[j], self.phi[j]
            quiet = silent_rest(i, j) * self.kappa[j] * ((1 - s * f) ** L - (1 - s) ** L)
            both[j] = kid[j] - ((1 - self.pi[i]) * kid[j] + self.pi[i] * quiet.mean(0))
        return {"par": par, "kid": kid, "both": both}

    def link_truth(self) -> dict[str, np.ndarray]:
        """Per child: the population P(p|c), P(c|p), document co-occurrence and topic
        coherence of its link (NaN for unassigned children)."""
        tok, doc = self.token_rates(), self.doc_rates()
        p = np.clip(self.parent_of, 0, None)
        nan = np.where(self.parent_of >= 0, 1.0, np.nan)

        def lift(rate):  # [n, T]
            lf = rate / (rate @ self.base)[:, None]
            return lf - lf.mean(1, keepdims=True)
        a, b = lift(doc["par"])[p], lift(doc["kid"])
        coh = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
        return {"pc": tok["joint"] / tok["kid"] * nan, "cp": tok["joint"] / tok["par"][p] * nan,
                "cooc": (doc["both"] @ self.base) / (doc["kid"] @ self.base) * nan,
                "coh": coh * nan}


@dataclass(frozen=True)
class Setup:
    """One eval sample's size and the metric settings: ``rows`` jackknife rows (as
    metrics.bootstrap: the delete-one jackknife when documents are fewer), ``n_boot`` extra
    bootstrap resamples (for the benchmark's comparison; 0 here), ``min_fires`` (k of the
    min-k form) and ``min_docs`` (the semantic scores' link_min_docs)."""

    n_docs: int = 200
    rows: int = 1000
    n_boot: int = 0
    min_fires: int = 10
    min_docs: int = 20


def realistic() -> DocModel:
    """The model the test uses: 40 links under 10 parents, one child in eight rare, so that
    about 10% of the links rest on fewer than 5 documents of 200 (the reference run: 3-16% of
    its links below link_min_docs = 5)."""
    return DocModel.make(0, n_parents=10, per_parent=4, rare_every=8)


def draw(model: DocModel, rng: np.random.Generator, setup: Setup):
    """One eval sample: every statistic's values on the rows ``[point, n_boot bootstrap
    resamples, jackknife rows]``; its truth for the links the sample selected; and the macro
    averages under the rule before issue 22 (:func:`legacy`) on the same rows."""
    topic, doc, par, kid = model.sample(rng, setup.n_docs)
    counts = EvalCounts(model.forest)
    counts.update(torch.from_numpy(doc), torch.zeros(0), None,
                  [torch.from_numpy(par), torch.from_numpy(kid)])
    seed = int(rng.integers(1 << 30))
    weights = torch.cat([doc_weights(setup.n_docs, setup.n_boot, seed),
                         jackknife_weights(setup.n_docs, setup.rows, seed)])
    t = counts.totals(weights)
    pm = pair_metrics(t, 0, setup.min_fires)
    sem, links = pair_semantics(counts, 0, weights, torch.from_numpy(topic), model.base.size,
                                SemanticConfig(setup.min_docs, seed=0), torch.Generator())
    tok, truth = model.token_rates(), model.link_truth()
    linked = np.flatnonzero(model.parent_of >= 0)
    kid0 = t.fired[1][0].numpy()[linked]
    par0 = t.fired[0][0].numpy()[model.parent_of[linked]]
    strong = (kid0 >= setup.min_fires) & (par0 >= setup.min_fires)
    scored = np.array(links["children"], dtype=np.int64)
    coherent = scored[~np.isnan(np.array(links["topic_coherence"], dtype=float))]
    reps = {name: pm[key] if key in pm else sem[key] for name, key in STATS.items() if key}
    reps["P(p|c) min-k"] = pm[f"p_parent_given_child_min{setup.min_fires}"]
    mean = lambda v: float(np.mean(v)) if len(v) else float("nan")  # noqa: E731
    want = {"hamming": float(tok["mismatch"].sum()),
            "P(p|c) macro": mean(truth["pc"][linked[kid0 > 0]]),
            "P(c|p) macro": mean(truth["cp"][linked[par0 > 0]]),
            "P(p|c) pooled": float(tok["joint"].sum() / tok["kid"][linked].sum()),
            "P(c|p) pooled": float(tok["joint"].sum()
                                   / tok["par"][model.parent_of[linked]].sum()),
            "P(p|c) min-k": mean(truth["pc"][linked[strong]]),
            "doc co-occurrence": mean(truth["cooc"][scored]),
            "topic coherence": mean(truth["coh"][coherent])}
    return reps, want, legacy(t, linked, model.parent_of, setup.min_fires)


def legacy(t, linked: np.ndarray, parent_of: np.ndarray, k: int) -> dict[str, torch.Tensor]:
    """The macro averages as computed before issue 22: eligibility re-decided in every row (a
    link whose conditioning feature is absent from a resample leaves its mean)."""
    kid, par = t.fired[1][:, linked], t.fired[0][:, parent_of[linked]]
    joint = t.joint[0][:, linked]

    def macro(count, ok):
        ratio = torch.where(ok, joint / count.clamp_min(1), torch.zeros_like(joint))
        return ratio.sum(1) / ok.sum(1).clamp_min(1)
    strong = (kid >= k) & (par >= k)
    return {"P(p|c) macro": macro(kid, kid > 0), "P(c|p) macro": macro(par, par > 0),
            "P(p|c) min-k": macro(kid, strong)}


def reported(values: torch.Tensor, old: torch.Tensor | None, n_boot: int) -> dict:
    """The interval compute-metrics reports (:func:`~hsae_core.evaluation.bootstrap.interval`
    on the point and the jackknife rows)."""
    return {"jackknife": interval(torch.cat([values[:1], values[1 + n_boot:]]))[1:]}


def coverage(draws: int, setup: Setup = Setup(), model: DocModel | None = None, seed: int = 0,
             methods=reported) -> dict:
    """Per statistic and method (``methods(values, legacy values or None, n_boot)`` -> ``{name:
    (lo, hi)}``): the share of draws whose interval covers the truth, the share containing their
    own point, the mean width, and the draws counted (a draw without an eligible link, or whose
    truth is undefined, is skipped)."""
    model = model or realistic()
    rng = np.random.default_rng(seed)
    hits: dict = {}
    for _ in range(draws):
        reps, want, old = draw(model, rng, setup)
        for name, values in reps.items():
            point = float(values[0])
            if np.isnan(want[name]) or np.isnan(point):
                continue
            for method, (lo, hi) in methods(values, old.get(name), setup.n_boot).items():
                rec = hits.setdefault(name, {}).setdefault(method, [])
                rec.append((lo <= want[name] <= hi, lo <= point <= hi, hi - lo))
    return {name: {m: {"cover": float(np.mean([r[0] for r in rec])),
                       "point_inside": float(np.mean([r[1] for r in rec])),
                       "width": float(np.mean([r[2] for r in rec])), "n": len(rec)}
                   for m, rec in per.items()} for name, per in hits.items()}


def table(cov: dict, methods=("jackknife",)) -> str:
    """Markdown: per statistic, nominal 95% and each method's observed coverage (its share of
    intervals containing their own point in brackets)."""
    rows = ["| statistic | nominal | " + " | ".join(methods) + " | draws |",
            "|---|---|" + "---|" * (len(methods) + 1)]
    for name in STATS:
        c = cov[name]
        cells = [f"{c[m]['cover']:.1%} ({c[m]['point_inside']:.0%})" if m in c else ""
                 for m in methods]
        rows.append(f"| {name} | 95% | " + " | ".join(cells)
                    + f" | {c[methods[0]]['n']} |")
    return "\n".join(rows)


def z_scores(num: np.ndarray, den: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``(sum num / sum den - truth) / se`` per column: a ratio of per-document sums
    ``[docs, k]`` against its population value, with the ratio's standard error over documents
    (delta method)."""
    n = num.shape[0]
    est = num.sum(0) / den.sum(0)
    se = (num - est * den).std(0) / (den.mean(0) * np.sqrt(n))
    return (est - truth) / np.maximum(se, 1e-12)


def test_population_values_match_a_large_sample():
    """The model's exact population values against one large sample (20,000 documents): every
    per-token and per-document rate within 4.5 standard errors."""
    model = DocModel.make(0)
    n_docs = 20_000
    topic, doc, par, kid = model.sample(np.random.default_rng(1), n_docs)
    tok, truth, rates = model.token_rates(), model.link_truth(), model.doc_rates()
    parent_of = model.parent_of
    linked = np.flatnonzero(parent_of >= 0)
    has = np.unique(parent_of[linked])
    any_kid = np.zeros_like(par)
    for j in linked:
        any_kid[:, parent_of[j]] |= kid[:, j]

    def per_doc(a: np.ndarray) -> np.ndarray:  # [tokens, k] -> [docs, k] sums
        out = np.zeros((n_docs, a.shape[1]))
        np.add.at(out, doc, a)
        return out
    length = per_doc(np.ones((doc.size, 1)))
    checks = [(per_doc(kid), tok["kid"]), (per_doc(par), tok["par"]),
              (per_doc(kid[:, linked] & par[:, parent_of[linked]]), tok["joint"][linked]),
              (per_doc(any_kid[:, has] != par[:, has]), tok["mismatch"][has])]
    for num, want in checks:
        assert np.abs(z_scores(num, length, want)).max() < 4.5
    fires_p, fires_c = per_doc(par) > 0, per_doc(kid) > 0
    for t in range(model.base.size):
        sel = (topic == t)[:, None]
        assert np.abs(z_scores(fires_p * sel, sel * np.ones_like(fires_p),
                               rates["par"][:, t])).max() < 4.5
        assert np.abs(z_scores(fires_c * sel, sel * np.ones_like(fires_c),
                               rates["kid"][:, t])).max() < 4.5
    both = fires_c[:, linked] & fires_p[:, parent_of[linked]]
    assert np.abs(z_scores(both, fires_c[:, linked], truth["cooc"][linked])).max() < 4.5


def test_intervals_cover_the_truth_90_to_99_percent():
    """200 eval samples of 200 documents: every statistic's 95% interval, as compute-metrics
    builds it, covers its population value in 90-99% of the draws."""
    cov = coverage(draws=200)
    print("\ncoverage of the 95% interval (in brackets: intervals containing their point), "
          "200 draws of 200 documents, delete-one jackknife, link_min_docs 20")
    print(table(cov))
    for name in STATS:
        assert 0.90 <= cov[name]["jackknife"]["cover"] <= 0.99, (name, cov[name])
