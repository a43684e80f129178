"""compute-metrics: evaluate the HSAE, the post-hoc baseline and (issue 26) the Matryoshka arm on
the eval split and write one metrics JSON (read by ``dvc metrics show/diff``), a headline JSON
and a human table (§4.2, Appendix D).

JSON layout (short, stable names: ``p_pc`` = P(parent|child), ``p_cp`` = P(child|parent); the
restricted forms are ``*_min`` whatever k, which ``min_fires`` records), per model name
(``hsae``, ``posthoc``, ``matryoshka``); every metric ``m`` that is not a count carries its 95%
interval over
eval documents (hsae_core.evaluation.bootstrap: the bias-corrected jackknife, links fixed on
the full sample; docs/intervals.md) as ``m_lo`` / ``m_hi``, right after it::

    <model>.mean.{hamming, p_pc, p_cp, fve, l0, then the rest below, averaged over level pairs;
                  l0, fve, dead_frac over levels}
    <model>.level<l>.{l0, fve, fve_pooled, dead_frac, lm_loss, lm_loss_recovered}
    <model>.pair<l>.{hamming, p_pc, p_cp, hamming_per_parent, p_pc_pooled, p_cp_pooled,
                     p_pc_min, p_cp_min, links_min, pc_skipped, cp_skipped,
                     parents_with_children, children_assigned, ...}
    <model>.pair<l> / .mean also: topic_coherence and doc_cooccurrence of the forest's links
                   and of frequency-matched random pairs (``*_random``), links_scored
                   (hsae_core.evaluation.semantic; topic coherence needs document labels)
    diff.<metric>: hsae minus posthoc of each mean, with a paired interval (both models are
                   resampled with the same documents)
    diff_matryoshka.<metric>: hsae minus matryoshka; diff_matryoshka_posthoc.<metric>:
                   matryoshka minus posthoc (both paired, as diff)
    lm.{loss_clean, loss_zero, tokens}; eval_tokens; eval_documents; min_fires

The Matryoshka arm is evaluated as the baseline is: its nested groups are its levels (L0, dead
fraction and every hierarchy and semantic metric of its post-hoc forest per group), except that a
group alone reconstructs nothing the model ever outputs, so its ``level<l>`` FVE, pooled FVE and
spliced loss are those of prefix l (the first l + 1 groups together; ``prefixes`` in
:func:`compute_metrics`).

The headline JSON (:func:`headline`) holds the paper's headline numbers alone, listed first by
``dvc exp show`` and ``dvc metrics diff``: per model the mean Hamming, P(p|c), P(c|p), FVE and
L0, and ``delta`` (hsae minus posthoc; ``delta_matryoshka``: hsae minus matryoshka) of the first
four with its interval.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from hsae_core.common.device import resolve_device_field
from hsae_core.common.errors import check_field, coerce_fields, is_int
from hsae_core.data.reader import EvalActivations
from hsae_core.data.store import StoreInfo
from hsae_core.evaluation.bootstrap import interval, replicate_weights
from hsae_core.evaluation.evaluate import (
    Bootstrap,
    count_model,
    replicate_metrics,
    summarize,
)
from hsae_core.evaluation.metrics import branching_stats
from hsae_core.evaluation.semantic import SemanticConfig, document_labels, semantic_replicates
from hsae_core.evaluation.splice import (
    SplicedLoss,
    batched_by_length,
    eval_sequences,
    load_full_lm,
    recovered,
)
from hsae_core.model.hsae import HSAE


@dataclass(frozen=True)
class MetricsConfig:
    eval_tokens: int | None = None
    """Eval-split tokens used for L0, FVE, dead fraction and the hierarchy metrics (None = all)."""
    batch_size: int = 2048
    """Eval tokens per batch; FVE's centring uses the batch mean (SAEBench legacy FVE)."""
    lm_loss_tokens: int = 8192
    """Eval tokens (whole sequences, in store order) over which the next-token loss is measured
    with each level's reconstruction spliced in; 0 skips the spliced loss."""
    lm_batch_sequences: int = 8
    """Sequences per forward pass of the language model."""
    bootstrap: int = 1000
    """Resampling rows behind every interval (0: point estimates only): the jackknife over eval
    documents in min(documents, this) leave-a-group-out rows (one document each when they are
    fewer; hsae_core.evaluation.bootstrap)."""
    min_fires: int = 20
    """k of the restricted macro averages: links whose parent and child each fire at least k
    times on the eval tokens (``p_pc_min``, ``p_cp_min``, ``links_min`` in metrics.json)."""
    link_min_docs: int = 5
    """Eval documents each endpoint of a link must fire in for its semantic scores (topic
    coherence, document co-occurrence; hsae_core.evaluation.semantic)."""
    seed: int = 0
    """Seed of the jackknife's document groups (shared by both models: paired) and of the
    semantic scores' random control."""
    device: str = "cpu"
    """Torch device of the evaluation (SAEs and language model): cpu, cuda, cuda:N, mps or
    auto (cuda if torch sees one, else cpu)."""

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_field(self, "eval_tokens", self.eval_tokens is None
                    or (is_int(self.eval_tokens) and self.eval_tokens >= 1),
                    "None or an integer >= 1")
        check_field(self, "batch_size", is_int(self.batch_size) and self.batch_size >= 2,
                    "an integer >= 2")
        check_field(self, "lm_loss_tokens",
                    is_int(self.lm_loss_tokens) and self.lm_loss_tokens >= 0,
                    "an integer >= 0 (0 = skip the spliced loss)")
        check_field(self, "lm_batch_sequences",
                    is_int(self.lm_batch_sequences) and self.lm_batch_sequences >= 1,
                    "an integer >= 1")
        check_field(self, "bootstrap", is_int(self.bootstrap) and self.bootstrap >= 0,
                    "an integer >= 0 (0 = no intervals)")
        check_field(self, "min_fires", is_int(self.min_fires) and self.min_fires >= 1,
                    "an integer >= 1")
        check_field(self, "link_min_docs", is_int(self.link_min_docs) and self.link_min_docs >= 1,
                    "an integer >= 1")
        check_field(self, "seed", is_int(self.seed) and self.seed >= 0, "an integer >= 0")
        resolve_device_field(self)

    @property
    def boot(self) -> Bootstrap:
        return Bootstrap(self.bootstrap, self.seed, self.min_fires)


def eval_batches(store: StoreInfo, scale: float, cfg: MetricsConfig):
    """Normalised eval batches (:class:`~hsae_core.data.reader.EvalBatch`: activations and
    document ids) of ``cfg.batch_size`` rows (a batch of one row, which has no variance to
    explain, is dropped)."""
    for batch in EvalActivations(store, scale, batch_size=cfg.batch_size,
                                 max_tokens=cfg.eval_tokens):
        if batch.activations.shape[0] >= 2:
            yield batch


def eval_labels(store: StoreInfo, docs: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """The label of each eval document (the store's ``documents/label``; -1: none) and the
    number of labels; ``(None, 0)`` when the corpus has no label column."""
    arr = store.group["documents/label"]
    names = list(arr.attrs.get("label_names", []))
    if not names:
        return None, 0
    return document_labels(docs, arr[:]), len(names)


def lm_metrics(models: dict[str, HSAE], store: StoreInfo, scale: float,
               cfg: MetricsConfig) -> dict:
    """Clean, zero-ablated and per-level spliced next-token losses over ``cfg.lm_loss_tokens``."""
    attrs = store.attrs
    lm = load_full_lm(attrs["model"], attrs.get("extract_config", {}).get("gguf_file"), cfg.device)
    spliced = SplicedLoss(lm, int(attrs["layer"]), int(attrs["bos_token_id"]),
                          attrs["outliers"]["norm_ratio"])

    def through(model: HSAE, level: int):
        def replace(h: torch.Tensor) -> torch.Tensor:
            x = h.float() * scale
            return model.reconstruct(x, level) / scale
        return replace

    conditions = {"clean": None, "zero": torch.zeros_like}
    for name, model in models.items():
        for l in range(model.n_levels):
            conditions[f"{name}/level{l}"] = through(model, l)
    sequences = eval_sequences(store, cfg.lm_loss_tokens)
    for ids in batched_by_length(sequences, cfg.lm_batch_sequences):
        spliced.add(ids, conditions)
    losses = spliced.losses()
    out = {"lm": {"loss_clean": losses["clean"], "loss_zero": losses["zero"],
                  "tokens": spliced.count}}
    for name, model in models.items():
        out[name] = {f"level{l}": {"lm_loss": losses[f"{name}/level{l}"],
                                   "lm_loss_recovered": recovered(losses["clean"], losses["zero"],
                                                                  losses[f"{name}/level{l}"])}
                     for l in range(model.n_levels)}
    return out


#: The paired differences of metrics.json: key -> (minuend, subtrahend).
DIFFS = {"diff": ("hsae", "posthoc"), "diff_matryoshka": ("hsae", "matryoshka"),
         "diff_matryoshka_posthoc": ("matryoshka", "posthoc")}
#: Level metrics that a model's ``prefixes`` replace (module docstring).
PREFIX_KEYS = ("fve", "fve_pooled")


def compute_metrics(models: dict[str, HSAE], store: StoreInfo, scale: float,
                    cfg: MetricsConfig, training: dict[str, dict | None] | None = None,
                    prefixes: dict[str, HSAE] | None = None) -> dict:
    """Every metric of every model, streamed over the eval split (one batch in memory), and the
    paired differences of :data:`DIFFS` whose two models are present. ``training[name]``: where
    that model's training ended (``Trainer.summary``), whose train-stream dead fractions are
    reported beside the eval split's (``dead_frac_train``). ``prefixes[name]``: a model whose
    level l reconstructs as ``name`` does from its levels 0..l together (the Matryoshka's
    prefixes): its FVE and spliced loss stand for ``name``'s per level."""
    out: dict = {}
    reps = {}
    prefixes = prefixes or {}
    for name, model in models.items():
        counts = count_model(model.to(cfg.device), eval_batches(store, scale, cfg))
        reps[name] = replicate_metrics(counts, cfg.boot)
        if name in prefixes:
            whole = replicate_metrics(count_model(prefixes[name].to(cfg.device),
                                                  eval_batches(store, scale, cfg)), cfg.boot)
            for key in list(reps[name]):
                group, metric = key.split("/")
                if metric in PREFIX_KEYS and group != "mean":
                    reps[name][key] = whole[key]
            reps[name]["mean/fve"] = whole["mean/fve"]
        docs = counts.documents()
        labels, n_labels = eval_labels(store, docs)
        sem, _ = semantic_replicates(counts, replicate_weights(docs.numel(), cfg.bootstrap,
                                                               cfg.seed),
                                     labels, n_labels, SemanticConfig(cfg.link_min_docs,
                                                                      seed=cfg.seed))
        reps[name].update(sem)
        out[name] = summarize(reps[name], cfg.bootstrap > 0)
        for l, branch in enumerate(branching_stats(counts.forest)):
            out[name][f"pair{l}"].update(branch)
        ended = (training or {}).get(name)
        if ended:
            for l, dead in enumerate(ended["dead_frac_train"]):
                out[name][f"level{l}"]["dead_frac_train"] = dead
            out[name]["mean"]["dead_frac_train"] = sum(ended["dead_frac_train"]) / model.n_levels
        out["eval_tokens"] = counts.tokens
        out["eval_documents"] = int(counts.documents().numel())
        out["doc_labels"] = n_labels  # 0: no label column, topic coherence unavailable
    for diff, (a, b) in DIFFS.items():
        if {a, b} <= set(reps):
            out[diff] = {}
            for key, value in reps[a].items():
                if key.startswith("mean/") and key in reps[b]:
                    point, lo, hi = interval(value - reps[b][key])
                    name = key.split("/")[1]
                    out[diff][name] = point
                    if cfg.bootstrap:
                        out[diff][f"{name}_lo"], out[diff][f"{name}_hi"] = lo, hi
    if cfg.lm_loss_tokens:
        lm = lm_metrics({**models, **prefixes}, store, scale, cfg)
        out["lm"] = lm.pop("lm")
        for name, levels in lm.items():
            for level, vals in levels.items():
                out[name][level].update(vals)
    out["min_fires"] = cfg.min_fires
    return short_names(out, cfg.min_fires)


#: metrics.json's short names of the evaluation's (hsae_core.evaluation.evaluate) long ones.
SHORT = {"p_parent_given_child": "p_pc", "p_child_given_parent": "p_cp"}
#: The paper's headline numbers, first in every group.
HEADLINE = ("hamming", "p_pc", "p_cp", "fve", "l0")
#: Top-level order of metrics.json.
TOP = ("hsae", "posthoc", "matryoshka", *DIFFS, "lm", "eval_tokens", "eval_documents",
       "doc_labels", "min_fires")
#: The models of metrics.json, in order.
MODELS = ("hsae", "posthoc", "matryoshka")


def short_name(name: str, min_fires: int) -> str:
    """``p_parent_given_child_min20_lo`` -> ``p_pc_min_lo`` (k is recorded once)."""
    name = re.sub(rf"_min{min_fires}(?=_|$)", "_min", name)
    for long, short in SHORT.items():
        name = name.replace(long, short)
    return name


def short_names(metrics: dict, min_fires: int) -> dict:
    """``metrics`` with short names (:func:`short_name`) in a stable order: models first, in
    each model the mean first, in each group the :data:`HEADLINE` metrics first, each interval
    right after its metric."""
    def group(d: dict) -> dict:
        named = {short_name(k, min_fires): v for k, v in d.items()}
        base = [k for k in named if not k.endswith(("_lo", "_hi"))]
        base.sort(key=lambda k: HEADLINE.index(k) if k in HEADLINE else len(HEADLINE))
        out = {}
        for k in base:
            out[k] = named[k]
            out |= {f"{k}{e}": named[f"{k}{e}"] for e in ("_lo", "_hi") if f"{k}{e}" in named}
        return out | {k: v for k, v in named.items() if k not in out}

    def rank(key: str) -> tuple[int, int]:  # mean, level0.., pair0.., anything else
        for i, prefix in enumerate(("mean", "level", "pair")):
            if key.startswith(prefix) and key[len(prefix):].isdigit() | (key == "mean"):
                return i, int(key[len(prefix):] or 0)
        return 3, 0

    def model(d: dict) -> dict:
        return {k: group(d[k]) if isinstance(d[k], dict) else d[k] for k in sorted(d, key=rank)}

    out = {}
    for key in sorted(metrics, key=lambda k: TOP.index(k) if k in TOP else len(TOP)):
        value = metrics[key]
        if key in MODELS:
            value = model(value)
        elif key in DIFFS:
            value = group(value)
        out[key] = value
    return out


def headline(metrics: dict) -> dict:
    """The paper's headline numbers from :func:`compute_metrics`' output: per model the mean
    of each :data:`HEADLINE` metric, and ``delta`` (hsae minus posthoc, from ``diff``) and
    ``delta_matryoshka`` (hsae minus matryoshka) of the hierarchy metrics and FVE with their
    95% intervals."""
    out = {m: {k: metrics[m]["mean"].get(k) for k in HEADLINE} for m in MODELS if m in metrics}
    for delta, diff in (("delta", "diff"), ("delta_matryoshka", "diff_matryoshka")):
        if diff in metrics:
            out[delta] = {f"{k}{e}": metrics[diff][f"{k}{e}"] for k in HEADLINE[:4]
                          for e in ("", "_lo", "_hi") if f"{k}{e}" in metrics[diff]}
    return out


#: Rows of the table: (label, key) per level, per pair and for the means.
LEVEL_ROWS = ("l0", "fve", "dead_frac", "dead_frac_train", "lm_loss", "lm_loss_recovered")
SEMANTIC_ROWS = ("topic_coherence", "topic_coherence_random", "doc_cooccurrence",
                 "doc_cooccurrence_random", "links_scored")
PAIR_ROWS = ("hamming", "p_pc", "p_cp", "hamming_per_parent", "p_pc_pooled", "p_cp_pooled",
             "parents_with_children", "children_assigned", "children_mean", "children_max")


def format_table(metrics: dict, models: tuple[str, ...] = MODELS) -> str:
    """A markdown table of :func:`compute_metrics`' output: the means first (the headline
    metrics leading), then per level L0 / FVE / dead / spliced loss and per pair the hierarchy
    metrics (the paper's forms and the robust ones), each with its 95% interval; and the paired
    differences (:data:`DIFFS`) of the means."""
    names = [m for m in models if m in metrics]
    diffs = [d for d, (a, b) in DIFFS.items() if d in metrics and {a, b} <= set(names)]
    n_levels = sum(1 for k in metrics[names[0]] if k.startswith("level"))
    head = names + [f"{DIFFS[d][0]} - {DIFFS[d][1]}" for d in diffs]
    rows = ["| metric | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]

    def row(label: str, group: str, key: str) -> None:
        cells = [_cell(metrics[m].get(group, {}), key) for m in names]
        cells += [_cell(metrics[d], key) if group == "mean" else "" for d in diffs]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    restricted = [k for k in metrics[names[0]].get("mean", {})
                  if k.startswith("p_") and "_min" in k and not k.endswith(("_lo", "_hi"))]
    k = f" (k = {metrics['min_fires']})" if "min_fires" in metrics else ""
    for key in ("hamming", "p_pc", "p_cp", "fve", "l0", "hamming_per_parent", "p_pc_pooled",
                "p_cp_pooled", *restricted, *SEMANTIC_ROWS, "dead_frac", "dead_frac_train"):
        if key in metrics[names[0]].get("mean", {}):
            row(f"mean {key}{k if key in restricted else ''}", "mean", key)
    for l in range(n_levels):
        for key in LEVEL_ROWS:
            if key in metrics[names[0]][f"level{l}"]:
                row(f"level {l} {key}", f"level{l}", key)
    for l in range(n_levels - 1):
        for key in (*PAIR_ROWS, *restricted):
            row(f"pair {l}-{l + 1} {key}", f"pair{l}", key)
    if "lm" in metrics:
        rows.append(f"\nclean next-token loss {metrics['lm']['loss_clean']:.4f}, zero-ablated "
                    f"{metrics['lm']['loss_zero']:.4f}, over {metrics['lm']['tokens']} "
                    f"predictions; {metrics['eval_tokens']} eval tokens in "
                    f"{metrics.get('eval_documents', '?')} documents; [95% intervals over "
                    "documents, bias-corrected jackknife]; \u2020 an interval that misses its "
                    "point estimate: the point is biased by more than 1.96 standard errors and "
                    "the interval is shifted by the estimated bias (docs/intervals.md)")
    if "matryoshka" in names:
        rows.append("\nmatryoshka: its nested groups are its levels (L0, dead, the post-hoc "
                    "forest's pairs); its level FVE and spliced loss are those of the prefix "
                    "ending with that group")
    if metrics.get("doc_labels") == 0:
        rows.append("\ntopic coherence: unavailable, the corpus has no document label column "
                    "(name one in extract.label_column and re-extract); document co-occurrence "
                    "needs none")
    return "\n".join(rows)


def _cell(group: dict, key: str) -> str:
    """``value [lo, hi]``; a dagger marks an interval that misses its own point estimate: the
    jackknife's bias estimate exceeds 1.96 standard errors there, so the point is biased and
    the interval corrected (topic coherence of links resting on few documents)."""
    if key not in group:
        return ""
    text = _fmt(group[key])
    lo, hi = group.get(f"{key}_lo"), group.get(f"{key}_hi")
    if f"{key}_lo" in group:
        text += f" [{_fmt(lo)}, {_fmt(hi)}]"
        if _finite(lo, hi, group[key]) and not lo <= group[key] <= hi:
            text += " \u2020"
    return text


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def json_safe(obj):
    """``obj`` with NaN and infinities replaced by None (JSON has no NaN; dvc reads null)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _fmt(v) -> str:
    if v is None:
        return "nan"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.4g}" if abs(v) >= 10 else f"{v:.4f}"


__all__ = ["DIFFS", "HEADLINE", "MODELS", "MetricsConfig", "compute_metrics", "eval_batches",
           "format_table", "headline", "json_safe", "lm_metrics", "short_name", "short_names"]
