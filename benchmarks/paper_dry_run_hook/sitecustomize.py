"""Per-process timing and memory of the paper dry run's stages (benchmarks/paper_dry_run.py).

benchmarks/paper_dry_run.py puts this folder on PYTHONPATH of ``dvc repro`` (or of each stage
command), so every Python process it starts imports this file first. It does nothing unless
HSAE_DRY_RUN_STATS names a folder and the process is a stage: DVC sets DVC_STAGE for a stage's
command, the command runner sets HSAE_DRY_RUN_STAGE. In a stage it records, at exit, into
``<HSAE_DRY_RUN_STATS>/<stage>.<pid>.json``:

- ``t_start`` (this import, before torch), ``t_ready`` (the stage's Typer app called: imports
  done), ``t_end``; ``load_s``: time inside the model loaders (hsae_core.data.lm.load_lm,
  hsae_core.evaluation.splice.load_full_lm, the judge's LocalChatBackend._load); ``fixed_s``:
  time in work that does not grow with the token count (the UMAP figures, writing the
  browser, building the post-hoc forest); ``timed``: each such call;
- peak memory: CUDA allocated and reserved by torch's allocator (when CUDA was used) and the
  process's peak resident set;
- with HSAE_DRY_RUN_MODULES=1, the top-level modules it imported and where from (then also
  for the processes that are no stage, DVC's own, under the name ``(not a stage)``).

The stages run unchanged: those functions and Typer's call are wrapped (timed) when their
modules are first imported; nothing else is touched.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

_T0 = time.time()
_STATS = os.environ.get("HSAE_DRY_RUN_STATS")
_STAGE = os.environ.get("DVC_STAGE") or os.environ.get("HSAE_DRY_RUN_STAGE")
_IS_STAGE = bool(_STAGE)
_REC: dict = {"load_s": 0.0, "fixed_s": 0.0, "timed": []}
_DEPTH = [0]


def _timed(fn, what: str, kind: str):
    """``fn`` timed into ``_REC[kind + "_s"]`` (outermost timed call only: no double count)."""
    def wrapper(*args, **kwargs):
        _DEPTH[0] += 1
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0:
                dt = time.perf_counter() - t
                _REC[kind + "_s"] += dt
                _REC["timed"].append([what, kind, round(dt, 3)])
    wrapper.__wrapped__ = fn
    return wrapper


def _patch_typer(module) -> None:
    call = module.Typer.__call__

    def __call__(self, *args, **kwargs):
        _REC.setdefault("t_ready", time.time())
        return call(self, *args, **kwargs)
    module.Typer.__call__ = __call__


def _patch(kind: str, *names: str):
    """Wrap module-level functions (``name``) or methods (``Class.name``) of a module."""
    def patch(module) -> None:
        for name in names:
            owner, _, attr = name.rpartition(".")
            target = getattr(module, owner) if owner else module
            setattr(target, attr, _timed(getattr(target, attr), f"{module.__name__}.{name}",
                                         kind))
    return patch


#: Module -> its patch. ``load``: loading a language model (fixed per stage); ``fixed``: work
#: whose size follows the SAE sizes, not the token count (the UMAP figures, writing the site,
#: building the post-hoc forest): both stay unscaled in the projection.
_PATCHES = {"typer.main": _patch_typer,
            "hsae_core.data.lm": _patch("load", "load_lm"),
            "hsae_core.evaluation.splice": _patch("load", "load_full_lm"),
            "hsae_core.judge.backends": _patch("load", "LocalChatBackend._load"),
            "hsae_core.site.figures": _patch("fixed", "fig_umap"),
            "hsae_core.site.build": _patch("fixed", "write_site"),
            "hsae_core.model.posthoc": _patch("fixed", "posthoc_forest")}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a patch right after one of :data:`_PATCHES`' modules executes, before the module
    that imported it binds its names."""

    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            try:
                _PATCHES[name](module)
            except Exception as err:  # noqa: BLE001 - a changed module: record, never break
                _REC.setdefault("patch_errors", []).append(f"{name}: {err!r}")
        spec.loader.exec_module = exec_module
        return spec


def _write() -> None:
    rec = dict(_REC, stage=_STAGE, is_stage=_IS_STAGE, pid=os.getpid(), argv=sys.argv,
               t_start=_T0, t_end=time.time())
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            rec["cuda"] = {"device": torch.cuda.get_device_name(),
                           "peak_allocated": torch.cuda.max_memory_allocated(),
                           "peak_reserved": torch.cuda.max_memory_reserved()}
    except Exception as err:  # noqa: BLE001
        rec["cuda_error"] = repr(err)
    try:
        import resource

        rec["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # noqa: BLE001 - not on this platform
        pass
    if os.environ.get("HSAE_DRY_RUN_MODULES"):
        rec["modules"] = sorted({f"{n}:{os.path.dirname(getattr(m, '__file__', '') or '')}"
                                 for n, m in list(sys.modules.items()) if "." not in n})
    path = os.path.join(_STATS, f"{_STAGE.strip('()').replace(' ', '-')}.{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(rec, f)


if _STATS and _STAGE:
    sys.meta_path.insert(0, _AfterImport())
    atexit.register(_write)
elif _STATS and os.environ.get("HSAE_DRY_RUN_MODULES"):  # DVC itself: what it imports
    _STAGE = "(not a stage)"
    atexit.register(_write)
