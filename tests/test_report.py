"""The report stage (issue 6) on a small real run: a tiny Llama's activations of a corpus whose
documents carry topic labels (words drawn per topic), a trained HSAE, an independent baseline
with its post-hoc forest, collected evidence. Checks the browser's data, its semantic scores
(issue 14: top labels, link scores, tree means) included, against a dense recount, the figures,
and the site itself in headless Chromium; and a store without labels, for which the site says
topic coherence is unavailable."""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from hsae_core.data.config import ExtractConfig
from hsae_core.data.extract import extract_activations
from hsae_core.data.normalize import estimate_normalization
from hsae_core.data.reader import EvalActivations
from hsae_core.evaluation.evaluate import evaluate_hsae
from hsae_core.evaluation.evidence import EvidenceConfig, collect_evidence, save_evidence
from hsae_core.model.config import HSAEConfig
from hsae_core.model.posthoc import posthoc_forest
from hsae_core.pipeline.io import save_hsae
from hsae_core.pipeline.train_run import TrainRunConfig, train_on_store
from tests.store_helpers import LABELS, WORDS, tiny_llama
from tests.test_scale_study import synthetic_row

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
LEVELS = (8, 16, 32, 64)
COMMON = dict(d_model=32, level_sizes=LEVELS, target_l0=3.0, batch_size=128, total_steps=40,
              dead_window_tokens=0, update_interval=10)
REPORT = {"contexts_per_feature": 4, "umap_points": 40, "umap_panels": 2, "umap_min_fires": 5,
          "batch_size": 256}
MIN_DOCS = 12  # metrics.link_min_docs (default 5; eval documents: 64): the site must follow it


def topical_corpus(path: Path, n_docs: int = 300, max_words: int = 30, seed: int = 0) -> str:
    """A .jsonl corpus whose documents have a ``topic`` (one of LABELS, in turn) and draw 70% of
    their words from that topic's own 8 words, the rest from 10 shared ones: features that fire
    on a topic's words fire in that topic's documents."""
    rng = np.random.default_rng(seed)
    own = [WORDS[8 * t:8 * (t + 1)] for t in range(len(LABELS))]
    rows = []
    for d in range(n_docs):
        t = d % len(LABELS)
        n = int(rng.integers(5, max_words))
        words = [str(rng.choice(own[t])) if rng.random() < 0.7 else str(rng.choice(WORDS[240:]))
                 for _ in range(n)]
        rows.append(json.dumps({"text": " ".join(words), "topic": LABELS[t]}) + "\n")
    path.write_text("".join(rows))
    return str(path)


def _train(cfg, store, scale, root, name):
    return train_on_store(cfg, store, scale, checkpoint=root / f"{name}.pt",
                          curves=root / f"curves-{name}",
                          run=TrainRunConfig(checkpoint_every=0, log_every=10), name=name)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small real run laid out like data/: store, normalisation, hsae/, posthoc/, evidence/."""
    root = tmp_path_factory.mktemp("report")
    ext = ExtractConfig(model=tiny_llama(root / "lm", d_model=32, n_layers=2), layer=1,
                        corpus=topical_corpus(root / "corpus.jsonl"), label_column="topic",
                        context_len=24, batch_size=16, max_tokens=None, eval_fraction=0.2,
                        chunk_bytes=4096, shard_bytes=65536,
                        # corpus order (topics in turn): some trees then have no scored link,
                        # which the browser must show as such
                        doc_shuffle_buffer=0)
    store = extract_activations(ext, root / "store.zarr", progress=False)
    norm = estimate_normalization(store)
    norm.save(root / "normalization.json")
    hsae = _train(HSAEConfig(**COMMON, rho=0.05, swap_rate=0.05), store, norm.scale, root, "hsae")
    base = _train(HSAEConfig(**COMMON, rho=0.0, swap_rate=0.0), store, norm.scale, root,
                  "baseline")
    save_hsae(hsae, root / "hsae")
    save_hsae(base, root / "baseline")
    base.forest = posthoc_forest(base, "encoder", 0.2, "partial")
    save_hsae(base, root / "posthoc")
    ecfg = EvidenceConfig(n_top=4, n_sampled=2, buffer=4, batch_size=256)
    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + [f" {w}" for w in WORDS]
    for name, model in (("hsae", hsae), ("baseline", base)):
        levels = collect_evidence(
            model, lambda: EvalActivations(store, norm.scale, batch_size=256), ecfg)
        save_evidence(levels, root / "evidence" / name, vocab=vocab, meta={"source": name},
                      cfg=ecfg)
    batches = lambda: (b.activations  # noqa: E731
                       for b in EvalActivations(store, norm.scale, batch_size=512))
    metrics = {"hsae": evaluate_hsae(hsae, batches()), "posthoc": evaluate_hsae(base, batches())}
    (root / "metrics.json").write_text(json.dumps(metrics))
    params = {"hierarchy": {"rho": 0.05, "swap_rate": 0.05}, "report": REPORT,
              "metrics": {"link_min_docs": MIN_DOCS}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return {"root": root, "hsae": hsae, "posthoc": base, "scale": norm.scale, "store": store,
            "extract": ext}


def stage(run, out: Path, *extra: str, store: str = "store.zarr",
          normalization: str = "normalization.json"):
    from stages.report import app

    root = run["root"]
    args = ["--params", root / "params.yaml", "--hsae", root / "hsae",
            "--posthoc", root / "posthoc", "--matryoshka", root / "no-matryoshka",
            "--evidence", root / "evidence", "--metrics", root / "metrics.json",
            "--store", root / store, "--normalization", root / normalization,
            "--out", out,
            "--judge", root / "no-judge.jsonl", "--ablations", root / "no-ablations.json", *extra]
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return json.loads((out / "summary.json").read_text()), res.output


def read_js(path: Path):
    """A data file is ``HSAE.put(key, value);``: return (key, value)."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("HSAE.put(") and text.rstrip().endswith(");")
    key, _, value = text[len("HSAE.put("):text.rstrip().rindex(")")].partition(",")
    return json.loads(key), json.loads(value)


def dense_counts(model, store, scale):
    """Firing and parent-child co-firing counts from each level's dense activation matrix."""
    acts = [[] for _ in model.levels]
    for b in EvalActivations(store, scale, batch_size=512):
        with torch.no_grad():
            for l, lv in enumerate(model.levels):
                acts[l].append((lv.encode(b.activations).dense() > 0).numpy())
    acts = [np.concatenate(a) for a in acts]
    joint = []
    for l, p in enumerate(model.forest.parent_of):
        p = p.numpy()
        joint.append(np.array([(acts[l + 1][:, j] & acts[l][:, p[j]]).sum() if p[j] >= 0 else 0
                               for j in range(len(p))]))
    return acts[0].shape[0], [a.sum(0) for a in acts], joint


def dense_documents(model, store, scale) -> tuple[np.ndarray, list[np.ndarray]]:
    """The eval documents (sorted ids) and, per level, ``[n_l, n_docs]``: feature i fires
    somewhere in document k, from each level's dense activations."""
    docs, acts = [], [[] for _ in model.levels]
    for b in EvalActivations(store, scale, batch_size=512):
        docs.append(b.doc_ids.numpy())
        with torch.no_grad():
            for l, lv in enumerate(model.levels):
                acts[l].append((lv.encode(b.activations).dense() > 0).numpy())
    docs = np.concatenate(docs)
    ids = np.unique(docs)
    col = np.searchsorted(ids, docs)
    out = []
    for a in acts:
        rows, feats = np.nonzero(np.concatenate(a))
        ind = np.zeros((a[0].shape[1], ids.size), bool)
        ind[feats, col[rows]] = True
        out.append(ind)
    return ids, out


def brute_semantics(model, ind: list[np.ndarray], labels: np.ndarray | None, n_labels: int,
                    min_docs: int, alpha: float = 1.0):
    """By explicit loops: per level, each feature's top 3 labels (label, share, lift) if it fires
    in >= min_docs documents; per pair, each link's (topic coherence, doc co-occurrence) if both
    ends do (coherence: Pearson correlation of the smoothed label lifts; None without labels)."""
    base = (np.array([(labels == t).mean() for t in range(n_labels)])
            if labels is not None else None)

    def per_label(f):
        return np.array([(f & (labels == t)).sum() for t in range(n_labels)], float)

    tops = []
    for a in ind:
        top = {}
        for i, f in enumerate(a):
            if labels is not None and f.sum() >= min_docs:
                n = per_label(f)
                order = sorted(range(n_labels), key=lambda t: (-n[t], t))[:3]
                top[i] = [(t, n[t] / n.sum(), n[t] / n.sum() / base[t]) for t in order if n[t]]
        tops.append(top)
    links = []
    for pair, parent_of in enumerate(model.forest.parent_of):
        scores = {}
        for c, p in enumerate(parent_of.tolist()):
            fp, fc = ind[pair][max(p, 0)], ind[pair + 1][c]
            if p < 0 or fp.sum() < min_docs or fc.sum() < min_docs:
                continue
            coh = None
            if labels is not None:
                a, b = ((per_label(f) + alpha * base) / (f.sum() + alpha) / base for f in (fp, fc))
                coh = float(np.corrcoef(a, b)[0, 1]) if min(a.std(), b.std()) > 1e-9 else None
            scores[c] = (coh, float((fp & fc).sum() / fc.sum()))
        links.append(scores)
    return tops, links


def write_judge(run, path: Path) -> list[dict]:
    """Verdicts in the judge's format (data/judge/pairs.jsonl) for two real HSAE links and one
    post-hoc link: the input the site renders (the judge itself is another stage's)."""
    rows = []
    for source, model in (("hsae", run["hsae"]), ("posthoc", run["posthoc"])):
        p = model.forest.parent_of[0]
        counts = torch.bincount(p[p >= 0], minlength=LEVELS[0])
        parent = int(counts.argmax())  # a root with two children or more: one yes, one no
        assert counts[parent] >= 2
        kids = (p == parent).nonzero(as_tuple=True)[0].tolist()[:2 if source == "hsae" else 1]
        for k, j in enumerate(kids):
            rows.append({"source": source, "parent_level": 0, "parent": int(p[j]),
                         "child_level": 1, "child": j, "order": "parent_first",
                         "raw": "HaveRelationship: Yes", "verdict": "yes" if k == 0 else "no",
                         "confidence": "High"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_site_data_match_a_dense_recount(run, tmp_path):
    summary, output = stage(run, tmp_path / "report")
    site = tmp_path / "report" / "site"
    assert "no judge output" in summary["judge"] and "no-ablations.json missing" in output
    _, ov = read_js(site / "data" / "overview.js")
    assert [m["name"] for m in ov["models"]] == ["hsae", "baseline"]
    for m, model in zip(ov["models"], (run["hsae"], run["posthoc"])):
        tokens, fired, joint = dense_counts(model, run["store"], run["scale"])
        assert m["tokens"] == tokens and m["judge"] is False
        seen: dict[tuple[int, int], dict] = {}
        for t, (l, i) in enumerate(zip(m["trees"]["l"], m["trees"]["i"])):
            key, tree = read_js(site / "data" / m["name"] / f"t{l}_{i}.js")
            assert (key == f"{m['name']}/t{l}_{i}" and tree["nodes"][0]["l"] == l
                    and tree["nodes"][0]["i"] == i)
            assert m["trees"]["live"][t] == sum(fired[n["l"]][n["i"]] > 0 for n in tree["nodes"])
            for k, n in enumerate(tree["nodes"]):
                seen[(n["l"], n["i"])] = n
                assert abs(n["f"] - fired[n["l"]][n["i"]] / tokens) < 1e-6
                if k:  # depth first: the parent comes earlier; the link is a forest link
                    par = tree["nodes"][n["p"]]
                    assert n["p"] < k and model.forest.parent_of[par["l"]][n["i"]] == par["i"]
                    c = fired[n["l"]][n["i"]]
                    want = joint[par["l"]][n["i"]] / c if c else None
                    assert (n["pc"] is None) if want is None else abs(n["pc"] - want) < 1e-4
        # every assigned feature, and every parent, is in exactly one tree
        in_trees = {(l + 1, j) for l, p in enumerate(model.forest.parent_of)
                    for j in (p >= 0).nonzero()[:, 0].tolist()}
        in_trees |= {(l, int(i)) for l, p in enumerate(model.forest.parent_of)
                     for i in p[p >= 0].unique()}
        assert set(seen) == in_trees
        assert sum(m["trees"]["size"]) == len(seen) and m["n_lone"] == sum(LEVELS) - len(seen)
        # contexts: tokens with activation are marked, intensity in percent of the feature's max
        ctx = [n for n in seen.values() if n["ctx"]]
        assert ctx and all(max(max(q) for _, q in n["ctx"]) == 100 for n in ctx)
        _, search = read_js(site / "data" / m["name"] / "search.js")
        assert [len(v) for v in search["toks"]] == list(LEVELS)


def _close(got, want, tol: float) -> bool:
    return (got is None) if want is None else (got is not None and abs(got - want) <= tol)


def check_semantics(run, site: Path, store, scale, labelled: bool) -> dict:
    """The site's semantic data of both models against :func:`brute_semantics`; returns per
    model the brute-force link scores."""
    _, ov = read_js(site / "data" / "overview.js")
    names = list(store.group["documents/label"].attrs["label_names"])
    out = {}
    for m, model in zip(ov["models"], (run["hsae"], run["posthoc"])):
        ids, ind = dense_documents(model, store, scale)
        # the corpus gives document d the topic LABELS[d % 3]; the store numbers documents in order
        labels = np.array([names.index(LABELS[d % 3]) for d in ids]) if labelled else None
        tops, links = brute_semantics(model, ind, labels, len(names), MIN_DOCS)
        assert m["semantic"] == {"labels": names, "min_docs": MIN_DOCS, "documents": ids.size,
                                 "scored": sum(map(len, links))}
        for t, (l, i) in enumerate(zip(m["trees"]["l"], m["trees"]["i"])):
            _, tree = read_js(site / "data" / m["name"] / f"t{l}_{i}.js")
            tree_links = []
            for k, n in enumerate(tree["nodes"]):
                assert n["d"] == ind[n["l"]][n["i"]].sum()
                want = tops[n["l"]].get(n["i"])
                assert ("lab" in n) == (want is not None), n
                for (t_, share, lift), (wt, ws, wl) in zip(n.get("lab", []), want or []):
                    assert t_ == wt and abs(share - ws) < 1e-3 and abs(lift - wl) < 1e-2
                assert len(n.get("lab", [])) == len(want or [])
                scores = links[n["l"] - 1].get(n["i"]) if k else None
                assert ("sc" in n) == (scores is not None), n
                if scores is not None:
                    assert _close(n["sc"][0], scores[0], 1e-3), (n["sc"], scores)
                    assert _close(n["sc"][1], scores[1], 1e-3), (n["sc"], scores)
                    tree_links.append(scores)
            for col, s in (("coh", 0), ("co", 1)):
                vals = [x[s] for x in tree_links if x[s] is not None]
                assert _close(m["trees"][col][t], np.mean(vals) if vals else None, 2e-3)
            assert m["trees"]["scored"][t] == len(tree_links)
        out[m["name"]] = links
    return out


def test_site_semantic_scores_match_a_brute_force_recount(run, tmp_path):
    summary, output = stage(run, tmp_path / "report")
    assert summary["doc_labels"] == len(LABELS) and "3 document labels" in output
    site = tmp_path / "report" / "site"
    links = check_semantics(run, site, run["store"], run["scale"], labelled=True)
    # the topical corpus makes this a real check: linked features share topics, so coherence
    # spans a range and some trees have no scored link at all
    coh = [s[0] for pair in links["hsae"] for s in pair.values() if s[0] is not None]
    assert len(coh) >= 10 and max(coh) > 0.8 and min(coh) < -0.5, sorted(coh)
    _, ov = read_js(site / "data" / "overview.js")
    tops = [n["lab"][0] for f in (site / "data" / "hsae").glob("t*.js")
            for n in read_js(f)[1]["nodes"] if "lab" in n]
    assert any(lift > 2 for _, _, lift in tops)  # topic-specific features are named as such
    assert None in ov["models"][0]["trees"]["coh"], "expected a tree with no scored link"


def _png_ok(path: Path) -> None:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100 and img[..., :3].std() > 0.01, path


def test_figures_from_a_small_run(run, tmp_path):
    from hsae_core.evaluation.compute import short_names
    from hsae_core.pipeline.ablations import COLUMNS

    # ablation rows as hsae_core.pipeline.ablations.experiment_rows gives them: the reference and a
    # real rho = 0 retraining of the same small run
    root = run["root"]
    free = _train(HSAEConfig(**COMMON, rho=0.0, swap_rate=0.05), run["store"], run["scale"],
                  tmp_path, "free")
    batches = lambda: (b.activations  # noqa: E731
                       for b in EvalActivations(run["store"], run["scale"], batch_size=512))
    ref = short_names(json.loads((root / "metrics.json").read_text()), 20)
    free_m = short_names({"hsae": evaluate_hsae(free, batches()), "posthoc": ref["posthoc"]},
                         20)  # metrics.json's short names, as compute-metrics writes them

    def row(name, changed, m):
        out = {"name": name, "changed": changed}
        for col, path in COLUMNS:
            v = m
            for part in path.split("."):
                v = v[part]
            out[col] = v
        return out
    rows = [row("main", {}, ref), row("no-constraint", {"hierarchy.rho": 0.0}, free_m)]
    (tmp_path / "ablations.json").write_text(json.dumps(rows))

    study = {"rows": [synthetic_row(n, rho, g) for n, g in ((500, -0.05), (4000, -0.1))
                      for rho in (0.01, 0.1)]}
    (tmp_path / "study.json").write_text(json.dumps(study))
    summary, _ = stage(run, tmp_path / "report", "--ablations", str(tmp_path / "ablations.json"),
                       "--scale-study", str(tmp_path / "study.json"))
    figs = summary["figures"]
    assert set(figs) == {"fig3", "fig4", "fig5", "fig7", "fig8", "fig9", "fig10", "fig11",
                         "fig_semantic", "fig_training", "fig_scale"}
    assert "paper, 100M tokens" in Path(figs["fig_scale"][1]).read_text()
    for paths in figs.values():
        png, svg = map(Path, paths)
        _png_ok(png)
        assert "<svg" in svg.read_text()[:2000]
    # Figure 4 has the reference, the post-hoc baseline and the real rho = 0 run; Figure 11 says
    # the judge is missing (it is drawn as a note, not skipped); UMAP panels are real sibling
    # groups
    fig4 = Path(figs["fig4"][1]).read_text()
    assert "not run" in fig4  # w/o perturbation was not run
    fig11 = Path(figs["fig11"][1]).read_text()
    assert "judge" in fig11
    assert summary["umap_panels"], "the small run should have a parent with two firing children"
    for p in summary["umap_panels"]:
        (pl, pi), sib = p["parent"], p["siblings"]
        assert all(run["hsae"].forest.parent_of[pl][s[1]] == pi and s[0] == pl + 1 for s in sib)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _unavailable(reason: str) -> None:
    """Skip, except in CI (``HSAE_REQUIRE_BROWSER=1``, set by .ci/run), where it is a failure."""
    if os.environ.get("HSAE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}; CI requires the browser test")
    pytest.skip(reason)


def _need_browser() -> str:
    """Chromium's path, once chromium and playwright are known to be there (else skip)."""
    exe = _chromium()
    if exe is None:
        _unavailable("no chromium on PATH (scripts/setup.sh installs Debian's `chromium` "
                     "when run as root with apt)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("playwright is not installed (the dev extra of pyproject.toml)")
    return exe


@contextlib.contextmanager
def browser_page(exe: str):
    """A headless Chromium page; on leaving, no console error or page error may have occurred."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe,
                                    args=["--disable-dev-shm-usage"]
                                    + (["--no-sandbox"] if os.geteuid() == 0 else []))
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: (errors.append(f"console.{m.type}: {m.text}")
                                      if m.type == "error" else None))
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        yield page
        browser.close()
    assert not errors, errors


def js_fixed(x: float, digits: int) -> str:
    """JavaScript's ``x.toFixed(digits)``: the exact binary value rounded half away from 0."""
    q = decimal.Decimal(1).scaleb(-digits)
    return str(decimal.Decimal(x).quantize(q, rounding=decimal.ROUND_HALF_UP))


def rows_order(page) -> list[str]:
    return page.locator("table.trees tbody tr").evaluate_all(
        "rs => rs.map(r => r.getAttribute('data-root'))")


def test_site_in_headless_chromium(run, tmp_path):
    exe = _need_browser()
    judged = write_judge(run, tmp_path / "pairs.jsonl")
    summary, _ = stage(run, tmp_path / "report", "--judge", str(tmp_path / "pairs.jsonl"))
    site = tmp_path / "report" / "site"
    _, ov = read_js(site / "data" / "overview.js")
    n_trees = len(ov["models"][0]["trees"]["l"])
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_tree.png"
    with browser_page(exe) as page:
        page.goto((tmp_path / "report" / "site" / "index.html").as_uri())
        rows = page.locator("table.trees tbody tr")
        rows.first.wait_for()
        assert rows.count() == min(n_trees, 200)
        # sorting by a column reorders the overview
        page.click("th[data-col=root]")
        first = page.locator("table.trees tbody tr").first.get_attribute("data-root")
        assert first == (
            f"t{min(zip(ov['models'][0]['trees']['l'], ov['models'][0]['trees']['i']))[0]}_"
            f"{min(zip(ov['models'][0]['trees']['l'], ov['models'][0]['trees']['i']))[1]}")
        # open the tree of the first judged link's parent: contexts highlighted, verdict shown
        j = judged[0]
        page.goto((tmp_path / "report" / "site" / "index.html").as_uri() + "#/hsae")
        page.locator(f"tr[data-root=t0_{j['parent']}]").click()
        page.locator(".tok.act").first.wait_for()
        style = page.locator(".tok.act").first.get_attribute("style")
        assert "rgba(255, 140, 0" in style or "rgba(255,140,0" in style
        assert page.locator(".judge.yes").count() >= 1 and page.locator(".judge.no").count() >= 1
        assert page.locator(f"#n0_{j['parent']}").count() == 1
        page.screenshot(path=str(shot))
        # search by id finds the feature and opens its tree with it in focus
        page.fill("#search", f"L1#{j['child']}")
        page.locator("#results .hit").first.click()
        page.locator(".node.focus").wait_for()
        assert page.locator(".node.focus").get_attribute("id") == f"n1_{j['child']}"
        # the baseline forest is one click away
        page.click("#models button:has-text('Baseline')")
        page.locator("table.trees tbody tr").first.wait_for()
        assert "Baseline" in page.locator("main h2").inner_text()
        check_semantics_in_page(page, site, ov)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def check_semantics_in_page(page, site: Path, ov: dict) -> None:
    """The overview sorts trees by mean topic coherence and by document co-occurrence (trees with
    no scored link last, either direction); a tree shows its nodes' top labels and its links'
    scores."""
    m = ov["models"][0]
    t, names = m["trees"], m["semantic"]["labels"]
    index = site.as_uri() + "/index.html"
    for col in ("coh", "co"):
        page.goto(index + "#/hsae")
        page.locator("table.trees tbody tr").first.wait_for()
        page.select_option("#sortby", col)
        page.locator(f"th.sorted[data-col={col}]").wait_for()
        value = dict(zip((f"t{l}_{i}" for l, i in zip(t["l"], t["i"])), t[col]))
        order = [value[r] for r in rows_order(page)]
        scored = [v for v in order if v is not None]
        assert len(set(scored)) >= 2 and None in order, order  # a real ordering, and unscored
        assert order == sorted(scored, reverse=True) + [None] * (len(order) - len(scored))
        first = page.locator(f"table.trees tbody tr td.{col}").first.inner_text()
        assert first == js_fixed(scored[0], 2)
        page.click(f"th[data-col={col}]")  # ascending: unscored trees stay last
        page.locator(f"th.sorted.asc[data-col={col}]").wait_for()
        order = [value[r] for r in rows_order(page)]
        assert order == sorted(scored) + [None] * (len(order) - len(scored))
    # a linked node with top labels and a finite coherence: its card shows both
    node = tree = None
    for l, i in zip(t["l"], t["i"]):
        nodes = read_js(site / "data" / "hsae" / f"t{l}_{i}.js")[1]["nodes"]
        node = next((n for n in nodes[1:] if "lab" in n and n.get("sc", [None])[0] is not None),
                    None)
        if node is not None:
            tree = f"t{l}_{i}"
            break
    assert node is not None
    page.goto(index + f"#/hsae/{tree}/{node['l']}_{node['i']}")
    card = page.locator(f"#n{node['l']}_{node['i']}")
    card.locator(".labels").wait_for()
    labels = card.locator(".labels").inner_text()
    for lab, share, lift in node["lab"]:
        want = f"{names[lab]} {math.floor(100 * share + 0.5)}% (\u00d7{js_fixed(lift, 1)})"
        assert want in labels, (want, labels)
    coh, co = node["sc"]
    score = card.locator(".score").inner_text()
    assert (f"topic coherence {js_fixed(coh, 2)}" in score
            and f"doc co-occurrence {js_fixed(co, 2)}" in score), score
    assert "Mean topic coherence" in page.locator("p.semantic").inner_text()


def test_label_less_store_says_topic_coherence_is_unavailable(run, tmp_path):
    """The same corpus extracted without its label column: no top labels, no coherence (the
    site says unavailable, the sort control disables it), document co-occurrence still shown."""
    ext = dataclasses.replace(run["extract"], label_column=None)
    store = extract_activations(ext, tmp_path / "plain.zarr", progress=False)
    assert list(store.group["documents/label"].attrs["label_names"]) == []
    norm = estimate_normalization(store)
    norm.save(tmp_path / "plain-normalization.json")
    summary, output = stage(run, tmp_path / "report", store=str(tmp_path / "plain.zarr"),
                            normalization=str(tmp_path / "plain-normalization.json"))
    assert summary["doc_labels"] == 0 and "topic coherence unavailable" in output
    site = tmp_path / "report" / "site"
    links = check_semantics(run, site, store, norm.scale, labelled=False)
    assert sum(map(len, links["hsae"])) >= 10  # co-occurrence needs no labels
    exe = _need_browser()
    _, ov = read_js(site / "data" / "overview.js")
    t = ov["models"][0]["trees"]
    with browser_page(exe) as page:
        page.goto(site.as_uri() + "/index.html#/hsae")
        page.locator("table.trees tbody tr").first.wait_for()
        note = page.locator("p.semantic").inner_text()
        assert "Topic coherence and top labels: unavailable" in note
        assert page.locator("#sortby option[value=coh]").is_disabled()
        assert page.locator("th[data-col=coh]").count() == 0
        page.select_option("#sortby", "co")
        page.locator("th.sorted[data-col=co]").wait_for()
        value = dict(zip((f"t{l}_{i}" for l, i in zip(t["l"], t["i"])), t["co"]))
        order = [value[r] for r in rows_order(page)]
        scored = [v for v in order if v is not None]
        assert order == sorted(scored, reverse=True) + [None] * (len(order) - len(scored))
        k = next(k for k, n in enumerate(t["scored"]) if n)
        tree = f"t{t['l'][k]}_{t['i'][k]}"
        nodes = read_js(site / "data" / "hsae" / f"{tree}.js")[1]["nodes"]
        node = next(n for n in nodes if "sc" in n)
        page.goto(site.as_uri() + f"/index.html#/hsae/{tree}/{node['l']}_{node['i']}")
        card = page.locator(f"#n{node['l']}_{node['i']}")
        card.locator(".score").wait_for()
        score = card.locator(".score").inner_text()
        assert ("topic coherence unavailable (no labels)" in score
                and f"doc co-occurrence {js_fixed(node['sc'][1], 2)}" in score), score
        assert page.locator(".labels").count() == 0
