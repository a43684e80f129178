"""One typed, validated configuration for an HSAE run (model, hierarchy, optimisation).

Every field is documented once here; stages read it from ``params.yaml``, the trainer and
``save_hsae`` write it back as JSON. A value of the wrong type (:func:`~hsae_core.common.errors.
coerce_fields`: ``rho: true``, ``level_sizes: [8.9, 16]``) or out of range raises
:class:`ConfigError` naming the field, the value and what is allowed, at construction time.

Defaults follow the paper (Luo et al. 2026, §3 and Appendix A) except where METHOD.md fixes a
reading; the learning rate, JumpReLU bandwidth and controller gain are not given by the paper
and are ours (chosen on the synthetic benchmark and the embedded default, see README).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hsae_core.common.device import resolve_autocast_field, resolve_device_field
from hsae_core.common.errors import ConfigError, check_field, coerce_fields

SIMILARITIES = ("encoder", "decoder", "coactivation")
TREES = ("partial", "full", "binary", "fixed")


@dataclass(frozen=True)
class HSAEConfig:
    # --- model (§3) ---
    d_model: int
    """Width d of the activations (gemma-2-2b: 2304, SmolLM2-135M: 576)."""
    level_sizes: tuple[int, ...]
    """Dictionary size n_l of each level, strictly increasing (paper: 2048, 4096, 8192, 16384)."""
    bandwidth: float = 0.01
    """JumpReLU straight-through bandwidth epsilon (rectangle kernel), in normalised units."""
    threshold_init: float = 0.0
    """Initial JumpReLU threshold; 0 means data-dependent: each feature's threshold starts at
    its (1 - target_l0 / n_l) quantile on the first batch, so L0 starts near target."""

    # --- hierarchy (§3.1-3.3, METHOD §1-2) ---
    rho: float = 0.01
    """Weight of the parent-child constraint loss (§3.1); params.yaml: the top-level ``rho``."""
    swap_rate: float = 0.05
    """Perturbation rate r: the fraction of parents (with children) whose contribution is
    replaced by their children's each step (§3.2 as read by METHOD §1); params.yaml: the
    top-level ``r``."""
    update_interval: int = 5000
    """Gradient steps between hierarchy updates (§3.3); 0 disables updates."""
    similarity: str = "encoder"
    """Parent choice for hierarchy updates: encoder cosine, decoder cosine or coactivation EMA."""
    exclude_quantile: float = 0.2
    """Children whose best similarity is in this bottom quantile stay unassigned (partial tree)."""
    tree: str = "partial"
    """Tree variant (Appendix F.3): partial, full (quantile 0), binary (<= 2 children per
    parent), fixed (assigned at the first update, then frozen)."""
    coactivation_momentum: float = 0.999
    """EMA momentum of the co-activation statistics (similarity='coactivation')."""
    coactivation_tokens: int = 256
    """Tokens per step that feed the co-activation EMA (a subsample bounds its cost)."""

    # --- sparsity (Appendix A.2) ---
    target_l0: float = 50.0
    """Target mean number of active features per token, shared by every level."""
    l0_ema_momentum: float = 0.95
    """EMA momentum of the tracked L0 in the sparsity controller (paper: 0.999; with eta =
    1 - momentum the controller is bang-bang, see hsae_core.model.sparsity)."""
    l0_decay_rate: float = 0.03
    """eta: desired L0 velocity is -eta * (L0_ema - target) (paper: 0.001)."""
    lambda_init: float = 0.1
    """Initial sparsity weight lambda_l of every level."""
    lambda_rate: float = 0.05
    """Multiplicative step of the controller: lambda *= exp(+-lambda_rate) each step."""
    lambda_min: float = 1e-3
    """Floor of every lambda_l. A level whose lambda sits there with L0 still under target is
    reported unreachable (its data's unpenalised L0 is below the target)."""
    lambda_max: float = 1e3
    """Ceiling of every lambda_l (anti-wind-up; 1e30: none, the paper)."""
    threshold_lr_scale: float = 10.0
    """The thresholds' peak learning rate as a multiple of ``lr`` (1: the paper). Adam moves a
    threshold by at most about its learning rate per step, while an encoder row moves every one
    of its d weights by as much: at equal rates the pre-activations outrun the thresholds early
    in training and L0 overshoots its target several times over."""
    threshold_lr_floor: float = 3.0
    """The thresholds' learning rate follows the cosine schedule down from ``threshold_lr_scale
    * lr`` but never below ``threshold_lr_floor * lr``, so the controller can still move L0 when
    the schedule approaches zero (0: the paper, every parameter decays to zero)."""

    # --- optimisation (Appendix A.1) ---
    batch_size: int = 1024
    """Tokens per gradient step."""
    total_steps: int = 10_000
    """Gradient steps of the run; sets the cosine schedule."""
    lr: float = 5e-4
    """Peak Adam learning rate (the paper gives none)."""
    warmup_frac: float = 0.1
    """Fraction of steps of linear warm-up before the cosine decay to zero."""
    adam_betas: tuple[float, float] = (0.0, 0.995)
    """Adam (beta1, beta2)."""
    dead_window_tokens: int = 1_000_000
    """A feature that has not fired for this many tokens is dead and gets ghost grads
    (Jermyn & Templeton 2024); 0 disables ghost grads."""
    resample_interval: int = 0
    """Every this many steps, resample each dead feature (Bricken et al. 2023, adapted to
    JumpReLU): its decoder row becomes the direction of a badly reconstructed token of the batch
    (drawn with probability proportional to the squared error), its encoder row the same
    direction at 0.2x the live rows' mean norm, its bias 0 and its threshold the
    (1 - target_l0 / n_l) quantile of its new pre-activations; its Adam state and dead counter
    restart. Only during the first 80% of the steps (trainer.RESAMPLE_UNTIL). 0 never
    resamples."""

    # --- execution ---
    seed: int = 0
    """Seeds initialisation and the perturbation draws."""
    device: str = "cpu"
    """Torch device: cpu, cuda, cuda:N, mps or auto (cuda if torch sees one, else cpu)."""
    autocast_dtype: str | None = None
    """bfloat16 or float16 runs the encoder matmuls under autocast in training; thresholds
    stay fp32; null trains in fp32; auto is bfloat16 where the device runs it natively (CUDA,
    CPUs with AVX512-BF16 or AMX) and fp32 elsewhere, resolved at construction (the saved config
    records what trained). A saved model evaluates in fp32 whatever it was trained with."""

    def __post_init__(self) -> None:
        coerce_fields(self)  # every field of its annotated type (8.9 is no level size)
        check_field(self, "d_model", self.d_model > 0, "a positive integer")
        sizes = self.level_sizes
        check_field(self, "level_sizes", len(sizes) >= 1 and all(n > 0 for n in sizes),
               "a non-empty list of positive integers")
        check_field(self, "level_sizes", all(a < b for a, b in zip(sizes, sizes[1:])),
               "strictly increasing sizes, e.g. [2048, 4096, 8192, 16384]")
        check_field(self, "bandwidth", self.bandwidth > 0, "a positive number")
        check_field(self, "threshold_init", self.threshold_init >= 0, ">= 0 (0 = data-dependent)")
        check_field(self, "rho", self.rho >= 0, "rho >= 0")
        check_field(self, "swap_rate", 0 <= self.swap_rate <= 1, "0 <= r <= 1")
        check_field(self, "update_interval", self.update_interval >= 0, ">= 0 (0 = never)")
        check_field(self, "similarity", self.similarity in SIMILARITIES, f"one of {SIMILARITIES}")
        check_field(self, "exclude_quantile", 0 <= self.exclude_quantile < 1, "0 <= q < 1")
        check_field(self, "tree", self.tree in TREES, f"one of {TREES}")
        check_field(self, "coactivation_momentum", 0 <= self.coactivation_momentum < 1,
                    "in [0, 1)")
        check_field(self, "coactivation_tokens", self.coactivation_tokens > 0,
                    "a positive integer")
        check_field(self, "target_l0", 0 < self.target_l0 < min(sizes),
               f"0 < target L0 < the smallest level size ({min(sizes)})")
        check_field(self, "l0_ema_momentum", 0 <= self.l0_ema_momentum < 1, "in [0, 1)")
        check_field(self, "l0_decay_rate", self.l0_decay_rate > 0, "a positive number")
        check_field(self, "lambda_init", self.lambda_init > 0, "a positive number")
        check_field(self, "lambda_rate", self.lambda_rate > 0, "a positive number")
        check_field(self, "lambda_min", 0 <= self.lambda_min <= self.lambda_init,
                    "0 <= lambda_min <= lambda_init")
        check_field(self, "lambda_max", self.lambda_max >= self.lambda_init,
                    "lambda_max >= lambda_init")
        check_field(self, "threshold_lr_scale", self.threshold_lr_scale > 0, "a positive number")
        check_field(self, "threshold_lr_floor",
                    0 <= self.threshold_lr_floor <= self.threshold_lr_scale,
                    "0 <= threshold_lr_floor <= threshold_lr_scale (a multiple of lr)")
        check_field(self, "batch_size", self.batch_size > 0, "a positive integer")
        check_field(self, "total_steps", self.total_steps > 0, "a positive integer")
        check_field(self, "lr", self.lr > 0, "a positive number")
        check_field(self, "warmup_frac", 0 <= self.warmup_frac < 1, "0 <= warmup_frac < 1")
        check_field(self, "adam_betas",
                    len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
               "two numbers in [0, 1)")
        check_field(self, "dead_window_tokens", self.dead_window_tokens >= 0,
                    ">= 0 (0 = no ghost grads)")
        check_field(self, "resample_interval", self.resample_interval >= 0, ">= 0 (0 = never)")
        resolve_device_field(self)
        resolve_autocast_field(self)

    @property
    def n_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def is_independent(self) -> bool:
        """rho = 0 and r = 0: the levels do not interact (the independent-SAE baseline)."""
        return self.rho == 0 and self.swap_rate == 0

    @property
    def full_quantile(self) -> float:
        """The exclusion quantile actually applied (the full tree assigns every child)."""
        return 0.0 if self.tree == "full" else self.exclude_quantile

    def replace(self, **changes: Any) -> "HSAEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["level_sizes"] = list(self.level_sizes)
        out["adam_betas"] = list(self.adam_betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HSAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"HSAEConfig: unknown field(s) {unknown}; known fields: "
                              f"{sorted(known)}")
        return cls(**data)


__all__ = ["HSAEConfig", "SIMILARITIES", "TREES"]
