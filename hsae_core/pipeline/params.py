"""The pipeline's params.yaml: its sections, and the checks every stage runs on what it reads.

Sections, the class that documents each key, and the stages that read them::

    extract:    ExtractConfig (hsae_core.data.config)            extract-activations, normalize
    normalize:  NormalizeConfig (hsae_core.data.config)          normalize
    sae:        HSAEConfig fields shared by the HSAE and the     train-hsae, train-baselines
                independent baseline (sizes, L0 target,
                optimisation, seed, device; hsae_core.model.config)
    hierarchy:  HSAEConfig fields of the HSAE only (rho,         train-hsae, build-posthoc-trees
                swap_rate, update_interval, similarity, ...)
    train:      TrainRunConfig (hsae_core.pipeline.train_run)    train-hsae, train-baselines
    posthoc:    PosthocConfig (hsae_core.model.posthoc)          build-posthoc-trees
    metrics:    MetricsConfig (hsae_core.evaluation.compute)     compute-metrics, report
    evidence:   EvidenceConfig (hsae_core.evaluation.evidence)   collect-evidence
    judge:      JudgeConfig (hsae_core.judge.pairs)              judge
    report:     ReportConfig (hsae_core.site.config)             report

Splitting the HSAE's fields into ``sae`` and ``hierarchy`` is what lets DVC re-run only what
a change touches: ``hierarchy.rho`` is a dependency of train-hsae, not of train-baselines.
``d_model`` is not a parameter: it is read from the activation store.

A stage checks the section names of the whole file and every key and value of the sections it
reads: an unknown section or key, or a bad value, raises :class:`~hsae_core.common.errors.
ConfigError` naming ``section.key``, the value and what is allowed. This module imports no
section's class but HSAEConfig, so a stage's code dependencies stay what it reaches.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from hsae_core.common.errors import ConfigError
from hsae_core.model.config import HSAEConfig

#: HSAEConfig fields that only the HSAE uses (the baseline forces rho = swap_rate = 0).
HIERARCHY_FIELDS = ("rho", "swap_rate", "update_interval", "similarity", "exclude_quantile",
                    "tree", "coactivation_momentum", "coactivation_tokens")
#: HSAEConfig fields shared by the HSAE and the baseline (d_model comes from the store).
SAE_FIELDS = tuple(f.name for f in dataclasses.fields(HSAEConfig)
                   if f.name not in HIERARCHY_FIELDS and f.name != "d_model")


#: The sections of params.yaml (the table above).
SECTIONS = ("extract", "normalize", "sae", "hierarchy", "train", "posthoc", "metrics", "evidence",
            "judge", "report")


def load_params(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read params.yaml and check its section names (keys and values are checked by
    :func:`section_config` / :func:`hsae_config` for the sections a stage reads)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no params file at {path}: run from the repository root or pass "
                          "--params")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    for section, value in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {section!r}; "
                              f"known sections: {sorted(SECTIONS)}")
        if value is None:
            data[section] = {}
        elif not isinstance(value, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping, got {value!r}")
    return data


def check_keys(params: dict, section: str, known: tuple[str, ...]) -> None:
    """Raise naming ``section.key`` for every key of ``params[section]`` not in ``known``."""
    unknown = sorted(set(params.get(section, {})) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                          f"known keys of {section!r}: {sorted(known)}")


def section_config(params: dict, section: str, cls: type) -> Any:
    """Build ``cls`` (a dataclass) from ``params[section]``, prefixing any error with the section
    name."""
    check_keys(params, section, tuple(f.name for f in dataclasses.fields(cls)))
    try:
        return cls(**params.get(section, {}))
    except ConfigError as err:
        raise ConfigError(f"{section}: {err}") from err
    except TypeError as err:  # a wrong value type that the class's own checks did not catch
        raise ConfigError(f"{section}: {err}") from err


def hsae_config(params: dict, d_model: int, *, independent: bool = False) -> HSAEConfig:
    """The HSAEConfig of train-hsae (``sae`` + ``hierarchy``) or, with ``independent``, of the
    baseline (``sae`` only, rho = swap_rate = 0, no hierarchy updates)."""
    check_keys(params, "sae", SAE_FIELDS)
    check_keys(params, "hierarchy", HIERARCHY_FIELDS)
    sae = dict(params.get("sae", {}))
    if independent:
        fields = sae | {"rho": 0.0, "swap_rate": 0.0, "update_interval": 0}
    else:
        fields = sae | dict(params.get("hierarchy", {}))
    try:
        return HSAEConfig(d_model=d_model, **fields)
    except ConfigError as err:
        name = (str(err).split(".", 1)[1].split(" ", 1)[0] if str(err).startswith("HSAEConfig.")
                else "")
        where = "hierarchy" if name in HIERARCHY_FIELDS else "sae"
        raise ConfigError(f"{where}: {err}") from err
    except TypeError as err:
        raise ConfigError(f"sae/hierarchy: {err}") from err


__all__ = ["HIERARCHY_FIELDS", "SAE_FIELDS", "SECTIONS", "check_keys", "hsae_config",
           "load_params", "section_config"]
