"""The static feature-forest browser (issue 6; the paper's Figure 1 as a site).

``write_site`` turns each model's forest, its eval statistics, its top-activating contexts and
the judge's verdicts into a folder that opens from ``file://`` with no server:

    index.html, app.js, style.css        the viewer (assets/ beside this module)
    data/overview.js                     every model's trees (roots, sizes, branching): first paint
    data/<model>/search.js               feature -> tree, top tokens (loaded on the first search)
    data/<model>/t<level>_<id>.js        one tree: nodes, links, contexts (loaded when opened)
    data/<model>/s<level>_<chunk>.js     features outside every tree, 256 per file

With the semantic scores (:mod:`.semantic_view`), a node carries the eval documents it fires in
(``d``) and its top document labels (``lab``: [label index, share, lift]), a scored link its
topic coherence and document co-occurrence (``sc``), and each tree the means of both over its
scored links (the overview's ``coh``, ``co``, ``scored`` columns).

Each data file is a script calling ``HSAE.put(key, value)``: Chromium blocks ``fetch`` of
``file://`` URLs but loads ``<script src>`` from the page's folder, so nothing needs a server.
A tree is a parentless feature with at least one child; its nodes are listed depth first.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hsae_core.common import fsio
from hsae_core.model.forest import Forest

from .semantic_view import SemanticView, tree_means
from .stats import ForestStats

ASSETS = Path(__file__).with_name("assets")
SINGLE_CHUNK = 256

#: one context: its tokens (decoded strings) and the feature's activation on each
Context = tuple[Sequence[str], Sequence[float]]
#: (parent_level, parent, child_level, child) -> [(verdict, confidence, order), ...]
JudgeVerdicts = dict[tuple[int, int, int, int], list[tuple[str, str, str]]]


@dataclass
class ModelView:
    """What the browser shows of one model: ``contexts(level, id)`` gives a feature's
    top-activating contexts, best first (empty list when none were collected); ``semantic``
    its labels and link scores (None: not computed, the site says so); ``about`` what the
    overview says of the model (empty: nothing); ``judge_how`` how to get verdicts when there
    are none."""

    name: str
    label: str
    forest: Forest
    stats: ForestStats
    contexts: Callable[[int, int], list[Context]]
    judge: JudgeVerdicts | None = None
    notes: list[str] = field(default_factory=list)
    semantic: SemanticView | None = None
    about: str = ""
    judge_how: str = "run the judge stage"


@dataclass
class TreeIndex:
    """Per feature (global index = level offset + id): the global index of its tree's root."""

    level_sizes: tuple[int, ...]
    offsets: np.ndarray
    root: np.ndarray
    n_children: list[np.ndarray]
    freq: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def of(cls, forest: Forest) -> "TreeIndex":
        sizes = forest.level_sizes
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        root = np.empty(offsets[-1], dtype=np.int64)
        root[:sizes[0]] = np.arange(sizes[0])
        for l, parent_of in enumerate(forest.parent_of):
            p = parent_of.cpu().numpy()
            own = offsets[l + 1] + np.arange(sizes[l + 1])
            root[own] = np.where(p >= 0, root[offsets[l] + np.clip(p, 0, None)], own)
        kids = [forest.n_children(l).cpu().numpy() for l in range(len(sizes) - 1)]
        kids.append(np.zeros(sizes[-1], dtype=np.int64))
        return cls(tuple(sizes), offsets, root, kids)

    def split(self, g: int) -> tuple[int, int]:
        level = int(np.searchsorted(self.offsets, g, side="right") - 1)
        return level, int(g - self.offsets[level])

    def tree_roots(self) -> np.ndarray:
        """Global indices of the roots of trees with at least two nodes, ascending."""
        size = np.bincount(self.root, minlength=self.root.size)
        return np.nonzero(size >= 2)[0]


def _node_tokens(ctxs: list[Context], k: int = 12) -> list[str]:
    """A feature's distinct activating tokens over its contexts, largest activation first."""
    best: dict[str, float] = {}
    for tokens, acts in ctxs:
        for t, a in zip(tokens, acts):
            t = str(t).strip()
            if t and a > 0 and a > best.get(t, 0.0):
                best[t] = float(a)
    return sorted(best, key=best.get, reverse=True)[:k]


def _ctx_payload(ctxs: list[Context], limit: int) -> tuple[list, float]:
    """Contexts as [[tokens], [activation in % of the feature's max]] and that max."""
    ctxs = list(ctxs)[:limit]
    amax = max((max((float(a) for a in acts), default=0.0) for _, acts in ctxs), default=0.0)
    out = []
    for tokens, acts in ctxs:
        q = [int(round(100 * max(0.0, float(a)) / amax)) if amax > 0 else 0 for a in acts]
        out.append([[str(t) for t in tokens], q])
    return out, amax


def _num(v: float, digits: int = 4):
    return None if v is None or not np.isfinite(v) else round(float(v), digits)


def _script(key: str, value) -> str:
    return (f"HSAE.put({json.dumps(key)},"
            f"{json.dumps(value, separators=(',', ':'), ensure_ascii=False)});\n")


def _node(view: ModelView, idx: TreeIndex, level: int, i: int, parent: int, pc, cp,
          limit: int) -> dict:
    ctxs = view.contexts(level, i)
    payload, amax = _ctx_payload(ctxs, limit)
    node = {"l": level, "i": i, "p": parent, "f": _num(idx.freq[level][i], 6),
            "n": int(idx.n_children[level][i]), "pc": pc, "cp": cp, "ctx": payload,
            "amax": _num(amax, 3),
            "top": " | ".join(_node_tokens(ctxs, 3)), "toks": _node_tokens(ctxs)}
    sem = view.semantic
    if sem is not None:
        node["d"] = int(sem.docs[level][i])
        if sem.top[level][i] is not None:
            node["lab"] = [[t, round(share, 3), round(lift, 2)]
                           for t, share, lift in sem.top[level][i]]
    return node


def _tree_nodes(view: ModelView, idx: TreeIndex, level: int, root: int, limit: int,
                pcs: list[np.ndarray], cps: list[np.ndarray], children: list[dict]) -> list[dict]:
    """The tree's nodes depth first; ``p`` is the parent's index in the list (-1 for the root)."""
    nodes = [_node(view, idx, level, root, -1, None, None, limit)]
    stack = [(level, root, 0)]
    while stack:
        l, i, at = stack.pop()
        if l + 1 >= len(idx.level_sizes):
            continue
        kids = children[l].get(i, [])
        # children by firing frequency, most frequent first (stack order: push reversed)
        kids = sorted(kids, key=lambda j: -view.stats.fired[l + 1][j])
        placed = []
        for j in kids:
            node = _node(view, idx, l + 1, j, at, _num(pcs[l][j]), _num(cps[l][j]), limit)
            scores = view.semantic.link(l, j) if view.semantic is not None else None
            if scores is not None:
                node["sc"] = [_num(v) for v in scores]
            if view.judge is not None:
                verdict = view.judge.get((l, i, l + 1, j))
                if verdict:
                    node["j"] = [list(v) for v in verdict]
            nodes.append(node)
            placed.append((l + 1, j, len(nodes) - 1))
        stack.extend(reversed(placed))
    return _depth_first(nodes)


def _depth_first(nodes: list[dict]) -> list[dict]:
    """Reorder nodes (built breadth-wise per parent) into depth-first order, remapping ``p``."""
    kids: dict[int, list[int]] = {}
    for k, n in enumerate(nodes):
        kids.setdefault(n["p"], []).append(k)
    order, stack = [], [0]
    while stack:
        k = stack.pop()
        order.append(k)
        stack.extend(reversed(kids.get(k, [])))
    new = {old: pos for pos, old in enumerate(order)}
    out = []
    for old in order:
        n = dict(nodes[old])
        n["p"] = new[n["p"]] if n["p"] >= 0 else -1
        out.append(n)
    return out


def write_site(out: str | Path, views: Sequence[ModelView], *, title: str = "HSAE feature forest",
               contexts_per_feature: int = 8, info: dict | None = None) -> Path:
    """Write the browser for ``views`` into ``out``, replaced whole (written under a temporary
    name, then swapped in: no file of the old site is rewritten in place). Returns
    ``out/index.html``."""
    out = Path(out)
    with fsio.replacing_folder(out) as tmp:
        (tmp / "data").mkdir()
        for name in ("index.html", "app.js", "style.css"):
            shutil.copy(ASSETS / name, tmp / name)
        overview = {"title": title, "info": info or {}, "models": []}
        for view in views:
            folder = tmp / "data" / view.name
            folder.mkdir()
            overview["models"].append(_write_model(folder, view, contexts_per_feature))
        (tmp / "data" / "overview.js").write_text(_script("overview", overview),
                                                  encoding="utf-8")
    return out / "index.html"


def _write_model(folder: Path, view: ModelView, limit: int) -> dict:
    forest, stats = view.forest, view.stats
    idx = TreeIndex.of(forest)
    sizes = forest.level_sizes
    idx.freq = [stats.freq(l) for l in range(len(sizes))]
    children: list[dict[int, list[int]]] = []
    for parent_of in forest.parent_of:
        d: dict[int, list[int]] = {}
        for j, p in enumerate(parent_of.cpu().tolist()):
            if p >= 0:
                d.setdefault(p, []).append(j)
        children.append(d)
    pcs = [stats.p_parent_given_child(l) for l in range(len(sizes) - 1)]
    cps = [stats.p_child_given_parent(l) for l in range(len(sizes) - 1)]
    labels: list[list[str]] = [[""] * n for n in sizes]
    cols = {k: [] for k in ("l", "i", "size", "live", "kids", "depth", "branch", "f", "top",
                            "judged", "yes", "coh", "co", "scored")}
    for g in idx.tree_roots().tolist():
        level, i = idx.split(g)
        nodes = _tree_nodes(view, idx, level, i, limit, pcs, cps, children)
        for n in nodes:
            labels[n["l"]][n["i"]] = " | ".join(n.pop("toks"))
        key = f"{view.name}/t{level}_{i}"
        (folder / f"t{level}_{i}.js").write_text(
            _script(key, {"model": view.name, "nodes": nodes}), encoding="utf-8")
        internal = sum(1 for n in nodes if n["n"] > 0)
        judged = [v[0] for n in nodes for v in n.get("j", []) if v[0] in ("yes", "no")]
        cols["l"].append(level)
        cols["i"].append(i)
        cols["size"].append(len(nodes))
        cols["live"].append(sum(1 for n in nodes if n["f"]))  # nodes that fire on the eval split
        cols["kids"].append(nodes[0]["n"])
        cols["depth"].append(max(n["l"] for n in nodes) - level + 1)
        cols["branch"].append(round((len(nodes) - 1) / max(1, internal), 2))
        cols["f"].append(nodes[0]["f"])
        cols["top"].append(nodes[0]["top"])
        cols["judged"].append(len(judged))
        cols["yes"].append(sum(v == "yes" for v in judged))
        for k, v in tree_means([n["sc"] for n in nodes if "sc" in n]).items():
            cols[k].append(v)
    # features outside every tree: chunked files, opened by search
    lone = np.bincount(idx.root, minlength=idx.root.size)[idx.root] < 2
    for level, n in enumerate(sizes):
        own = lone[idx.offsets[level]:idx.offsets[level + 1]]
        for c in range(0, n, SINGLE_CHUNK):
            ids = [c + k for k in np.nonzero(own[c:c + SINGLE_CHUNK])[0].tolist()]
            if not ids:
                continue
            nodes = {}
            for i in ids:
                node = _node(view, idx, level, i, -1, None, None, limit)
                labels[level][i] = " | ".join(node.pop("toks"))
                nodes[str(i)] = node
            (folder / f"s{level}_{c // SINGLE_CHUNK}.js").write_text(
                _script(f"{view.name}/s{level}_{c // SINGLE_CHUNK}", nodes), encoding="utf-8")
    roots = [[idx.split(int(g)) for g in idx.root[idx.offsets[l]:idx.offsets[l + 1]]]
             for l in range(len(sizes))]
    search = {"root": [[r[0] * 10_000_000 + r[1] for r in level] for level in roots],
              "toks": labels,
              "f": [[_num(v, 6) for v in idx.freq[l]] for l in range(len(sizes))]}
    (folder / "search.js").write_text(_script(f"{view.name}/search", search), encoding="utf-8")
    judged = sum(cols["judged"])
    sem = view.semantic
    semantic = None if sem is None else {"labels": sem.names, "min_docs": sem.min_docs,
                                         "documents": sem.documents,
                                         "scored": sum(len(p) for p in sem.links)}
    return {"name": view.name, "label": view.label, "about": view.about,
            "level_sizes": list(sizes),
            "tokens": stats.tokens, "single_chunk": SINGLE_CHUNK, "n_lone": int(lone.sum()),
            "judge": view.judge is not None, "judge_how": view.judge_how,
            "judged_links": judged, "notes": view.notes, "semantic": semantic, "trees": cols}


__all__ = ["Context", "JudgeVerdicts", "ModelView", "TreeIndex", "write_site"]
