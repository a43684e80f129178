"""The Matryoshka BatchTopK SAE (Bussmann et al. 2025, arXiv 2503.17547): issue 26's third arm.

One dictionary of ``n = sum(group_sizes)`` latents whose groups are nested prefixes: prefix g
is the first ``m_g = group_sizes[0] + ... + group_sizes[g]`` latents (the HSAE's level sizes
512 / 1024 / 2048 / 4096 give prefixes 512, 1536, 3584, 7680). Per batch ``x [B, d]``
(the paper's "Matryoshka SAEs" section; the anchor code is dictionary_learning's
``trainers/matryoshka_batch_top_k.py``, ``MatryoshkaBatchTopKSAE`` and its trainer)::

    pre    = ReLU((x - b_dec) W_enc^T + b_enc)              pre-encoder bias
    f      = BatchTopK_k(pre)   the round(k B) largest entries of the whole [B, n] batch
    xhat_g = f[:, :m_g] W_dec[:m_g] + b_dec                  one reconstruction per prefix
    loss   = sum_g w_g ||x - xhat_g||^2 + aux_coef * L_aux

Decoder rows are unit norm (their gradient is projected orthogonal to them before each step,
then they are renormalised). ``L_aux`` (:meth:`MatryoshkaSAE.aux_loss`) lets the top
``aux_k`` dead latents of each token reconstruct the detached residual of the full dictionary.
At inference BatchTopK, which couples the tokens of a batch, is replaced by one threshold
``theta`` (JumpReLU-style: ``f = pre * (pre > theta)``), an EMA of the smallest activation
BatchTopK kept in training; :meth:`~MatryoshkaSAE.group_levels` and
:meth:`~MatryoshkaSAE.prefix_levels` export groups and prefixes as JumpReLU levels.

Sparsity matched to the HSAE: ``k`` is the total L0 per token over the whole dictionary,
``MatryoshkaConfig.from_hsae`` sets it to the HSAE's four levels together (``n_levels *
target_l0``); how BatchTopK spreads it over the groups is learnt and reported per group.
Everything after the dense encoder matmul runs on the selected entries (sparse_ops.py).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import nn

from hsae_core.common.device import resolve_autocast_field, resolve_device_field
from hsae_core.common.errors import ConfigError, check_field, coerce_fields
from hsae_core.model.config import HSAEConfig
from hsae_core.model.firing import FiringTracker
from hsae_core.model.jumprelu import MIN_THRESHOLD, JumpReLULevel, SparseCode
from hsae_core.model.sparse_ops import SupportPattern, sparse_decode, spmm_cols
from hsae_core.model.trainer import lr_at


@dataclass(frozen=True)
class MatryoshkaConfig:
    d_model: int
    """Width d of the activations."""
    group_sizes: tuple[int, ...]
    """Latents per nested group, in order; the HSAE's level sizes (prefixes are their sums)."""
    k: float = 50.0
    """Total L0 per token over the whole dictionary: BatchTopK keeps the round(k * B) largest
    activations of each training batch (the HSAE's arm: n_levels * target_l0)."""
    prefix_weights: tuple[float, ...] | None = None
    """Weight w_g of each prefix's MSE; null: 1 each, the paper's sum over prefixes (the anchor
    code weights 1/G and averages, a further 1/G: only the ratio to aux_coef differs)."""
    aux_coef: float = 1 / 32
    """Weight of the auxiliary dead-latent loss (the anchor's auxk_alpha)."""
    aux_k: int = 0
    """Dead latents per token in the auxiliary loss; 0: d_model // 2 (the anchor's top_k_aux)."""
    dead_window_tokens: int = 10_000_000
    """A latent not kept by BatchTopK for this many tokens is dead (the anchor's 10M); 0: no
    auxiliary loss."""
    threshold_momentum: float = 0.99
    """EMA momentum of the inference threshold (the anchor: 0.999 over runs of ~10^5 steps; a
    100-step memory suits runs of ~10^3)."""
    threshold_start_frac: float = 0.1
    """The threshold EMA starts after this fraction of the steps (the anchor: step 1000), when
    the first minima, taken of an untrained encoder, no longer describe the model."""
    batch_size: int = 1024
    """Tokens per gradient step (BatchTopK's batch)."""
    total_steps: int = 10_000
    """Gradient steps of the run; sets the learning-rate schedule."""
    lr: float = 2e-4
    """Peak Adam learning rate (the anchor's default at 2^14 latents)."""
    warmup_frac: float = 0.1
    """Linear warm-up fraction, then cosine decay to zero (``trainer.lr_at``, as the HSAE)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam (beta1, beta2), the anchor's."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (the anchor's 1.0); 0: none."""
    seed: int = 0
    """Seeds initialisation."""
    device: str = "cpu"
    """Torch device: cpu, cuda, cuda:N, mps or auto."""
    autocast_dtype: str | None = None
    """The encoder matmul's autocast dtype in training, as ``HSAEConfig.autocast_dtype`` (null:
    fp32; auto: bfloat16 where the device runs it natively); selection, decode, threshold and
    everything after it stay fp32, and a saved model evaluates in fp32."""

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_field(self, "d_model", self.d_model > 0, "a positive integer")
        check_field(self, "group_sizes",
                    len(self.group_sizes) >= 1 and all(n > 0 for n in self.group_sizes),
                    "a non-empty list of positive integers, e.g. [512, 1024, 2048, 4096]")
        n = self.n_latents
        check_field(self, "k", 0 < self.k < n, f"0 < k < the dictionary size ({n}): the total "
                    "L0 per token over all groups")
        check_field(self, "k", self.k * self.batch_size >= 1,
                    f"k * batch_size >= 1 (batch_size {self.batch_size}): BatchTopK keeps "
                    "round(k * batch_size) activations per batch")
        w = self.prefix_weights
        check_field(self, "prefix_weights", w is None or (
            len(w) == self.n_groups and all(v >= 0 for v in w) and sum(w) > 0),
            f"null or {self.n_groups} non-negative numbers (one per group), not all 0")
        check_field(self, "aux_coef", self.aux_coef >= 0, ">= 0")
        check_field(self, "aux_k", self.aux_k >= 0, ">= 0 (0 = d_model // 2)")
        check_field(self, "dead_window_tokens", self.dead_window_tokens >= 0,
                    ">= 0 (0 = no auxiliary loss)")
        check_field(self, "threshold_momentum", 0 <= self.threshold_momentum < 1, "in [0, 1)")
        check_field(self, "threshold_start_frac", 0 <= self.threshold_start_frac < 1,
                    "in [0, 1)")
        check_field(self, "batch_size", self.batch_size > 0, "a positive integer")
        check_field(self, "total_steps", self.total_steps > 0, "a positive integer")
        check_field(self, "lr", self.lr > 0, "a positive number")
        check_field(self, "warmup_frac", 0 <= self.warmup_frac < 1, "0 <= warmup_frac < 1")
        check_field(self, "adam_betas", all(0 <= b < 1 for b in self.adam_betas),
                    "two numbers in [0, 1)")
        check_field(self, "grad_clip", self.grad_clip >= 0, ">= 0 (0 = no clipping)")
        resolve_device_field(self)
        resolve_autocast_field(self)

    @property
    def n_latents(self) -> int:
        return sum(self.group_sizes)

    @property
    def n_groups(self) -> int:
        return len(self.group_sizes)

    @property
    def prefix_sizes(self) -> tuple[int, ...]:
        """m_g: the latents of prefix g (cumulative group sizes)."""
        return tuple(itertools.accumulate(self.group_sizes))

    @property
    def threshold_start_step(self) -> int:
        return int(self.threshold_start_frac * self.total_steps)

    @classmethod
    def from_hsae(cls, hsae: HSAEConfig, **changes: Any) -> "MatryoshkaConfig":
        """The arm matched to an HSAE run: its level sizes as groups, the same total L0 per
        token (``n_levels * target_l0``), tokens (batch and steps), warm-up, dead window,
        seed, device and training precision; ``changes`` override any field."""
        fields = dict(d_model=hsae.d_model, group_sizes=hsae.level_sizes,
                      k=hsae.n_levels * hsae.target_l0, batch_size=hsae.batch_size,
                      total_steps=hsae.total_steps, warmup_frac=hsae.warmup_frac,
                      dead_window_tokens=hsae.dead_window_tokens, seed=hsae.seed,
                      device=hsae.device, autocast_dtype=hsae.autocast_dtype)
        return cls(**{**fields, **changes})

    def replace(self, **changes: Any) -> "MatryoshkaConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("group_sizes", "prefix_weights", "adam_betas"):
            out[key] = None if out[key] is None else list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MatryoshkaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"MatryoshkaConfig: unknown field(s) {unknown}; known fields: "
                              f"{sorted(known)}")
        return cls(**data)


def batch_topk_mask(acts: torch.Tensor, k: float) -> torch.Tensor:
    """BatchTopK's selection: the round(k * B) largest entries of the whole ``[B, n]`` batch
    (not k per token), as a bool mask; selected zeros (fewer positive entries) are dropped."""
    n_keep = int(round(k * acts.shape[0]))
    mask = torch.zeros(acts.numel(), dtype=torch.bool, device=acts.device)
    mask[acts.reshape(-1).topk(n_keep, sorted=False).indices] = True
    return mask.view_as(acts) & (acts > 0)


class _SelectedActs(torch.autograd.Function):
    """``vals[e] = (x[r] - b_dec) . W_enc[c] + b_enc[c]`` on the selected entries ``e = (r, c)``,
    all positive (the ReLU's derivative is 1); gradients for W_enc, b_enc and b_dec."""

    @staticmethod
    def forward(ctx, w_enc, b_enc, b_dec, xc, pre, pattern: SupportPattern):
        ctx.save_for_backward(xc, w_enc)
        ctx.pattern = pattern
        return pre[pattern.rows, pattern.cols]

    @staticmethod
    def backward(ctx, grad_vals):
        xc, w_enc = ctx.saved_tensors
        p: SupportPattern = ctx.pattern
        grad_w = spmm_cols(p, grad_vals, xc)
        grad_b = grad_vals.new_zeros(p.n_cols).index_add_(0, p.cols, grad_vals)
        return grad_w, grad_b, -(grad_b @ w_enc), None, None, None


class MatryoshkaOutput(NamedTuple):
    mse: torch.Tensor  # [G] mean over tokens of ||x - xhat_g||^2, one per prefix
    recons: list[torch.Tensor]  # [G] x [B, d]: the reconstruction from each prefix
    code: SparseCode  # the BatchTopK selection of the whole dictionary
    group_l0: torch.Tensor  # [G] mean active latents per token in each group (detached)
    sq_error: torch.Tensor  # [G] detached sum over tokens of ||x - xhat_g||^2


class MatryoshkaSAE(nn.Module):
    """Feature-major parameters as :class:`JumpReLULevel` (``W_enc[i]``, ``W_dec[i]`` are
    ``[n, d]`` rows); the scalar buffer ``threshold`` is negative until estimated."""

    def __init__(self, cfg: MatryoshkaConfig):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        w_dec = torch.randn(cfg.n_latents, cfg.d_model, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.clone())  # tied init, as the anchor
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_model))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("prefix_ends", torch.tensor(cfg.prefix_sizes))
        self.matmul_dtype: torch.dtype | None = None  # the trainer's autocast (training only)

    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    def groups(self) -> list[tuple[int, int]]:
        """[start, end) of each group's latents."""
        ends = self.cfg.prefix_sizes
        return list(zip((0,) + ends[:-1], ends))

    def preacts(self, x: torch.Tensor) -> torch.Tensor:
        """``ReLU((x - b_dec) W_enc^T + b_enc)``, dense ``[B, n]``, no autograd, in the
        parameters' dtype; with ``matmul_dtype`` set the matmul runs under autocast (as
        :meth:`JumpReLULevel.preacts`)."""
        with torch.no_grad(), torch.autocast(x.device.type, dtype=self.matmul_dtype,
                                             enabled=self.matmul_dtype is not None):
            x = x.to(self.W_enc.dtype)
            pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t())
        return pre.to(self.W_enc.dtype).clamp_min_(0)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch_topk: bool = False) -> torch.Tensor:
        """Dense codes ``[B, n]``: inference keeps ``pre > threshold``; ``batch_topk`` keeps
        training's BatchTopK selection of this batch instead."""
        pre = self.preacts(x)
        if batch_topk:
            return pre * batch_topk_mask(pre, self.cfg.k)
        return pre * (pre > self.inference_threshold())

    def inference_threshold(self) -> float:
        theta = float(self.threshold)
        if theta < 0:
            raise RuntimeError("the inference threshold is not estimated yet: train past "
                               "threshold_start_frac of the steps, or encode with batch_topk")
        return theta

    def decode(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """The reconstruction from each prefix, ``[G] x [B, d]``, of dense ``codes [B, n]``."""
        out, recon = [], self.b_dec.expand(codes.shape[0], -1)
        for lo, hi in self.groups():
            recon = recon + codes[:, lo:hi].to(self.W_dec.dtype) @ self.W_dec[lo:hi]
            out.append(recon)
        return out

    def forward(self, x: torch.Tensor) -> MatryoshkaOutput:
        """Training forward of ``x [B, d]``: BatchTopK, then each prefix's reconstruction and
        MSE, computed on the selected entries only."""
        x = x.to(self.W_enc.dtype)
        pre = self.preacts(x)
        pattern = SupportPattern.from_mask(batch_topk_mask(pre, self.cfg.k))
        xc = (x - self.b_dec).detach()
        vals = _SelectedActs.apply(self.W_enc, self.b_enc, self.b_dec, xc, pre, pattern)
        group_of = torch.searchsorted(self.prefix_ends, pattern.cols, right=True)
        mse, sq_error, recons, l0 = [], [], [], []
        recon = self.b_dec.expand_as(x)
        for g, (lo, hi) in enumerate(self.groups()):
            idx = (group_of == g).nonzero(as_tuple=True)[0]
            part = SupportPattern(pattern.rows[idx], pattern.cols[idx] - lo, x.shape[0], hi - lo)
            recon = recon + sparse_decode(part, vals[idx], self.W_dec[lo:hi])
            err = (x - recon).pow(2).sum(1)
            mse.append(err.mean())
            sq_error.append(err.detach().sum())
            recons.append(recon)
            l0.append(idx.numel() / x.shape[0])
        code = SparseCode(pattern, vals, vals.new_tensor(pattern.nnz / x.shape[0]))
        return MatryoshkaOutput(torch.stack(mse), recons, code, torch.tensor(l0),
                                torch.stack(sq_error))

    def aux_loss(self, x: torch.Tensor, recon: torch.Tensor, dead: torch.Tensor,
                 aux_k: int) -> torch.Tensor:
        """The anchor's ``get_auxiliary_loss`` (after Gao et al. 2024's AuxK): per token, the
        top ``min(aux_k, n_dead)`` ReLU activations of the ``dead`` latents (bool ``[n]``)
        reconstruct the detached residual ``x - recon`` (no decoder bias); its squared error
        over the residual's variance (sum over dims, mean over tokens). 0 with none dead."""
        idx = dead.nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            return x.new_zeros((), dtype=self.W_dec.dtype)
        x = x.to(self.W_enc.dtype)
        pre = torch.relu((x - self.b_dec) @ self.W_enc[idx].t() + self.b_enc[idx])
        top = pre.topk(min(aux_k, idx.numel()), dim=1, sorted=False)
        acts = torch.zeros_like(pre).scatter(1, top.indices, top.values)
        residual = (x - recon).detach()
        err = (residual - acts @ self.W_dec[idx]).pow(2).sum(1).mean()
        var = (residual - residual.mean(0)).pow(2).sum(1).mean()
        return (err / var).nan_to_num(0.0)

    @torch.no_grad()
    def update_threshold_(self, code: SparseCode, momentum: float) -> None:
        """EMA of the smallest activation BatchTopK kept (the anchor's ``update_threshold``);
        the first update sets it."""
        if code.vals.numel() == 0:
            return
        low = code.vals.detach().min().to(self.threshold.dtype)
        started = self.threshold >= 0
        self.threshold.copy_(torch.where(started, momentum * self.threshold
                                         + (1 - momentum) * low, low))

    @torch.no_grad()
    def init_b_dec_(self, x: torch.Tensor, iters: int = 100, tol: float = 1e-5) -> None:
        """Decoder bias at the geometric median of ``x`` (Weiszfeld's iterations; the anchor's
        ``geometric_median`` at step 0)."""
        x = x.to(self.b_dec.dtype)
        guess = x.mean(0)
        for _ in range(iters):
            w = 1 / (x - guess).norm(dim=1).clamp_min(1e-8)
            new = (w[:, None] * x).sum(0) / w.sum()
            done = float((new - guess).norm()) < tol
            guess = new
            if done:
                break
        self.b_dec.copy_(guess)

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove each decoder row's gradient component along the row (the anchor's
        ``remove_gradient_parallel_to_decoder_directions``)."""
        g = self.W_dec.grad
        if g is not None:
            w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
            g -= (g * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    # ---------------------------------------------- groups and prefixes as levels
    @torch.no_grad()
    def _as_level(self, lo: int, hi: int) -> JumpReLULevel:
        """Latents [lo, hi) as a JumpReLU level at the inference threshold: the pre-encoder
        bias folded into b_enc (``b - W_enc b_dec``), so its codes are exactly this model's."""
        theta = max(self.inference_threshold(), MIN_THRESHOLD)
        level = JumpReLULevel(self.cfg.d_model, hi - lo, bandwidth=1e-3,
                              generator=torch.Generator().manual_seed(0))
        level = level.to(device=self.W_enc.device, dtype=self.W_enc.dtype)
        level.W_enc.copy_(self.W_enc[lo:hi])
        level.W_dec.copy_(self.W_dec[lo:hi])
        level.b_enc.copy_(self.b_enc[lo:hi] - self.W_enc[lo:hi] @ self.b_dec)
        level.b_dec.copy_(self.b_dec)
        level.threshold.fill_(theta)
        return level

    def group_levels(self) -> list[JumpReLULevel]:
        """Each group as a level (its latents, codes and L0): groups are the levels of this
        arm's post-hoc forest. A group level's own decode is not a prefix reconstruction."""
        return [self._as_level(lo, hi) for lo, hi in self.groups()]

    def prefix_levels(self) -> list[JumpReLULevel]:
        """Each prefix as a JumpReLU SAE: its decode is the prefix's reconstruction (FVE and
        spliced loss per prefix, the SAELens export of every prefix)."""
        return [self._as_level(0, m) for m in self.cfg.prefix_sizes]


LogFn = Callable[[int, dict], None]
CheckpointFn = Callable[["MatryoshkaTrainer"], None]


class MatryoshkaTrainer:
    """Adam on one process; each step as the anchor's ``MatryoshkaBatchTopKTrainer.update``:
    forward, dead latents counted with this batch, auxiliary loss, threshold EMA, backward,
    decoder gradient projected, gradient clipped, Adam step, decoder rows renormalised. The
    learning rate follows :func:`~hsae_core.model.trainer.lr_at` (the HSAE's schedule). Resume
    as :class:`~hsae_core.model.trainer.Trainer`: ``load_state_dict``, then ``fit`` skips the
    batches already consumed."""

    def __init__(self, cfg: MatryoshkaConfig, *, log_every: int = 50,
                 on_log: LogFn | None = None, checkpoint_every: int = 0,
                 on_checkpoint: CheckpointFn | None = None):
        self.cfg, self.device = cfg, torch.device(cfg.device)
        self.model = MatryoshkaSAE(cfg).to(self.device)
        self.model.matmul_dtype = getattr(torch, cfg.autocast_dtype) if cfg.autocast_dtype \
            else None  # training only: a saved model evaluates in fp32
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr,
                                          betas=cfg.adam_betas)
        self.firing = FiringTracker([cfg.n_latents], self.device)
        weights = cfg.prefix_weights or (1.0,) * cfg.n_groups
        self.weights = torch.tensor(weights, device=self.device)
        self.aux_k = cfg.aux_k or cfg.d_model // 2
        self.step = 0
        self.log_every, self.on_log = log_every, on_log
        self.checkpoint_every, self.on_checkpoint = checkpoint_every, on_checkpoint

    def fit(self, batches: Iterable[torch.Tensor]) -> MatryoshkaSAE:
        it = itertools.islice(iter(batches), self.step, None)
        while self.step < self.cfg.total_steps:
            x = next(it, None)
            if x is None:
                raise RuntimeError(f"the batch source ran out after {self.step} of "
                                   f"{self.cfg.total_steps} steps: give it more tokens or "
                                   "lower total_steps")
            self.train_step(x)
            every = self.checkpoint_every
            if self.on_checkpoint and every and self.step % every == 0:
                self.on_checkpoint(self)
        if self.on_checkpoint:
            self.on_checkpoint(self)
        return self.model

    def dead_mask(self) -> torch.Tensor | None:
        window = self.cfg.dead_window_tokens
        return self.firing.dead(window)[0] if window else None

    def train_step(self, x: torch.Tensor) -> dict | None:
        cfg, model = self.cfg, self.model
        if tuple(x.shape) != (cfg.batch_size, cfg.d_model):
            raise ValueError(f"batch of shape {tuple(x.shape)} but the config asks for "
                             f"{(cfg.batch_size, cfg.d_model)} (batch_size, d_model)")
        x = x.to(self.device).float()
        if self.step == 0:
            model.init_b_dec_(x)
        lr = lr_at(self.step, cfg.total_steps, cfg.lr, cfg.warmup_frac)
        self.optimizer.param_groups[0]["lr"] = lr
        out = model(x)
        self.firing.update([out.code])
        dead = self.dead_mask()
        aux = (model.aux_loss(x, out.recons[-1], dead, self.aux_k) if dead is not None
               else x.new_zeros(()))
        loss = (self.weights * out.mse).sum() + cfg.aux_coef * aux
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {self.step}; lower lr "
                                     f"(now {cfg.lr}) or check the activations for NaN/Inf")
        if self.step >= cfg.threshold_start_step:
            model.update_threshold_(out.code, cfg.threshold_momentum)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.project_decoder_grad_()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        model.normalize_decoder_()
        self.step += 1
        last = self.step == cfg.total_steps
        if not last and not (self.log_every and self.step % self.log_every == 0):
            return None
        record = self._record(x, out, loss, aux, lr, dead)
        if self.on_log is not None:
            self.on_log(self.step, record)
        return record

    @torch.no_grad()
    def _record(self, x, out: MatryoshkaOutput, loss, aux, lr: float, dead) -> dict:
        total_var = float((x - x.mean(0)).pow(2).sum())
        rec = {"step": self.step, "loss": float(loss), "aux": float(aux), "lr": lr,
               "l0": float(out.code.l0), "threshold": float(self.model.threshold),
               "dead": int(dead.sum()) if dead is not None else 0}
        for g in range(self.cfg.n_groups):
            rec[f"prefix{g}/mse"] = float(out.mse[g])
            rec[f"prefix{g}/fve"] = 1 - float(out.sq_error[g]) / total_var
            rec[f"group{g}/l0"] = float(out.group_l0[g])
        return rec

    def summary(self) -> dict:
        """Where the run ended: tokens, the dead fraction of each group over the dead window
        (the tokens seen if shorter) and the inference threshold."""
        tokens = self.step * self.cfg.batch_size
        window = min(self.cfg.dead_window_tokens or tokens, tokens)
        dead = self.firing.dead(window)[0]
        return {"step": self.step, "tokens": tokens, "dead_window_tokens": window,
                "dead_frac_train": [float(dead[lo:hi].double().mean())
                                    for lo, hi in self.model.groups()],
                "threshold": float(self.model.threshold)}

    def state_dict(self) -> dict:
        return {"config": self.cfg.to_dict(), "step": self.step,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "since_fired": self.firing.state()}

    def load_state_dict(self, state: dict) -> None:
        saved = MatryoshkaConfig.from_dict(state["config"])
        if saved != self.cfg:
            diff = {k: (v, getattr(self.cfg, k)) for k, v in saved.to_dict().items()
                    if self.cfg.to_dict()[k] != v}
            raise ValueError(f"checkpoint was written with a different config {diff} "
                             "(saved, now): delete it to start over, or restore the config")
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.firing.load_state(state["since_fired"], self.device)


__all__ = ["MatryoshkaConfig", "MatryoshkaOutput", "MatryoshkaSAE", "MatryoshkaTrainer",
           "batch_topk_mask"]
