"""The pipeline's params.yaml: one validated schema for every stage (DVC params, issue 4).

Sections and the stages that read them::

    extract:    ExtractConfig (hsae_core.data_config)   extract-activations, compute-metrics
    normalize:  NormalizeConfig                          normalize
    sae:        HSAEConfig fields shared by the HSAE     train-hsae, train-baselines
                and the independent baseline (sizes, L0 target, optimisation, seed, device)
    hierarchy:  HSAEConfig fields of the HSAE only       train-hsae, build-posthoc-trees
                (rho, swap_rate, update_interval, similarity, exclude_quantile, tree, ...)
    train:      TrainRunConfig (checkpoints, logging)    train-hsae, train-baselines
    posthoc:    PosthocConfig                            build-posthoc-trees
    metrics:    MetricsConfig                            compute-metrics
    evidence:   EvidenceConfig (hsae_core.evidence)      collect-evidence
    judge:      JudgeConfig (hsae_core.judge)            judge
    report:     ReportConfig (hsae_core.site.config)     report

Splitting the HSAE's fields into ``sae`` and ``hierarchy`` is what lets DVC re-run only what
a change touches: ``hierarchy.rho`` is a dependency of train-hsae, not of train-baselines.
``d_model`` is not a parameter: it is read from the activation store.

Every section is checked when a stage starts: an unknown section or key, or a bad value, raises
:class:`~hsae_core.config.ConfigError` naming ``section.key``, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hsae_core.config import ConfigError, HSAEConfig
from hsae_core.data_config import ExtractConfig, NormalizeConfig
from hsae_core.evidence import EvidenceConfig
from hsae_core.judge import JudgeConfig
from hsae_core.site.config import ReportConfig

#: HSAEConfig fields that only the HSAE uses (the baseline forces rho = swap_rate = 0).
HIERARCHY_FIELDS = ("rho", "swap_rate", "update_interval", "similarity", "exclude_quantile", "tree",
                    "coactivation_momentum", "coactivation_tokens")
#: HSAEConfig fields shared by the HSAE and the baseline (d_model comes from the store).
SAE_FIELDS = tuple(f.name for f in dataclasses.fields(HSAEConfig)
                   if f.name not in HIERARCHY_FIELDS and f.name != "d_model")


@dataclass(frozen=True)
class TrainRunConfig:
    checkpoint_every: int = 100
    """Steps between checkpoints; a killed training stage resumes from the last one (0 = never)."""
    log_every: int = 10
    """Steps between rows of the live training curves (plots/<model>/level<l>.tsv)."""
    buffer_blocks: int = 32
    """Store blocks (about 8 MB each) shuffled together in memory by the train reader."""
    compile: bool = False
    """Compile each level's dense encoder matmul with ``torch.compile`` (Trainer ``compile``; meant
    for CUDA, also runs on the CPU given a C++ compiler, results equal eager). Off by default."""

    def __post_init__(self) -> None:
        _check(self, "checkpoint_every", _is_int(self.checkpoint_every) and self.checkpoint_every >= 0,
               "an integer >= 0 (0 = no checkpoints)")
        _check(self, "log_every", _is_int(self.log_every) and self.log_every >= 1, "an integer >= 1")
        _check(self, "buffer_blocks", _is_int(self.buffer_blocks) and self.buffer_blocks >= 1,
               "an integer >= 1")
        _check(self, "compile", isinstance(self.compile, bool), "true or false")


@dataclass(frozen=True)
class PosthocConfig:
    coactivation_tokens: int = 262_144
    """Train tokens streamed through the baseline to estimate co-activation frequencies when
    ``hierarchy.similarity`` is ``coactivation`` (unused for encoder/decoder cosine)."""

    def __post_init__(self) -> None:
        _check(self, "coactivation_tokens", _is_int(self.coactivation_tokens) and self.coactivation_tokens >= 1,
               "an integer >= 1")


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
        _check(self, "eval_tokens", self.eval_tokens is None or (_is_int(self.eval_tokens) and self.eval_tokens >= 1),
               "None or an integer >= 1")
        _check(self, "batch_size", _is_int(self.batch_size) and self.batch_size >= 2, "an integer >= 2")
        _check(self, "lm_loss_tokens", _is_int(self.lm_loss_tokens) and self.lm_loss_tokens >= 0,
               "an integer >= 0 (0 = skip the spliced loss)")
        _check(self, "lm_batch_sequences", _is_int(self.lm_batch_sequences) and self.lm_batch_sequences >= 1,
               "an integer >= 1")
        _check(self, "device", isinstance(self.device, str) and self.device.split(":")[0] in ("cpu", "cuda", "mps"),
               "cpu, cuda, cuda:N or mps")


#: Known sections and the keys each allows (extended by the stages other issues add).
SECTIONS: dict[str, tuple[str, ...]] = {
    "extract": tuple(f.name for f in dataclasses.fields(ExtractConfig)),
    "normalize": tuple(f.name for f in dataclasses.fields(NormalizeConfig)),
    "sae": SAE_FIELDS,
    "hierarchy": HIERARCHY_FIELDS,
    "train": tuple(f.name for f in dataclasses.fields(TrainRunConfig)),
    "posthoc": tuple(f.name for f in dataclasses.fields(PosthocConfig)),
    "metrics": tuple(f.name for f in dataclasses.fields(MetricsConfig)),
    "evidence": tuple(f.name for f in dataclasses.fields(EvidenceConfig)),
    "judge": tuple(f.name for f in dataclasses.fields(JudgeConfig)),
    "report": tuple(f.name for f in dataclasses.fields(ReportConfig)),
}


def load_params(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read params.yaml and check every section and key name (values are checked by
    the section's config class when a stage builds it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no params file at {path}: run from the repository root or pass --params")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    for section, value in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {section!r}; known sections: {sorted(SECTIONS)}")
        if value is None:
            data[section] = {}
        elif not isinstance(value, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping, got {value!r}")
        unknown = sorted(set(data[section]) - set(SECTIONS[section]))
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                              f"known keys of {section!r}: {sorted(SECTIONS[section])}")
    return data


def section_config(params: dict, section: str, cls: type) -> Any:
    """Build ``cls`` from ``params[section]``, prefixing any error with the section name."""
    try:
        return cls(**params.get(section, {}))
    except ConfigError as err:
        raise ConfigError(f"{section}: {err}") from err
    except TypeError as err:  # a wrong value type that the class's own checks did not catch
        raise ConfigError(f"{section}: {err}") from err


def hsae_config(params: dict, d_model: int, *, independent: bool = False) -> HSAEConfig:
    """The HSAEConfig of train-hsae (``sae`` + ``hierarchy``) or, with ``independent``, of the
    baseline (``sae`` only, rho = swap_rate = 0, no hierarchy updates)."""
    sae = dict(params.get("sae", {}))
    if independent:
        fields = sae | {"rho": 0.0, "swap_rate": 0.0, "update_interval": 0}
    else:
        fields = sae | dict(params.get("hierarchy", {}))
    try:
        return HSAEConfig(d_model=d_model, **fields)
    except ConfigError as err:
        name = str(err).split(".", 1)[1].split(" ", 1)[0] if str(err).startswith("HSAEConfig.") else ""
        where = "hierarchy" if name in HIERARCHY_FIELDS else "sae"
        raise ConfigError(f"{where}: {err}") from err
    except TypeError as err:
        raise ConfigError(f"sae/hierarchy: {err}") from err


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(cfg: Any, name: str, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{type(cfg).__name__}.{name} = {getattr(cfg, name)!r} is invalid: "
                          f"expected {allowed}")


__all__ = ["HIERARCHY_FIELDS", "SAE_FIELDS", "SECTIONS", "MetricsConfig", "PosthocConfig", "TrainRunConfig",
           "hsae_config", "load_params", "section_config"]
