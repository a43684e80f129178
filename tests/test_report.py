"""The report stage (issue 6) on a small real run: a tiny Llama's activations, a trained HSAE, an
independent baseline with its post-hoc forest, collected evidence. Checks the browser's data
against a dense recount, the figures, and the site itself in headless Chromium."""

from __future__ import annotations

import json
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
from tests.store_helpers import WORDS, jsonl_corpus, tiny_llama

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
LEVELS = (8, 16, 32, 64)
COMMON = dict(d_model=32, level_sizes=LEVELS, target_l0=3.0, batch_size=128, total_steps=40,
              dead_window_tokens=0, update_interval=10)
REPORT = {"contexts_per_feature": 4, "umap_points": 40, "umap_panels": 2, "umap_min_fires": 5,
          "batch_size": 256}


def _train(cfg, store, scale, root, name):
    return train_on_store(cfg, store, scale, checkpoint=root / f"{name}.pt",
                          curves=root / f"curves-{name}",
                          run=TrainRunConfig(checkpoint_every=0, log_every=10), name=name)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small real run laid out like data/: store, normalisation, hsae/, posthoc/, evidence/."""
    root = tmp_path_factory.mktemp("report")
    ext = ExtractConfig(model=tiny_llama(root / "lm", d_model=32, n_layers=2), layer=1,
                        corpus=jsonl_corpus(root / "corpus.jsonl", n_docs=200, max_words=60),
                        context_len=24, batch_size=16, max_tokens=None, eval_fraction=0.2,
                        chunk_bytes=4096, shard_bytes=65536)
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
    params = {"hierarchy": {"rho": 0.05, "swap_rate": 0.05}, "report": REPORT}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return {"root": root, "hsae": hsae, "posthoc": base, "scale": norm.scale, "store": store}


def stage(run, out: Path, *extra: str):
    from stages.report import app

    root = run["root"]
    args = ["--params", root / "params.yaml", "--hsae", root / "hsae",
            "--posthoc", root / "posthoc",
            "--evidence", root / "evidence", "--metrics", root / "metrics.json",
            "--store", root / "store.zarr", "--normalization", root / "normalization.json",
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

    summary, _ = stage(run, tmp_path / "report", "--ablations", str(tmp_path / "ablations.json"))
    figs = summary["figures"]
    assert set(figs) == {"fig3", "fig4", "fig5", "fig7", "fig8", "fig9", "fig10", "fig11",
                         "fig_semantic", "fig_training"}
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


def test_site_in_headless_chromium(run, tmp_path):
    exe = _chromium()
    if exe is None:
        _unavailable("no chromium on PATH (scripts/setup.sh installs Debian's `chromium` "
                     "when run as root with apt)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (the dev extra of pyproject.toml)")
    judged = write_judge(run, tmp_path / "pairs.jsonl")
    summary, _ = stage(run, tmp_path / "report", "--judge", str(tmp_path / "pairs.jsonl"))
    _, ov = read_js(tmp_path / "report" / "site" / "data" / "overview.js")
    n_trees = len(ov["models"][0]["trees"]["l"])
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_tree.png"
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe,
                                    args=["--disable-dev-shm-usage"]
                                    + (["--no-sandbox"] if os.geteuid() == 0 else []))
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: (errors.append(f"console.{m.type}: {m.text}")
                                      if m.type == "error" else None))
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
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
        browser.close()
    assert not errors, errors
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
