"""The forest browser at the paper's size (issue 6): a synthetic 30,720-feature forest (levels
2048 / 4096 / 8192 / 16384, 80% of children assigned, skewed parent popularity so some trees are
large), 8 synthetic 21-token contexts per feature, written with hsae_core.site.build.write_site;
then headless Chromium opens it from file:// and reports the overview's first contentful paint,
the time until the overview table is rendered, and the time to open the largest tree.

    python benchmarks/browser_scale.py [--out /tmp/hsae_site_30k] [--contexts 8]

Timings are measurements, not pass/fail. Needs the `chromium` binary and playwright (dev extra).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsae_core.model.forest import Forest
from hsae_core.site.build import ModelView, TreeIndex, write_site
from hsae_core.site.stats import ForestStats

SIZES = (2048, 4096, 8192, 16384)
WORDS = [f"word{i}" for i in range(5000)]


def synthetic_forest(rng: np.random.Generator) -> Forest:
    parent_of = []
    for l in range(len(SIZES) - 1):
        popularity = rng.pareto(1.2, SIZES[l]) + 0.05
        p = rng.choice(SIZES[l], size=SIZES[l + 1], p=popularity / popularity.sum())
        p[rng.random(SIZES[l + 1]) < 0.2] = -1
        parent_of.append(torch.tensor(p, dtype=torch.int64))
    return Forest(SIZES, parent_of)


def synthetic_stats(forest: Forest, rng: np.random.Generator,
                    tokens: int = 100_000) -> ForestStats:
    fired = [rng.integers(0, tokens // 50, n) for n in SIZES]
    joint = [np.minimum(fired[l + 1], rng.integers(0, tokens // 50, SIZES[l + 1]))
             * (forest.parent_of[l].numpy() >= 0)
             for l in range(len(SIZES) - 1)]
    return ForestStats(forest, tokens, fired, joint)


def synthetic_contexts(n_ctx: int, seed: int):
    def contexts(level: int, i: int):
        r = np.random.default_rng((seed, level, i))
        out = []
        for _ in range(n_ctx):
            toks = [" " + WORDS[k] for k in r.integers(0, len(WORDS), 21)]
            acts = np.where(r.random(21) < 0.15, r.random(21) * 5, 0.0)
            acts[10] = 1 + r.random() * 5
            out.append((toks, acts.tolist()))
        return out
    return contexts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/hsae_site_30k"))
    ap.add_argument("--contexts", type=int, default=8)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    views = []
    for name, label in (("hsae", "HSAE (synthetic)"), ("baseline", "Baseline (synthetic)")):
        forest = synthetic_forest(rng)
        views.append(ModelView(name, label, forest, synthetic_stats(forest, rng),
                               synthetic_contexts(args.contexts, len(views))))
    t0 = time.perf_counter()
    index = write_site(args.out, views, contexts_per_feature=args.contexts)
    build_s = time.perf_counter() - t0
    files = [p for p in args.out.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    ov_kb = (args.out / "data" / "overview.js").stat().st_size / 1024
    idx = TreeIndex.of(views[0].forest)
    roots = idx.tree_roots()
    sizes = np.bincount(idx.root, minlength=idx.root.size)[roots]
    big = roots[int(np.argmax(sizes))]
    big_l, big_i = idx.split(int(big))
    print(f"site: {sum(SIZES)} features per model x 2 models, {len(roots)} HSAE trees "
          f"(largest {sizes.max()} nodes), "
          f"{len(files)} files, {total / 2**20:.1f} MB (overview.js {ov_kb:.0f} kB), "
          f"written in {build_s:.1f} s")

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        print("no chromium on PATH: browser timings skipped")
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        for run in range(3):
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(index.as_uri())
            page.locator("table.trees tbody tr").first.wait_for()
            fcp = page.evaluate("performance.getEntriesByName('first-contentful-paint')[0]"
                                "?.startTime ?? null")
            ov = page.evaluate("performance.getEntriesByName('hsae-overview')[0].startTime")
            page.evaluate("performance.clearMarks('hsae-tree')")
            t = page.evaluate("performance.now()")
            page.goto(index.as_uri() + f"#/hsae/t{big_l}_{big_i}")
            page.locator(".tok.act").first.wait_for()
            tree = page.evaluate("performance.getEntriesByName('hsae-tree')[0].startTime") - t
            page.goto(index.as_uri() + "#/hsae")
            page.locator("table.trees tbody tr").first.wait_for()
            t = time.perf_counter()
            page.fill("#search", "word1234")
            page.locator("#results .hit").first.wait_for()
            search_ms = 1000 * (time.perf_counter() - t)
            hits = page.locator("#results .note").inner_text()
            fcp = f"{fcp:.0f} ms" if fcp is not None else "not reported"
            print(f"run {run}: first contentful paint {fcp}, overview table rendered {ov:.0f} ms, "
                  f"largest tree ({sizes.max()} nodes) rendered {tree:.0f} ms after navigation; "
                  "first token search (loads search.js, 150 ms debounce included) "
                  f"{search_ms:.0f} ms: {hits}; page errors: {errors or 'none'}")
            page.close()
        browser.close()


if __name__ == "__main__":
    main()
