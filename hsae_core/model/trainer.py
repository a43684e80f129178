"""Training loop (§3.3, Appendix A): alternate N Adam steps with the forest fixed and a
hierarchy update; adaptive sparsity; ghost grads; resumable state.

The trainer consumes any iterable of ``[batch_size, d]`` activation batches. Its whole state is
``state_dict()``; ``on_checkpoint`` is handed the trainer every ``checkpoint_every`` steps and
at the end, and whoever owns files writes it (:mod:`hsae_core.pipeline.checkpoint`). After
``load_state_dict`` the trainer re-iterates the source from the start and skips the batches
already consumed, so a seeded source resumes exactly: an interrupted and resumed CPU run ends
bit-identical to an uninterrupted one (tested).

Data parallelism (``torchrun``; :mod:`hsae_core.common.distributed`): each rank receives its equal,
contiguous slice of every global batch (``cfg.batch_size`` stays the global batch) and the
model is wrapped in ``DistributedDataParallel``, which averages gradients. Every loss term but
the ghost-grad scale is a mean over tokens, so the averaged gradient is the global batch's.
Everything else that reads the batch is made global: the step-0 initialisation runs on the
gathered global batch, the sparsity controller consumes the all-reduced L0, the dead-feature
counters an all-reduced firing mask, the co-activation EMA is fed by rank 0 (whose slice holds
the global batch's first rows) and each hierarchy update is broadcast from rank 0. So every
rank holds the same state, rank 0 alone writes checkpoints, and a checkpoint resumes on any
number of ranks. A 2-rank Gloo run matches a 1-process run to float rounding (tested).
The ghost-grad loss is rescaled by the rank's own MSE / ghost-MSE ratio (jumprelu.py), so
with dead features present a multi-rank run differs from a 1-process one in that scale.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from hsae_core.common.distributed import (
    SINGLE,
    DistContext,
    all_gather_rows,
    all_reduce_sum_,
    barrier,
    broadcast_,
)
from hsae_core.model.config import HSAEConfig
from hsae_core.model.finite import FiniteWatch
from hsae_core.model.firing import FiringTracker
from hsae_core.model.forest import Forest
from hsae_core.model.hierarchy import CoactivationEMA, assign_forest
from hsae_core.model.jumprelu import resample_dead_
from hsae_core.model.hsae import HSAE, HSAEOutput
from hsae_core.model.sparsity import SparsityController

LogFn = Callable[[int, dict], None]
#: Dead features are resampled during the first 80% of the steps only: later the cosine-decayed
#: learning rate is too small for a new feature to find its place, and it would only add to L0.
RESAMPLE_UNTIL = 0.8
CheckpointFn = Callable[["Trainer"], None]


def lr_at(step: int, total: int, peak: float, warmup_frac: float, floor: float = 0.0) -> float:
    """Linear warm-up over ``warmup_frac`` of the steps, then cosine decay to zero (App. A.1),
    or to ``floor * peak`` (the thresholds' schedule, ``HSAEConfig.threshold_lr_floor``)."""
    warmup = int(round(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * max(floor, 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class StepStats:
    step: int
    loss: float
    mse: list[float]
    fve: list[float]
    l0: list[float]
    pc: list[float]
    lambdas: list[float]
    dead: list[int]
    assigned: list[int]
    lr: float
    unreachable: list[bool]
    churn: list[dict[str, float]] | None = None  # the hierarchy update(s) since the last record

    def as_record(self) -> dict:
        rec = {"step": self.step, "loss": self.loss, "lr": self.lr}
        for l, vals in enumerate(zip(self.mse, self.fve, self.l0, self.lambdas, self.dead,
                                     self.unreachable)):
            for name, v in zip(("mse", "fve", "l0", "lambda", "dead", "l0_unreachable"), vals):
                rec[f"level{l}/{name}"] = v
        for l, (pc, n) in enumerate(zip(self.pc, self.assigned)):
            rec[f"pair{l}/pc"] = pc
            rec[f"pair{l}/assigned"] = n
            for key, v in (self.churn[l] if self.churn else {}).items():
                rec[f"pair{l}/{key}"] = v
        return rec


class Trainer:
    """Trains an :class:`HSAE` (or, with rho = r = 0, independent levels) from a config."""

    def __init__(self, cfg: HSAEConfig, *, checkpoint_every: int = 0,
                 on_checkpoint: CheckpointFn | None = None, log_every: int = 50,
                 on_log: LogFn | None = None, dist: DistContext = SINGLE, compile: bool = False):
        """``on_checkpoint(trainer)``: called on every rank every ``checkpoint_every`` steps and
        after the last one (it saves ``trainer.state_dict()``; every rank holds the same state).
        ``dist``: this rank's context (batches are then its slices of ``cfg.batch_size``-row
        global batches); ``on_log`` is called on rank 0 only. ``compile``: run each level's
        dense pre-activation (encoder matmul, bias, autocast) through ``torch.compile``; the
        whole forward cannot be compiled (its data-dependent sparse support and custom autograd
        functions stop Dynamo with an internal error, torch 2.13)."""
        self.cfg, self.dist = cfg, dist
        if cfg.batch_size % dist.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} does not split evenly over "
                             f"{dist.world_size} "
                             f"ranks: choose a global batch divisible by the number of processes")
        self.local_batch = cfg.batch_size // dist.world_size
        if (cfg.similarity == "coactivation" and not cfg.is_independent and dist.active
                and cfg.coactivation_tokens > self.local_batch):
            raise ValueError(f"coactivation_tokens {cfg.coactivation_tokens} exceeds the per-rank "
                             f"batch {self.local_batch}: rank 0 feeds the co-activation EMA from "
                             "its slice, so "
                             f"lower coactivation_tokens or use fewer ranks")
        self.device = torch.device(dist.device if dist.active else cfg.device)
        self.model = HSAE(cfg).to(self.device)
        self.model.set_matmul_dtype_(cfg.autocast_dtype)  # training only: evaluation is fp32
        # before DDP and Adam see them
        self.model.pack_decoders_(slot_rows=cfg.n_levels * self.local_batch)
        self.forward = self.model
        if dist.active:
            from torch.nn.parallel import DistributedDataParallel

            cuda = self.device.type == "cuda"
            self.forward = DistributedDataParallel(
                self.model, device_ids=[self.device] if cuda else None,
                output_device=self.device if cuda else None)  # the model has no buffers
        if compile:  # the dense encoder matmul of each level (the sparse rest defeats Dynamo)
            for lv in self.model.levels:
                lv.preacts = torch.compile(lv.preacts, dynamic=True)
        # the thresholds in a group of their own: their schedule may keep a floor
        thresholds = [lv.threshold for lv in self.model.levels]
        rest = [p for p in self.model.parameters() if all(p is not t for t in thresholds)]
        self.optimizer = torch.optim.Adam([{"params": rest}, {"params": thresholds}], lr=cfg.lr,
                                          betas=cfg.adam_betas, **_fast_adam_kwargs(self.device))
        self.controller = SparsityController(cfg.n_levels, cfg.target_l0, cfg.l0_decay_rate,
                                             cfg.l0_ema_momentum, cfg.lambda_init, cfg.lambda_rate,
                                             self.device, cfg.lambda_min, cfg.lambda_max)
        self.firing = FiringTracker(cfg.level_sizes, self.device)
        coactivation = cfg.similarity == "coactivation" and not cfg.is_independent
        self.coactivation = (CoactivationEMA(cfg.level_sizes, cfg.coactivation_momentum,
                                             cfg.coactivation_tokens, self.device)
                             if coactivation else None)
        self.swap_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.resample_gen = torch.Generator().manual_seed(cfg.seed + 2)
        self.resampled = 0
        self.step = 0
        self.n_updates = 0
        self.churn: list[dict[str, float]] | None = None  # of updates not yet in a record
        self.checkpoint_every, self.on_checkpoint = checkpoint_every, on_checkpoint
        self.log_every, self.on_log = log_every, on_log
        self.finite = FiniteWatch(f"lower lr (now {cfg.lr}) or check the activations for NaN/Inf")

    # ----------------------------------------------------------------- the loop
    def fit(self, batches: Iterable[torch.Tensor]) -> HSAE:
        """Train up to ``cfg.total_steps`` steps, continuing from ``self.step`` (0, or the step
        of a loaded state: that many batches of the source are skipped)."""
        it = iter(batches)
        if self.step:
            it = itertools.islice(it, self.step, None)
        while self.step < self.cfg.total_steps:
            x = next(it, None)
            if x is None:
                raise RuntimeError(
                    f"the batch source ran out after {self.step} of {self.cfg.total_steps} steps: "
                    f"give it more tokens or epochs, or lower total_steps")
            self.train_step(x)
            every = self.checkpoint_every
            if self.on_checkpoint and every and self.step % every == 0:
                self.finite.check()  # never a checkpoint of a diverged state
                self.on_checkpoint(self)
        self.finite.check()
        if self.on_checkpoint:
            self.on_checkpoint(self)
        barrier(self.dist)
        return self.model

    def train_step(self, x: torch.Tensor) -> StepStats | None:
        """One Adam step on the batch ``x``; its statistics on a logging step. The loss's
        finiteness is read back every ``log_every`` steps, before a hierarchy update, a
        resampling or a checkpoint, and when a step fails (:mod:`~hsae_core.model.finite`)."""
        try:
            return self._train_step(x)
        except FloatingPointError:
            raise
        except Exception as err:  # a diverged run's later failure is reported as the divergence
            self.finite.check_from(err)
            raise

    def _train_step(self, x: torch.Tensor) -> StepStats | None:
        cfg, model = self.cfg, self.model
        self._check_batch(x)
        x = x.to(self.device, non_blocking=True).float()
        if self.step == 0 and cfg.threshold_init == 0:
            x_all = all_gather_rows(self.dist, x)  # the global batch, identical on every rank
            for lv in model.levels:
                lv.init_b_dec_(x_all)
                lv.init_thresholds_(x_all, cfg.target_l0)
        lr = lr_at(self.step, cfg.total_steps, cfg.lr, cfg.warmup_frac)
        lr_theta = lr_at(self.step, cfg.total_steps, cfg.lr * cfg.threshold_lr_scale,
                         cfg.warmup_frac, cfg.threshold_lr_floor / cfg.threshold_lr_scale)
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.param_groups[1]["lr"] = lr_theta
        swapped = self._draw_swaps()
        dead = self._dead_masks()
        logging = (self.on_log is not None or self.dist.active) and (
            (self.step + 1) % self.log_every == 0 or self.step + 1 == cfg.total_steps)
        out = self.forward(x, swapped=swapped, dead=dead, with_pc=cfg.rho > 0, clean_error=logging)
        loss = HSAE.total_loss(out, self.controller.lambdas, cfg.rho)
        self.finite.record(loss, self.step)  # read back below, not every step (a host sync)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        model.after_step_()
        l0 = self._global_l0(out)
        self.controller.update(l0)
        self._track_firing(out)
        self.step += 1
        update = self._update_due()
        resample = (cfg.resample_interval and self.step % cfg.resample_interval == 0
                    and self.step <= RESAMPLE_UNTIL * cfg.total_steps)
        if logging or update or resample or self.step % self.log_every == 0:
            self.finite.check()
        if update:
            self.update_hierarchy()
        if resample:
            self.resample_dead(x)  # after the update: a new feature joins the next one
        if logging:
            stats = self._stats(x, out, loss, lr, l0)
            if self.on_log is not None and self.dist.is_main:
                self.on_log(self.step, stats.as_record())
            return stats
        return None

    def _global_l0(self, out: HSAEOutput) -> torch.Tensor:
        """Per-level L0 of the global batch: the ranks' active counts summed, over the global
        batch size (on one rank, the batch L0 itself)."""
        if not self.dist.active:
            return out.l0
        counts = torch.round(out.l0.detach().float() * self.local_batch)
        return all_reduce_sum_(self.dist, counts) / self.cfg.batch_size

    # ------------------------------------------------------------ the hierarchy
    def _update_due(self) -> bool:
        """Every ``update_interval`` steps, but never after the last gradient step: a forest
        assigned then would be evaluated without ever having been trained with."""
        cfg = self.cfg
        if cfg.is_independent or cfg.update_interval == 0 or cfg.n_levels < 2:
            return False
        if self.step % cfg.update_interval or self.step >= cfg.total_steps:
            return False
        return not (cfg.tree == "fixed" and self.n_updates > 0)

    @torch.no_grad()
    def resample_dead(self, x: torch.Tensor) -> list[int]:
        """Resample every level's dead features on the global batch (config
        ``resample_interval``): new rows from badly reconstructed tokens, their Adam state set to
        the live rows' mean second moment, their dead counters restarted. Every rank computes
        the same from the gathered batch and the same generator."""
        x_all = all_gather_rows(self.dist, x)
        counts = []
        for l, (lv, dead) in enumerate(zip(self.model.levels, self._dead_masks() or [])):
            idx = resample_dead_(lv, x_all, dead, self.cfg.target_l0, self.resample_gen)
            counts.append(int(idx.numel()))
            if idx.numel() == 0:
                continue
            for p in (lv.W_enc, lv.W_dec, lv.b_enc, lv.threshold):
                state = self.optimizer.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        live = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
                        live[idx] = False
                        state[key][idx] = state[key][live].mean(0) if key == "exp_avg_sq" else 0
            self.firing.since_fired[l][idx] = 0
        self.resampled += sum(counts)
        return counts

    def live_features(self) -> list[torch.Tensor]:
        """Per level, the features that fired since the previous hierarchy update (since the
        start before the first): only they take part in an update (METHOD §4)."""
        window = self.cfg.update_interval * self.cfg.batch_size
        if self.n_updates == 0 or self.cfg.tree == "fixed":
            window = self.step * self.cfg.batch_size
        return [s < window for s in self.firing.since_fired]

    @torch.no_grad()
    def update_hierarchy(self) -> Forest:
        """Re-assign every live child to its most similar live parent (§3.3)."""
        cfg = self.cfg
        if self.dist.is_main or self.coactivation is None:
            forest = assign_forest(self.model.levels, cfg.similarity, cfg.exclude_quantile,
                                   cfg.tree, self.coactivation,
                                   self.live_features()).to(self.device)
        else:  # only rank 0 holds the co-activation statistics; it sends the forest below
            forest = Forest.empty(cfg.level_sizes, self.device)
        if self.dist.active:  # one forest on every rank, whatever float ties did elsewhere
            forest = Forest(cfg.level_sizes, [broadcast_(self.dist, p.contiguous())
                                              for p in forest.parent_of])
        churn = forest.churn(self.model.forest)
        if self.churn is not None:  # two updates between records: their changes add up
            churn = [{k: a[k] + b[k] for k in a} for a, b in zip(self.churn, churn)]
        self.churn = churn
        self.model.forest = forest
        self.n_updates += 1
        return self.model.forest

    def _draw_swaps(self) -> list[torch.Tensor] | None:
        cfg = self.cfg
        if cfg.swap_rate == 0 or self.model.forest.is_empty():
            return None
        sizes = cfg.level_sizes[:-1]
        z = torch.cat([torch.rand(n, generator=self.swap_gen) < cfg.swap_rate for n in sizes])
        if self.device.type == "cuda":  # one upload, asynchronous from pinned memory
            z = z.pin_memory()
        z = z.to(self.device, non_blocking=True)
        return [part & self.model.forest.has_children(l)
                for l, part in enumerate(z.split(list(sizes)))]

    # ------------------------------------------------------- dead features
    def _dead_masks(self) -> list[torch.Tensor] | None:
        if self.cfg.dead_window_tokens == 0:
            return None
        return self.firing.dead(self.cfg.dead_window_tokens)

    @torch.no_grad()
    def _track_firing(self, out: HSAEOutput) -> None:
        self.firing.update(out.codes, self.dist, self.cfg.batch_size)
        if self.coactivation is not None and self.dist.is_main:
            self.coactivation.update(out.codes)

    # ------------------------------------------------------------ reporting
    @torch.no_grad()
    def _stats(self, x: torch.Tensor, out: HSAEOutput, loss: torch.Tensor, lr: float,
               l0: torch.Tensor) -> StepStats:
        n = x.shape[0]
        sq_error, pc = out.sq_error, out.pc.detach()
        if self.dist.active:  # global sums: squared errors, loss, PC, and the batch's variance
            L, d = self.cfg.n_levels, self.cfg.d_model
            xf = x.float()
            packed = torch.cat([sq_error.float(), loss.detach().float().reshape(1), pc.float(),
                                xf.sum(0), xf.pow(2).sum().reshape(1)])
            all_reduce_sum_(self.dist, packed)
            n = self.cfg.batch_size
            sq_error = packed[:L]
            loss = packed[L] / self.dist.world_size
            pc = packed[L + 1: L + 1 + pc.numel()] / self.dist.world_size
            x_sum, x_sq = packed[L + 1 + pc.numel(): -1], packed[-1]
            total_var = x_sq - x_sum.pow(2).sum() / n
            assert x_sum.numel() == d
        else:
            total_var = (x - x.mean(0)).pow(2).sum()
        dead = self._dead_masks() or self.firing.dead(10 ** 18)
        return StepStats(
            step=self.step, loss=float(loss), lr=lr,
            mse=(sq_error / n).tolist(), fve=(1 - sq_error / total_var).tolist(),
            l0=l0.detach().tolist(), pc=pc.tolist(),
            lambdas=self.controller.lambdas.tolist(), dead=[int(d.sum()) for d in dead],
            assigned=[self.model.forest.n_assigned(l) for l in range(self.model.forest.n_pairs)],
            unreachable=self.controller.unreachable.tolist(), churn=self._take_churn())

    def _take_churn(self) -> list[dict[str, float]] | None:
        churn, self.churn = self.churn, None
        return churn

    def _check_batch(self, x: torch.Tensor) -> None:
        want = (self.local_batch, self.cfg.d_model)
        if tuple(x.shape) != want:
            per_rank = f" / {self.dist.world_size} ranks" if self.dist.active else ""
            raise ValueError(f"batch of shape {tuple(x.shape)} but the config asks for {want} "
                             f"(batch_size{per_rank}, d_model): fix the reader's batch size or "
                             "d_model")

    def summary(self) -> dict:
        """Where the run ended, per level: the train-stream dead fraction (no firing in the last
        ``dead_window_tokens``; the last ``batch_size * step`` tokens if the run was shorter),
        the L0 EMA and lambda of the sparsity controller, and the levels whose target L0 the
        data cannot reach (``l0_unreachable``: lambda at its floor, L0 still under target)."""
        window = self.cfg.dead_window_tokens or self.step * self.cfg.batch_size
        window = min(window, self.step * self.cfg.batch_size)
        return {"step": self.step, "tokens": self.step * self.cfg.batch_size,
                "dead_window_tokens": window,
                "dead_frac_train": [float(d.double().mean()) for d in self.firing.dead(window)],
                "l0_ema": self.controller.l0_ema.tolist(),
                "lambda": self.controller.lambdas.tolist(),
                "l0_unreachable": [l for l, u in enumerate(self.controller.unreachable.tolist())
                                   if u],
                "hierarchy_updates": self.n_updates,
                "resampled": self.resampled}

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "step": self.step,
            "n_updates": self.n_updates,
            "model": self.model.state_dict(),
            "forest": self.model.forest.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "controller": self.controller.state_dict(),
            "since_fired": self.firing.state(),
            "coactivation": self.coactivation.state_dict() if self.coactivation else None,
            "swap_gen": self.swap_gen.get_state(),
            "resample_gen": self.resample_gen.get_state(),
            "resampled": self.resampled,
            "churn": self.churn,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = HSAEConfig.from_dict(state["config"])
        if saved != self.cfg:
            diff = {k: (v, getattr(self.cfg, k)) for k, v in saved.to_dict().items()
                    if self.cfg.to_dict()[k] != v}
            raise ValueError(f"checkpoint was written with a different config {diff} "
                             f"(saved, now): delete it to start over, or restore the config")
        self.step, self.n_updates = int(state["step"]), int(state["n_updates"])
        self.model.load_state_dict(state["model"])
        self.model.forest = Forest.from_dict(state["forest"]).to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.controller.load_state_dict(state["controller"])
        self.firing.load_state(state["since_fired"], self.device)
        if self.coactivation is not None:
            self.coactivation.load_state_dict(state["coactivation"])
        # generator states are CPU byte tensors even for a CUDA generator; a checkpoint loaded
        # with map_location="cuda" (pipeline.checkpoint) has moved them to the GPU
        self.swap_gen.set_state(state["swap_gen"].cpu())
        self.resample_gen.set_state(state["resample_gen"].cpu())
        self.resampled = int(state["resampled"])
        self.churn = state.get("churn")

def _fast_adam_kwargs(device: torch.device) -> dict:
    """Fused Adam where this torch build has it for the device, else the foreach kernel."""
    if device.type in ("cpu", "cuda"):
        return {"fused": True}
    return {"foreach": True}
