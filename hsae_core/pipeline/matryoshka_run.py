"""Train the Matryoshka arm (issue 26; :mod:`hsae_core.model.matryoshka`) on an activation store
and save it as two folders the rest of the pipeline reads as it reads the baseline:

    <out>/groups/     each nested group as a level (save_hsae; empty forest): the post-hoc rule
                      links group g's features to group g-1's (build-posthoc-trees), and the
                      hierarchy metrics, semantic scores and L0 per group are computed on it
    <out>/prefixes/   each prefix as a level: its decode is the prefix's reconstruction (FVE and
                      the spliced loss per prefix, the SAELens export of every prefix)

Both hold the run's end (``training.json``: the train-stream dead fraction per group or prefix,
the inference threshold). The matching to the other two arms (:func:`matryoshka_config`): the
same store, normalisation, batch, steps, warm-up, dead window and seed as ``sae:``, groups of
the HSAE's level sizes, and BatchTopK's ``k`` = the HSAE's total L0 over its levels
(``n_levels * sae.target_l0``). Curves with DVCLive under ``<curves>`` (run ``matryoshka``:
``loss``, ``aux``, ``lr``, ``l0``, ``threshold``, ``dead``, ``prefix<g>/{mse,fve}``,
``group<g>/l0``); a killed run resumes from its checkpoint as the HSAE's does
(:mod:`hsae_core.pipeline.train_run`, :mod:`hsae_core.pipeline.checkpoint`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hsae_core.common import fsio
from hsae_core.common.errors import check_field, coerce_fields
from hsae_core.data.reader import TrainActivations
from hsae_core.data.store import StoreInfo
from hsae_core.model.config import HSAEConfig
from hsae_core.model.hsae import HSAE
from hsae_core.model.jumprelu import JumpReLULevel
from hsae_core.model.matryoshka import MatryoshkaConfig, MatryoshkaSAE, MatryoshkaTrainer
from hsae_core.pipeline.checkpoint import code_fingerprint, data_identity, read_checkpoint
from hsae_core.pipeline.io import save_hsae
from hsae_core.pipeline.params import check_unchanged
from hsae_core.pipeline.train_run import LiveCurves, TrainRunConfig, diverged, train_store


@dataclass(frozen=True)
class MatryoshkaParams:
    """The ``matryoshka:`` section of params.yaml: what is the arm's own. Everything else (sizes,
    tokens, warm-up, dead window, seed, device, the total L0) comes from ``sae:``."""

    lr: float = 2e-4
    """Peak Adam learning rate (the anchor's 2e-4; docs/matryoshka.md: the sweep behind it)."""
    aux_coef: float = 1 / 32
    """Weight of the auxiliary dead-latent loss (the anchor's auxk_alpha)."""
    aux_k: int = 0
    """Dead latents per token in the auxiliary loss; 0: d_model // 2 (the anchor's)."""
    threshold_momentum: float = 0.99
    """EMA momentum of the inference threshold (a 100-step memory; the anchor's 0.999 suits
    runs of ~10^5 steps)."""
    threshold_start_frac: float = 0.1
    """The threshold EMA starts after this fraction of the steps."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (the anchor's); 0: none."""

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_field(self, "lr", self.lr > 0, "a positive number")
        check_field(self, "aux_coef", self.aux_coef >= 0, ">= 0")
        check_field(self, "aux_k", self.aux_k >= 0, ">= 0 (0 = d_model // 2)")
        check_field(self, "threshold_momentum", 0 <= self.threshold_momentum < 1, "in [0, 1)")
        check_field(self, "threshold_start_frac", 0 <= self.threshold_start_frac < 1,
                    "in [0, 1)")
        check_field(self, "grad_clip", self.grad_clip >= 0, ">= 0 (0 = no clipping)")


def matryoshka_config(sae: HSAEConfig, arm: MatryoshkaParams) -> MatryoshkaConfig:
    """The arm matched to the baseline's ``sae:`` config (``MatryoshkaConfig.from_hsae``: groups
    of its level sizes, k = n_levels * target_l0, the same tokens) with ``arm``'s own knobs."""
    return MatryoshkaConfig.from_hsae(
        sae, lr=arm.lr, aux_coef=arm.aux_coef, aux_k=arm.aux_k,
        threshold_momentum=arm.threshold_momentum,
        threshold_start_frac=arm.threshold_start_frac, grad_clip=arm.grad_clip)


class MatryoshkaCurves(LiveCurves):
    """:class:`LiveCurves` with the trainer's records logged as they are (flat keys)."""

    def __call__(self, step: int, rec: dict) -> None:
        row = {"step": step} | {k: v for k, v in rec.items() if k != "step"}
        self.rows.append(row)
        if self.live is not None:
            self._log(row)
            self.live.make_summary()


def as_levels_model(sae: HSAEConfig, levels: list[JumpReLULevel]) -> HSAE:
    """``levels`` as an HSAE with an empty forest: the baseline's config (rho = 0, no updates)
    with their sizes, so every tool that reads a saved baseline reads it."""
    cfg = sae.replace(level_sizes=tuple(lv.n_features for lv in levels), rho=0.0,
                      swap_rate=0.0, update_interval=0, device="cpu")
    model = HSAE(cfg)
    with torch.no_grad():
        for mine, lv in zip(model.levels, levels):
            for name, p in lv.named_parameters():
                getattr(mine, name).copy_(p.detach().cpu())
    return model


def save_matryoshka(model: MatryoshkaSAE, sae: HSAEConfig, out: str | Path, dead: torch.Tensor,
                    window: int, step: int) -> dict[str, dict]:
    """Write ``<out>/groups`` and ``<out>/prefixes`` (module docstring); ``dead`` (bool over the
    latents) is the train stream's dead mask over the last ``window`` tokens. Returns the two
    folders' ``training.json`` records."""
    theta = float(model.threshold)
    dead = dead.cpu()
    ends = model.cfg.prefix_sizes
    base = {"step": step, "tokens": step * model.cfg.batch_size, "dead_window_tokens": window,
            "threshold": theta, "k": model.cfg.k}
    records = {"groups": base | {"dead_frac_train": [float(dead[lo:hi].double().mean())
                                                     for lo, hi in model.groups()]},
               "prefixes": base | {"dead_frac_train": [float(dead[:m].double().mean())
                                                       for m in ends]}}
    out = fsio.as_location(out)
    save_hsae(as_levels_model(sae, model.group_levels()), fsio.join(out, "groups"),
              training=records["groups"])
    save_hsae(as_levels_model(sae, model.prefix_levels()), fsio.join(out, "prefixes"),
              training=records["prefixes"])
    return records


def train_matryoshka_on_store(cfg: MatryoshkaConfig, store: str | Path | StoreInfo,
                              scale: float | str | Path, *, checkpoint: str | Path,
                              curves: str | Path, run: TrainRunConfig = TrainRunConfig()
                              ) -> MatryoshkaTrainer:
    """Train ``cfg.total_steps`` steps on the store's shuffled train rows (the baseline's reader
    and seed), resuming from ``checkpoint`` when it holds a run of the same config, code and
    data; returns the finished trainer."""
    info = train_store(store, cfg.d_model, cfg.batch_size)
    reader = TrainActivations(info, scale, batch_size=cfg.batch_size, seed=cfg.seed, epochs=None,
                              max_tokens=cfg.total_steps * cfg.batch_size, drop_last=True,
                              buffer_blocks=run.buffer_blocks)
    data = data_identity(info, reader.scale)
    checkpoint = fsio.as_location(checkpoint)
    state = read_checkpoint(checkpoint, cfg, data=data)
    start = int(state["step"]) if state is not None else 0
    if start:
        print(f"matryoshka: resuming from {checkpoint} at step {start} of {cfg.total_steps}")
    log = MatryoshkaCurves(curves, cfg.n_groups, "matryoshka", start,
                           rows=(state or {}).get("curves"), live=bool(start))
    t0, every = time.perf_counter(), run.log_every * max(1, cfg.total_steps // 20 // run.log_every)

    def on_log(step: int, rec: dict) -> None:
        log(step, rec)
        if step % every == 0 or step == cfg.total_steps:
            l0 = " ".join(f"{rec[f'group{g}/l0']:.1f}" for g in range(cfg.n_groups))
            fve = " ".join(f"{rec[f'prefix{g}/fve']:.3f}" for g in range(cfg.n_groups))
            print(f"matryoshka step {step}/{cfg.total_steps} loss {rec['loss']:.4g} L0 per group "
                  f"[{l0}] FVE per prefix [{fve}] dead {rec['dead']} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    def on_checkpoint(trainer: MatryoshkaTrainer) -> None:
        record = {"code": code_fingerprint(), "data": data, "curves": log.rows}
        fsio.save_torch(trainer.state_dict() | record, checkpoint)
        log.commit()

    trainer = MatryoshkaTrainer(cfg, log_every=run.log_every, on_log=on_log,
                                checkpoint_every=run.checkpoint_every,
                                on_checkpoint=on_checkpoint)
    if state is not None:
        trainer.load_state_dict(state)
    del state
    try:
        trainer.fit(reader)
    except FloatingPointError as err:
        raise diverged(err, info, "matryoshka") from err
    check_unchanged("matryoshka's training")
    log.end()
    return trainer


__all__ = ["MatryoshkaCurves", "MatryoshkaParams", "as_levels_model", "matryoshka_config",
           "save_matryoshka", "train_matryoshka_on_store"]
