"""compute-metrics: evaluate the HSAE and the post-hoc baseline on the eval split and write one
metrics JSON (read by ``dvc metrics show/diff``) plus a human table (§4.2, Appendix D).

JSON layout, per model name (``hsae``, ``posthoc``)::

    <model>.level<l>.{l0, fve, fve_pooled, dead_frac, lm_loss, lm_loss_recovered}
    <model>.pair<l>.{hamming, p_parent_given_child, p_child_given_parent, pc_skipped, cp_skipped,
                     parents_with_children, children_assigned, assigned_frac, children_mean, ...}
    <model>.mean.{l0, fve, hamming, p_parent_given_child, p_child_given_parent}
    lm.{loss_clean, loss_zero, tokens}; eval_tokens
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hsae_core.common.errors import check_field, is_int
from hsae_core.data.reader import EvalActivations
from hsae_core.data.store import StoreInfo
from hsae_core.evaluation.evaluate import evaluate_hsae
from hsae_core.evaluation.splice import SplicedLoss, batched_by_length, eval_sequences, load_full_lm, recovered
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
    device: str = "cpu"
    """Torch device of the evaluation (SAEs and language model)."""

    def __post_init__(self) -> None:
        check_field(self, "eval_tokens", self.eval_tokens is None or (is_int(self.eval_tokens) and self.eval_tokens >= 1),
               "None or an integer >= 1")
        check_field(self, "batch_size", is_int(self.batch_size) and self.batch_size >= 2, "an integer >= 2")
        check_field(self, "lm_loss_tokens", is_int(self.lm_loss_tokens) and self.lm_loss_tokens >= 0,
               "an integer >= 0 (0 = skip the spliced loss)")
        check_field(self, "lm_batch_sequences", is_int(self.lm_batch_sequences) and self.lm_batch_sequences >= 1,
               "an integer >= 1")
        check_field(self, "device", isinstance(self.device, str) and self.device.split(":")[0] in ("cpu", "cuda", "mps"),
               "cpu, cuda, cuda:N or mps")


def eval_batches(store: StoreInfo, scale: float, cfg: MetricsConfig):
    """Normalised eval activations in batches of ``cfg.batch_size`` (a last batch of one row,
    which has no variance to explain, is dropped)."""
    for batch in EvalActivations(store, scale, batch_size=cfg.batch_size, max_tokens=cfg.eval_tokens):
        if batch.activations.shape[0] >= 2:
            yield batch.activations


def lm_metrics(models: dict[str, HSAE], store: StoreInfo, scale: float, cfg: MetricsConfig) -> dict:
    """Clean, zero-ablated and per-level spliced next-token losses over ``cfg.lm_loss_tokens``."""
    attrs = store.attrs
    lm = load_full_lm(attrs["model"], attrs.get("extract_config", {}).get("gguf_file"), cfg.device)
    spliced = SplicedLoss(lm, int(attrs["layer"]), int(attrs["bos_token_id"]))

    def through(model: HSAE, level: int):
        def replace(h: torch.Tensor) -> torch.Tensor:
            x = h.float() * scale
            return model.reconstruct(x, level) / scale
        return replace

    conditions = {"clean": None, "zero": torch.zeros_like}
    for name, model in models.items():
        for l in range(model.n_levels):
            conditions[f"{name}/level{l}"] = through(model, l)
    for ids in batched_by_length(eval_sequences(store, cfg.lm_loss_tokens), cfg.lm_batch_sequences):
        spliced.add(ids, conditions)
    losses = spliced.losses()
    out = {"lm": {"loss_clean": losses["clean"], "loss_zero": losses["zero"], "tokens": spliced.count}}
    for name, model in models.items():
        out[name] = {f"level{l}": {"lm_loss": losses[f"{name}/level{l}"],
                                   "lm_loss_recovered": recovered(losses["clean"], losses["zero"],
                                                                  losses[f"{name}/level{l}"])}
                     for l in range(model.n_levels)}
    return out


def compute_metrics(models: dict[str, HSAE], store: StoreInfo, scale: float, cfg: MetricsConfig) -> dict:
    """Every metric of every model, streamed over the eval split (one batch in memory)."""
    out: dict = {}
    for name, model in models.items():
        out[name] = evaluate_hsae(model.to(cfg.device), eval_batches(store, scale, cfg))
    out["eval_tokens"] = out[next(iter(models))].pop("tokens")
    for res in out.values():
        if isinstance(res, dict):
            res.pop("tokens", None)
    if cfg.lm_loss_tokens:
        lm = lm_metrics(models, store, scale, cfg)
        out["lm"] = lm.pop("lm")
        for name, levels in lm.items():
            for level, vals in levels.items():
                out[name][level].update(vals)
    return out


def format_table(metrics: dict, models: tuple[str, ...] = ("hsae", "posthoc")) -> str:
    """A markdown table: per level L0 / FVE / dead / spliced loss, per pair the hierarchy metrics."""
    names = [m for m in models if m in metrics]
    n_levels = sum(1 for k in metrics[names[0]] if k.startswith("level"))
    rows = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label: str, get) -> None:
        rows.append(f"| {label} | " + " | ".join(_fmt(get(metrics[m])) for m in names) + " |")

    for l in range(n_levels):
        for key in ("l0", "fve", "dead_frac", "lm_loss", "lm_loss_recovered"):
            if key in metrics[names[0]][f"level{l}"]:
                row(f"level {l} {key}", lambda m, l=l, key=key: m[f"level{l}"][key])
    for l in range(n_levels - 1):
        for key in ("hamming", "p_parent_given_child", "p_child_given_parent", "parents_with_children",
                    "children_assigned", "children_mean", "children_max"):
            row(f"pair {l}-{l + 1} {key}", lambda m, l=l, key=key: m[f"pair{l}"][key])
    for key in ("hamming", "p_parent_given_child", "p_child_given_parent", "fve"):
        row(f"mean {key}", lambda m, key=key: m["mean"][key])
    if "lm" in metrics:
        rows.append(f"\nclean next-token loss {metrics['lm']['loss_clean']:.4f}, zero-ablated "
                    f"{metrics['lm']['loss_zero']:.4f}, over {metrics['lm']['tokens']} predictions; "
                    f"{metrics['eval_tokens']} eval tokens")
    return "\n".join(rows)


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


__all__ = ["compute_metrics", "eval_batches", "format_table", "json_safe", "lm_metrics"]
