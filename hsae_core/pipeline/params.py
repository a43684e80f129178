"""The pipeline's params.yaml: its keys, and the checks every stage runs on what it reads.

Top-level keys, the class that documents each, and the stages that read them::

    rho:        HSAEConfig.rho, the parent-child constraint's     train-hsae
                weight (§3.1)
    r:          HSAEConfig.swap_rate, the perturbation rate       train-hsae
                (§3.2)
    extract:    ExtractConfig (hsae_core.data.config)            extract-activations, normalize
    normalize:  NormalizeConfig (hsae_core.data.config)          normalize
    sae:        HSAEConfig fields shared by the HSAE and the     train-hsae, train-baselines
                independent baseline (sizes, L0 target,
                optimisation, seed, device; hsae_core.model.config)
    hierarchy:  HSAEConfig fields that shape the forest          train-hsae, build-posthoc-trees
                (update_interval, similarity,
                exclude_quantile, tree, coactivation_*)
    train:      TrainRunConfig (hsae_core.pipeline.train_run)    train-hsae, train-baselines
    posthoc:    PosthocConfig (hsae_core.model.posthoc)          build-posthoc-trees
    matryoshka: MatryoshkaParams (hsae_core.pipeline.            train-matryoshka
                matryoshka_run): the third arm's own knobs
    metrics:    MetricsConfig (hsae_core.evaluation.compute)     compute-metrics
    evidence:   EvidenceConfig (hsae_core.evaluation.evidence)   evidence-hsae, evidence-baseline
    judge:      JudgeConfig (hsae_core.judge.pairs)              judge-hsae, judge-baseline
    report:     ReportConfig (hsae_core.site.config)             report

``rho`` and ``r`` sit at the top under the paper's names, so ``dvc exp run -S rho=0.1`` works
as typed; they reach only the HSAE's training. The ``hierarchy:`` knobs also build the
baseline's post-hoc forest. Splitting the HSAE's fields this way is what lets DVC re-run only
what a change touches: ``rho`` is a dependency of train-hsae alone. ``d_model`` is not a
parameter: it is read from the activation store.

Every value is checked by its class: of its annotated type (:func:`~hsae_core.common.errors.
coerce_fields`: ``3e-3`` is the number, ``true``, ``"8,16"``, ``[8.9, 16]`` and ``40.5`` steps are
refused) and in range; a device this machine lacks is refused too (:func:`check_device`). An
unknown top-level key or section key, or a bad value, raises :class:`~hsae_core.common.errors.
ConfigError` naming the key (``sae.lr``), the value and what is allowed. The stage
``check-params`` (:func:`validate_params`) checks the whole file before any other stage runs;
each stage checks again what it reads. This module imports no section's class but HSAEConfig, so
a stage's code dependencies stay what it reaches.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from hsae_core.common.errors import ConfigError, show
from hsae_core.model.config import HSAEConfig

#: Top-level keys of params.yaml under the paper's names -> the HSAEConfig field each sets
#: (HSAE only: the baseline has rho = r = 0).
PAPER_KEYS = {"rho": "rho", "r": "swap_rate"}
#: HSAEConfig fields of the ``hierarchy:`` section (the HSAE's updates and the post-hoc forest).
HIERARCHY_FIELDS = ("update_interval", "similarity", "exclude_quantile", "tree",
                    "coactivation_momentum", "coactivation_tokens")
#: HSAEConfig fields of the ``sae:`` section, shared by the HSAE and the baseline (d_model comes
#: from the store).
SAE_FIELDS = tuple(f.name for f in dataclasses.fields(HSAEConfig)
                   if f.name not in (*HIERARCHY_FIELDS, *PAPER_KEYS.values(), "d_model"))

#: The sections of params.yaml (the table above).
SECTIONS = ("extract", "normalize", "sae", "hierarchy", "train", "posthoc", "matryoshka",
            "metrics", "evidence", "judge", "report")
#: Where a key of an older params.yaml went.
MOVED = {"hierarchy.rho": "rho", "hierarchy.swap_rate": "r", "swap_rate": "r"}


def load_params(path: str | Path) -> dict[str, Any]:
    """Read params.yaml and check its top-level keys: the sections (mappings) and the paper's
    knobs (:data:`PAPER_KEYS`, scalars). Keys and values inside are checked by
    :func:`section_config` / :func:`hsae_config`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no params file at {path}: run from the repository root or pass "
                          "--params")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    guard_pipeline(path)
    _LOADED[path.resolve()] = copy.deepcopy(data)
    known = (*PAPER_KEYS, *SECTIONS)
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) "
                          + ", ".join(f"{k!r}{_hint(str(k), known)}" for k in unknown)
                          + f"; the top-level keys are {', '.join(PAPER_KEYS)} (the paper's "
                          f"hierarchy knobs) and the sections {', '.join(SECTIONS)}")
    for key, value in data.items():
        if key in PAPER_KEYS:
            if isinstance(value, (dict, list)):
                raise ConfigError(f"{key} = {show(value)} is invalid: expected a number "
                                  f"(a top-level key: `{key}: 0.1`)")
        elif value is None:
            data[key] = {}
        elif not isinstance(value, dict):
            raise ConfigError(f"{path}: section {key!r} must be a mapping of keys, got "
                              f"{show(value)}")
    return data


def _hint(key: str, known: tuple[str, ...]) -> str:
    if key in MOVED:
        return f" (moved: it is now {MOVED[key]!r})"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(params: dict, section: str, known: tuple[str, ...]) -> None:
    """Raise naming ``section.key`` for every key of ``params[section]`` not in ``known``."""
    unknown = sorted(set(params.get(section, {})) - set(known))
    if unknown:
        names = ", ".join(f"{section}.{k}{_hint(f'{section}.{k}', ())}" for k in unknown)
        raise ConfigError(f"unknown key(s) {names}; known keys of {section!r}: {sorted(known)}")


def check_device(device: str, key: str) -> None:
    """Refuse a device this machine does not have (``cuda`` without a CUDA build or GPU,
    ``cuda:N`` past the last GPU, ``mps`` off Apple silicon), naming ``key``."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key} = {device!r}: this machine has no CUDA device "
                              f"(torch {torch.__version__}: torch.cuda.is_available() is "
                              f"False); set {key}: cpu, or install a CUDA build of torch")
        if index and int(index) >= count:
            raise ConfigError(f"{key} = {device!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0..cuda:{count - 1}")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key} = 'mps': this machine has no MPS device; set {key}: cpu")


def section_config(params: dict, section: str, cls: type) -> Any:
    """Build ``cls`` (a config dataclass) from ``params[section]``; an error names
    ``section.key``. A ``device`` field must name a device this machine has (for the judge,
    only with the local backend)."""
    check_keys(params, section, tuple(f.name for f in dataclasses.fields(cls)))
    try:
        cfg = cls(**params.get(section, {}))
    except ConfigError as err:
        raise _at(err, lambda field: f"{section}.{field}", section) from None
    device = getattr(cfg, "device", None)
    if isinstance(device, str) and getattr(cfg, "backend", "local") == "local":
        check_device(device, f"{section}.device")
    return cfg


def param_key(field: str) -> str:
    """The params.yaml key of an HSAEConfig field: ``rho``, ``r``, ``hierarchy.tree``,
    ``sae.lr``."""
    inverse = {v: k for k, v in PAPER_KEYS.items()}
    if field in inverse:
        return inverse[field]
    return f"hierarchy.{field}" if field in HIERARCHY_FIELDS else f"sae.{field}"


def hsae_config(params: dict, d_model: int, *, independent: bool = False) -> HSAEConfig:
    """The HSAEConfig of train-hsae (``sae`` + ``hierarchy`` + ``rho`` + ``r``) or, with
    ``independent``, of the baseline (``sae`` only, rho = r = 0, no hierarchy updates)."""
    check_keys(params, "sae", SAE_FIELDS)
    check_keys(params, "hierarchy", HIERARCHY_FIELDS)
    fields = dict(params.get("sae", {}))
    if independent:
        fields |= {"rho": 0.0, "swap_rate": 0.0, "update_interval": 0}
    else:
        fields |= {field: params[key] for key, field in PAPER_KEYS.items() if key in params}
        fields |= params.get("hierarchy", {})
    try:
        cfg = HSAEConfig(d_model=d_model, **fields)
    except ConfigError as err:
        raise _at(err, param_key, "sae/hierarchy") from None
    check_device(cfg.device, "sae.device")
    return cfg


def _at(err: ConfigError, key_of, where: str) -> ConfigError:
    """``err`` named by its params.yaml key (else prefixed with ``where``)."""
    if err.field is not None:
        return err.at(key_of(err.field))
    return ConfigError(f"{where}: {err}")


def validate_params(params: dict, classes: dict[str, type]) -> list[str]:
    """Every problem of a loaded params.yaml (:func:`load_params`), one message each: the
    HSAE's and the baseline's HSAEConfig and each section of ``classes`` (section -> config
    class). The store is not read: a placeholder width stands for ``d_model``."""
    problems = []
    for build in (lambda: hsae_config(params, 1),
                  lambda: hsae_config(params, 1, independent=True)):
        try:
            build()
        except ConfigError as err:
            if str(err) not in problems:
                problems.append(str(err))
    for section, cls in classes.items():
        try:
            section_config(params, section, cls)
        except ConfigError as err:
            problems.append(str(err))
    return problems


# -- a pipeline whose params.yaml changes under it ---------------------------------------------

#: Params files this process loaded, as loaded (:func:`check_unchanged` compares them).
_LOADED: dict[Path, dict] = {}
#: Why params.yaml can change under a running pipeline, and what to do instead.
RACE = ("Another `dvc exp run` started in this workspace writes its -S values into params.yaml "
        "before DVC's lock refuses it (DVC 3.67), and so does an editor; nothing is recorded for "
        "mixed parameters. Run experiments side by side with `dvc exp run --queue` + `dvc queue "
        "start`, or `dvc exp run --temp`, and go back with the commands of docs/ablations.md")


def _dvc_stage() -> tuple[str, Path] | None:
    """``(stage name, repository root)`` when DVC runs this process as a stage, else None."""
    stage, root = os.environ.get("DVC_STAGE"), os.environ.get("DVC_ROOT")
    return (stage, Path(root)) if stage and root else None


def _yaml12(path: Path):
    """``path`` as DVC reads it (YAML 1.2, ruamel), or None when that is not possible."""
    try:
        from ruamel.yaml import YAML

        return YAML(typ="safe", pure=True).load(path.read_text())
    except Exception:  # noqa: BLE001 - no ruamel, unreadable file: no guard
        return None


def _changed_keys(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new), key=str)
                for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _describe(keys: list[str], old, new) -> str:
    def value(tree, key):
        for part in key.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return show(tree)

    return ", ".join(f"{k} = {value(new, k)} (checked: {value(old, k)})" for k in keys[:6])


def guard_pipeline(path: Path) -> None:
    """Under DVC (a stage other than check-params), refuse to run when ``path`` no longer holds
    the values check-params was run on (its ``dvc.lock`` entry, written before any later stage
    starts): its parameters changed while the pipeline ran. Outside DVC, or without such an
    entry, nothing is checked."""
    running = _dvc_stage()
    if running is None or running[0] == "check-params":
        return
    root = running[1]
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return
    lock = _yaml12(root / "dvc.lock") if (root / "dvc.lock").is_file() else None
    checked = (((lock or {}).get("stages") or {}).get("check-params") or {}).get("params") or {}
    if rel not in checked:
        return
    now = _yaml12(path)
    if now is None:
        return
    keys = _changed_keys(checked[rel], now)
    if keys:
        raise ConfigError(f"{rel} changed after check-params checked it, while this pipeline "
                          f"ran: {_describe(keys, checked[rel], now)}. Stage {running[0]} does "
                          f"not run on other parameters than the run's. {RACE}")


def check_unchanged(stage: str) -> None:
    """Under DVC, raise :class:`ConfigError` if a params file this process loaded now holds
    other values: DVC would record the stage's outputs under the new values. Called by a long
    stage before it writes its outputs."""
    if _dvc_stage() is None:
        return
    for path, loaded in _LOADED.items():
        try:
            now = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            now = None
        keys = _changed_keys(loaded, now) if isinstance(now, dict) else ["(unreadable)"]
        if keys:
            raise ConfigError(f"{path.name} changed while {stage} ran: "
                              f"{_describe(keys, loaded, now or {})}. Its outputs are not "
                              f"written: DVC would record them under the new values. {RACE}")


__all__ = ["HIERARCHY_FIELDS", "MOVED", "PAPER_KEYS", "SAE_FIELDS", "SECTIONS", "check_device",
           "check_keys", "check_unchanged", "guard_pipeline", "hsae_config", "load_params",
           "param_key", "section_config", "validate_params"]
