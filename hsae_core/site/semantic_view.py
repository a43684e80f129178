"""What the browser shows of the judge-free semantic scores (issue 14): each feature's top
document labels and each link's topic coherence and document co-occurrence, from the same eval
counts and the same code as compute-metrics (:mod:`hsae_core.evaluation.semantic`), as point
estimates (no bootstrap).

- **Top labels** of a feature firing in at least ``min_docs`` eval documents: the labels of those
  documents, most frequent first, each with its *share* (of the feature's labelled documents) and
  its *lift* (that share over the label's share of the whole eval split: 1 = no preference).
- **Link scores**: a link is scored when both ends fire in at least ``min_docs`` documents (as in
  compute-metrics); topic coherence is NaN where a lift is flat and absent without labels.
- **Per tree**: the mean of each score over the tree's scored links (None when it has none), by
  which the overview sorts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from hsae_core.evaluation.bootstrap import doc_weights
from hsae_core.evaluation.metrics import EvalCounts
from hsae_core.evaluation.semantic import (
    SemanticConfig,
    doc_indicator,
    document_labels,
    label_onehot,
    semantic_replicates,
)

#: One feature's top labels: (label index, share of its labelled documents, lift).
TopLabels = list[tuple[int, float, float]]


@dataclass
class SemanticView:
    """``names``: the corpus's label names ([]: no label column); ``docs[l][i]``: eval documents
    feature i of level l fires in; ``top[l][i]``: its top labels (None below ``min_docs`` or
    without labels); ``links[pair][child]``: (topic coherence or None, document co-occurrence or
    None) of each scored link."""

    names: list[str]
    min_docs: int
    documents: int
    docs: list[np.ndarray]
    top: list[list[TopLabels | None]]
    links: list[dict[int, tuple[float | None, float | None]]] = field(default_factory=list)

    @property
    def has_labels(self) -> bool:
        return bool(self.names)

    def link(self, pair: int, child: int) -> tuple[float | None, float | None] | None:
        """The scores of the link into ``child`` of level ``pair + 1``; None if unscored."""
        return self.links[pair].get(child)


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def top_labels(indicator: torch.Tensor, labels: torch.Tensor, n_labels: int, min_docs: int,
               k: int = 3) -> list[TopLabels | None]:
    """Per feature (rows of the ``[n, n_docs]`` firing indicator), its ``k`` most frequent
    document labels with share and lift, or None if it fires in fewer than ``min_docs``
    documents (or in no labelled one). ``labels``: each document's label, -1 for none."""
    onehot = label_onehot(labels, n_labels)
    base = (onehot.sum(0) / onehot.sum().clamp_min(1.0)).numpy()  # the eval split's labels
    per = (indicator.double() @ onehot).numpy()  # [n, T]: labelled documents per feature, label
    labelled = per.sum(1)
    fires = indicator.sum(1).numpy()
    order = np.argsort(-per, axis=1, kind="stable")[:, :k]  # ties: the lower label index
    out: list[TopLabels | None] = []
    for i in range(per.shape[0]):
        if fires[i] < min_docs or labelled[i] <= 0:
            out.append(None)
            continue
        share = per[i] / labelled[i]
        out.append([(int(t), float(share[t]), float(share[t] / base[t]))
                    for t in order[i] if per[i, t] > 0])
    return out


def semantic_view(counts: EvalCounts, label_of: np.ndarray | None, names: list[str],
                  cfg: SemanticConfig = SemanticConfig(), k: int = 3) -> SemanticView:
    """The browser's semantic data of one model's eval counts. ``label_of``: the store's
    ``documents/label`` (label index per document id, -1 none); ``names`` its ``label_names``
    (empty: the corpus has no labels, so no top labels and no topic coherence)."""
    docs = counts.documents()
    labels = document_labels(docs, label_of) if names and label_of is not None else None
    n_labels = len(names) if labels is not None else 0
    _, per_link = semantic_replicates(counts, doc_weights(docs.numel(), 0, cfg.seed), labels,
                                      n_labels, cfg)
    view = SemanticView(list(names) if labels is not None else [], cfg.min_docs,
                        int(docs.numel()), [], [])
    for level in range(counts.n_levels):
        ind = doc_indicator(counts, level)
        view.docs.append(ind.sum(1).numpy().astype(np.int64))
        view.top.append(top_labels(ind, labels, n_labels, cfg.min_docs, k)
                        if labels is not None else [None] * ind.shape[0])
    for pair in per_link:
        coh = pair.get("topic_coherence", [None] * len(pair["children"]))
        view.links.append({int(c): (_finite(t), _finite(d)) for c, t, d in
                           zip(pair["children"], coh, pair["doc_cooccurrence"])})
    return view


def tree_means(scores: list[tuple[float | None, float | None]]) -> dict:
    """Mean topic coherence (``coh``) and document co-occurrence (``co``) over a tree's scored
    links (None where no link has a finite value) and how many links were scored."""
    def mean(vals: list[float | None]) -> float | None:
        vals = [v for v in vals if v is not None]
        return round(sum(vals) / len(vals), 4) if vals else None
    return {"coh": mean([s[0] for s in scores]), "co": mean([s[1] for s in scores]),
            "scored": len(scores)}


__all__ = ["SemanticView", "TopLabels", "semantic_view", "top_labels", "tree_means"]
