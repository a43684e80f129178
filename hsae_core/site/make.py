"""Everything the report stage produces from a finished run: the browser and the figures.

Inputs are plain objects (models, eval batches, evidence, judge pairs, metrics, ablation rows),
so the stage reads files and this module only computes and writes under ``out``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hsae_core.common import fsio
from hsae_core.evaluation.evidence import PAD, Evidence
from hsae_core.evaluation.semantic import SemanticConfig
from hsae_core.model.hsae import HSAE

from . import figures
from .build import ModelView, TreeIndex, write_site
from .config import ReportConfig
from .scale_figure import fig_scale
from .semantic_view import semantic_view
from .stats import ForestStats, feature_inputs, forest_stats

#: The eval batches, fresh on each call: EvalBatches (document ids: the semantic scores), or
#: tensors (every token its own document)
Batches = Callable[[], Iterable]
#: The browser's name of each model (others: their key)
LABELS = {"hsae": "HSAE", "baseline": "Baseline (independent SAEs + post-hoc forest)",
          "matryoshka": "Matryoshka (groups as levels, post-hoc forest)"}
#: The judge's ``source`` of each model's verdicts (others: their key)
JUDGE_SOURCES = {"hsae": "hsae", "baseline": "posthoc", "matryoshka": "matryoshka"}
#: What the overview says of a model before its trees (none: nothing)
ABOUT = {"matryoshka": "The third arm (issue 26): a Matryoshka BatchTopK SAE trained on the same "
                       "store, its nested groups shown as levels (level l = group l, not the "
                       "prefix of groups 0..l), its forest built after training by the "
                       "baseline's post-hoc rule."}
#: How to get a model's judge verdicts, where the judge stage is not the answer (others: "run the
#: judge stage")
JUDGE_HOW = {"matryoshka": "the pipeline does not judge this forest; give the report a pairs "
                           "file with source \"matryoshka\" (--judge) to show verdicts"}
#: The store's document labels: ``documents/label`` (label index per document id, -1 none) and
#: its ``label_names`` (empty: the corpus has no label column)
DocLabels = tuple[np.ndarray, list[str]]


def evidence_contexts(ev: Evidence | None) -> Callable[[int, int], list]:
    """A feature's contexts from collected evidence (hsae_core.evaluation.evidence): top ones
    first, then the activation-sampled ones, each as (token strings, activations) without
    padding."""
    if ev is None:
        return lambda level, i: []
    vocab = ev.vocab

    def contexts(level: int, i: int) -> list:
        lv = ev.levels[level]
        out = []
        for e in range(lv.rows.shape[1]):
            if lv.rows[i, e] < 0:
                continue
            ids = lv.token_ids[i, e]
            keep = ids != PAD
            out.append(([vocab[t] if 0 <= t < len(vocab) else "\ufffd"
                         for t in ids[keep].tolist()],
                        lv.acts[i, e][keep].tolist()))
        return out
    return contexts


def judge_verdicts(pairs: Sequence[dict] | None, source: str) -> dict | None:
    """(parent_level, parent, child_level, child) -> [(verdict, confidence, order), ...] of one
    source (the judge may ask about a link in both orders: every answer is kept)."""
    if pairs is None:
        return None
    out: dict = {}
    for p in pairs:
        if p.get("source") == source:
            key = (int(p["parent_level"]), int(p["parent"]), int(p["child_level"]),
                   int(p["child"]))
            out.setdefault(key, []).append((str(p["verdict"]), str(p.get("confidence") or ""),
                                            str(p.get("order") or "")))
    return out


def read_judge(path: Path) -> tuple[list[dict] | None, str | None]:
    """The judge's pairs (data/judge/pairs.jsonl) or (None, why not)."""
    if not path.is_file():
        return None, f"no judge output ({path} missing): run the judge stage"
    pairs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    need = {"source", "parent_level", "parent", "child_level", "child", "verdict"}
    bad = [k for k, p in enumerate(pairs) if not need <= set(p)]
    if bad:
        raise ValueError(f"{path}: line {bad[0] + 1} lacks {sorted(need - set(pairs[bad[0]]))}")
    if not pairs:
        return None, f"judge output {path} is empty"
    return pairs, None


def read_curves(folder: Path, name: str) -> dict[str, tuple[list[int], list[float]]]:
    """The training curves DVCLive logged for run ``name`` under ``folder``
    (``plots/metrics/train/<name>/<metric>.tsv``, hsae_core.pipeline.train_run):
    ``{"level0/l0": (steps, values), "loss": ..., ...}``; {} when there are none."""
    root = Path(folder) / "plots" / "metrics" / "train" / name
    out = {}
    for path in sorted(root.rglob("*.tsv")):
        steps, values = [], []
        for line in path.read_text().splitlines()[1:]:
            cells = line.split("\t")
            if len(cells) >= 2:
                steps.append(int(cells[-2]))
                values.append(float(cells[-1]))
        out[path.relative_to(root).with_suffix("").as_posix()] = (steps, values)
    return out


@dataclass
class UmapPanel:
    parent: tuple[int, int]
    siblings: list[tuple[int, int]]
    unrelated: tuple[int, int]


def choose_umap_panels(stats: ForestStats, cfg: ReportConfig,
                       max_siblings: int = 3) -> list[UmapPanel]:
    """Sibling groups for Figures 5/10: parents whose two best-firing children both fire on at
    least ``umap_min_fires`` tokens (best groups first; the paper's example is siblings at
    level 2), each against the best-firing eligible feature of the siblings' level in another
    tree."""
    forest = stats.forest
    idx = TreeIndex.of(forest)
    cands = []
    for pair in range(forest.n_pairs):
        parent_of = forest.parent_of[pair].cpu().numpy()
        fired = stats.fired[pair + 1]
        for p in np.unique(parent_of[parent_of >= 0]):
            kids = np.nonzero(parent_of == p)[0]
            kids = kids[np.argsort(-fired[kids], kind="stable")]
            kids = kids[fired[kids] >= cfg.umap_min_fires][:max_siblings]
            if len(kids) >= 2:
                cands.append((-int(fired[kids[1]]), -pair, pair, int(p), kids.tolist()))
    cands.sort()
    panels = []
    for _, _, pair, p, kids in cands[:cfg.umap_panels]:
        level = pair + 1
        tree = idx.root[idx.offsets[pair] + p]
        fired = stats.fired[level]
        other = [j for j in np.argsort(-fired, kind="stable").tolist()
                 if fired[j] >= cfg.umap_min_fires and idx.root[idx.offsets[level] + j] != tree]
        if other:
            panels.append(UmapPanel((pair, p), [(level, k) for k in kids],
                                    (level, other[len(panels) % len(other)])))
    return panels


def build_report(out: Path, models: dict[str, HSAE], batches: Batches, cfg: ReportConfig, *,
                 evidence: dict[str, Evidence | None], judge_pairs: list[dict] | None,
                 judge_note: str | None, metrics: dict | None, ablation_rows: list[dict] | None,
                 reference_params: dict[str, float], labels: dict[str, str] | None = None,
                 curves: dict[str, dict] | None = None, doc_labels: DocLabels | None = None,
                 semantic: SemanticConfig = SemanticConfig(), scale_study: dict | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Write ``out/site`` (the browser) and ``out/figures``; return a summary (also written to
    ``out/summary.json``). ``models`` maps "hsae" and "baseline" (the post-hoc forest), and
    optionally "matryoshka" (the third arm, groups as levels, its post-hoc forest), to models;
    ``evidence`` the same names to collected evidence (None: contexts are absent, the site says
    so); ``curves`` the same names to their training curves (:func:`read_curves`);
    ``doc_labels`` the store's document labels, from which, with ``semantic`` (compute-metrics'
    ``min_docs``), the site shows each feature's top labels, each link's scores and each tree's
    mean (None or no names: no labels, topic coherence unavailable; co-occurrence is shown)."""
    out = Path(out)
    labels = labels or LABELS
    stats: dict[str, ForestStats] = {}
    views = []
    for name, model in models.items():
        stats[name] = forest_stats(model, batches())
        label_of, names = doc_labels if doc_labels is not None else (None, [])
        sem = semantic_view(stats[name].counts, label_of, names, semantic)
        notes = []
        if evidence.get(name) is None:
            notes.append(f"No collected evidence for {name}: contexts are absent "
                         f"(run `dvc repro evidence-{name}`).")
        views.append(ModelView(name, labels.get(name, name), model.forest.to("cpu"), stats[name],
                               evidence_contexts(evidence.get(name)),
                               judge_verdicts(judge_pairs, JUDGE_SOURCES.get(name, name)),
                               notes, sem, ABOUT.get(name, ""),
                               JUDGE_HOW.get(name, "run the judge stage")))
        log(f"report: {name}: counted firings over {stats[name].tokens} eval tokens in "
            f"{sem.documents} documents; {sum(len(p) for p in sem.links)} links scored, "
            + (f"{len(sem.names)} document labels" if sem.has_labels
               else "no document labels (topic coherence unavailable)"))
    index = write_site(out / "site", views, contexts_per_feature=cfg.contexts_per_feature,
                       info={"judge": judge_note or "judge output present"})
    log(f"report: site -> {index}")

    fig_dir = out / "figures"
    written: dict[str, list[str]] = {}

    def keep(name: str, paths: list[Path]) -> None:
        written[name] = [str(p) for p in paths]

    keep("fig3", figures.fig3_hierarchy(fig_dir, metrics, judge_pairs, judge_note))
    keep("fig_semantic", figures.fig_semantic(fig_dir, metrics))
    keep("fig4", figures.fig_ablation(
        fig_dir, "fig4_mechanisms", "Figure 4: ablation of training mechanisms", ablation_rows, [
            ("Baseline\n(post-hoc)", "post-hoc Hamming", {}),
            ("w/o constraint\n(\u03c1 = 0)", "Hamming", {"rho": 0.0}),
            ("w/o perturbation\n(r = 0)", "Hamming", {"r": 0.0}),
            ("HSAE", "Hamming", {})]))
    keep("fig7", figures.fig_ablation(
        fig_dir, "fig7_similarity", "Figure 7: similarity metric of hierarchy updates",
        ablation_rows, [
            ("Co-activ", "Hamming", {"hierarchy.similarity": "coactivation"}),
            ("Decoder", "Hamming", {"hierarchy.similarity": "decoder"}),
            ("Encoder (HSAE)", "Hamming", {})]))
    keep("fig9", figures.fig_ablation(
        fig_dir, "fig9_tree", "Figure 9: tree structural assumptions", ablation_rows, [
            ("Fix tree", "Hamming", {"hierarchy.tree": "fixed"}),
            ("Full tree", "Hamming", {"hierarchy.tree": "full"}),
            ("Binary tree", "Hamming", {"hierarchy.tree": "binary"}),
            ("HSAE\n(partial)", "Hamming", {})]))
    keep("fig8", figures.fig8_tradeoff(fig_dir, ablation_rows, reference_params))
    keep("fig_training", figures.fig_training(fig_dir, curves))
    keep("fig_scale", fig_scale(fig_dir, scale_study))

    hsae = models["hsae"]
    panels = choose_umap_panels(stats["hsae"], cfg)
    if panels:
        feats = sorted({f for p in panels for f in [*p.siblings, p.unrelated]})
        inputs = feature_inputs(hsae, batches(), feats, cfg.umap_points)
        data = [{"parent": p.parent, "siblings": p.siblings, "unrelated": p.unrelated,
                 "inputs": inputs} for p in panels]
    else:
        data = []
    why = f"no HSAE parent has two children firing on >= {cfg.umap_min_fires} eval tokens"
    keep("fig5", figures.fig_umap(
        fig_dir, "fig5_umap", "Figure 5: siblings vs an unrelated feature (UMAP of activations)",
        data[:1], cfg.seed, why))
    keep("fig10", figures.fig_umap(
        fig_dir, "fig10_umap", "Figure 10: more sibling groups (UMAP of activations)",
        data, cfg.seed, why))
    keep("fig11", figures.fig11_branching(fig_dir, judge_pairs,
                                          hsae.forest.n_children(0).cpu().numpy(), judge_note))
    summary = {"site": str(index), "models": list(models), "figures": written,
               "judge": judge_note or "present",
               "ablation_rows": len(ablation_rows or []),
               "umap_panels": [{"parent": p.parent, "siblings": p.siblings,
                                "unrelated": p.unrelated} for p in panels],
               "trees": {v.name: len(TreeIndex.of(v.forest).tree_roots()) for v in views},
               "eval_tokens": {k: s.tokens for k, s in stats.items()},
               "doc_labels": len(views[0].semantic.names) if views else 0,
               "links_scored": {v.name: sum(len(p) for p in v.semantic.links) for v in views}}
    fsio.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log(f"report: figures -> {fig_dir}")
    return summary


__all__ = ["ABOUT", "JUDGE_HOW", "JUDGE_SOURCES", "LABELS", "UmapPanel", "build_report",
           "choose_umap_panels", "evidence_contexts",
           "judge_verdicts", "read_curves", "read_judge"]
