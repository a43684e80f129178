"""Limits check-params enforces before any stage runs: what a later stage would refuse, and the
memory each training and evaluation stage needs against the memory its device has.

``check_limits(params, configs, store)`` returns one message per problem, each naming the
``params.yaml`` key to change:

- **Sizes of the data.** When ``store`` holds an extraction of the current ``extract:`` section,
  its train rows and width are exact; otherwise (no store yet, or one that extraction will
  replace) the train split is bounded by ``extract.max_tokens`` (its train share) and the width
  read from the model's config when the model is local (a hub name is not fetched). With
  those, ``sae.batch_size`` above the train split's rows is refused here, not by train-hsae
  after DVC has removed its outputs; so are a layer or context length the model does not have
  (:func:`~hsae_core.data.lm.inspect_model`), a forest of one level (the report draws a
  forest), and an OpenAI judge whose key variable is not set.
- **Memory.** A lower bound per stage, in bytes of float32 (:func:`stage_memory`): training
  holds the parameters with their gradients and Adam's two moments (4 copies) and a batch's
  pre-activations with their gradient (``2 x batch x sum(level_sizes)``), plus the HSAE's
  co-activation matrices (``n_l x n_(l+1)`` per level pair) with ``hierarchy.similarity:
  coactivation``; evaluation holds its models and one batch's pre-activations. A stage whose
  bound exceeds the memory its device has now (``cpu``: the available RAM; ``cuda``: the
  device's free memory) is refused. The bound leaves out what is smaller or unknown (the
  language model of the spliced loss, temporaries), so passing it does not promise the stage
  fits; failing it promises it cannot.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from hsae_core.common.errors import show
from hsae_core.data.config import ExtractConfig
from hsae_core.model.config import HSAEConfig

GIB = 2**30
FLOAT = 4


@dataclasses.dataclass(frozen=True)
class DataSizes:
    """Rows of the train split (``exact``, or an upper bound) and the width, when known."""

    train_rows: int | None
    d_model: int | None
    exact: bool
    source: str


def data_sizes(extract: ExtractConfig, store: str | Path | None) -> DataSizes:
    """The train split's rows and the width: from ``store`` when it holds this extraction,
    else bounded by ``extract.max_tokens`` with the width of the model's config (local models
    only; :class:`~hsae_core.data.lm.ModelError` when it lacks the layer or context length)."""
    attrs = _store_attrs(store)
    if attrs and _same_extraction(attrs.get("extract_config"), extract):
        rows = attrs["n_tokens"]["train"] - attrs.get("outliers", {}).get("rows", {}).get(
            "train", 0)
        return DataSizes(int(rows), int(attrs["d_model"]), True, f"store {store}")
    from hsae_core.data.lm import inspect_model, resolve_model

    d_model = None
    if resolve_model(extract.model, extract.gguf_file).local:
        _, config = inspect_model(extract.model, extract.layer, extract.context_len,
                                  extract.gguf_file)
        d_model = int(config.hidden_size)
    budget = extract.split_budget()["train"]
    where = "no store yet" if not attrs else f"store {store} is of other extract settings"
    return DataSizes(budget, d_model, False, f"{where}: at most extract.max_tokens' train share")


def _store_attrs(store: str | Path | None) -> dict | None:
    if store is None or not Path(store).exists():
        return None
    try:
        import zarr

        return dict(zarr.open_group(store, mode="r").attrs)
    except Exception:  # noqa: BLE001 - an unreadable store is the stages' to report
        return None


def _same_extraction(recorded: dict | None, extract: ExtractConfig) -> bool:
    if not isinstance(recorded, dict):
        return False
    return json.loads(json.dumps(recorded)) == json.loads(json.dumps(extract.to_dict()))


def available_memory(device: str) -> tuple[int | None, str]:
    """``(bytes, what they are)`` a stage on ``device`` can use now; None when unknown (mps)."""
    kind, _, index = device.partition(":")
    if kind == "cuda":
        import torch

        try:
            free, total = torch.cuda.mem_get_info(int(index or 0))
        except RuntimeError:  # a device check-params could not query: the stage will tell
            return None, ""
        return int(free), f"{device} has {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB"
    if kind == "cpu":
        avail = _meminfo_available()
        return avail, (f"this machine has {avail / GIB:.1f} GiB of RAM available"
                       if avail is not None else "")
    return None, ""


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _params_floats(sizes: tuple[int, ...], d: int | None) -> int:
    """Floats of one model: per level encoder and decoder (2 n d), biases and thresholds."""
    n = sum(sizes)
    return 2 * n * (d or 0) + 2 * n + len(sizes) * (d or 0)


def stage_memory(cfg: HSAEConfig, configs: dict, d: int | None) -> list[tuple[str, str, str,
                                                                              list[tuple]]]:
    """Per stage: ``(stage, device, device key, terms)`` with terms ``(bytes, what, keys)``
    (a lower bound of what the stage holds at once; ``d`` None leaves out the width's terms)."""
    sizes, n = cfg.level_sizes, sum(cfg.level_sizes)
    model = _params_floats(sizes, d) * FLOAT
    level_keys = "sae.level_sizes" + (f" on d = {d}" if d else "")
    pairs = sum(a * b for a, b in zip(sizes, sizes[1:])) * FLOAT
    coact = cfg.similarity == "coactivation"
    out = []
    for stage, hsae in (("train-hsae", True), ("train-baselines", False)):
        terms = [(4 * model, "parameters, gradients and Adam state", level_keys),
                 (2 * cfg.batch_size * n * FLOAT, "a batch's pre-activations and gradient",
                  "sae.batch_size x sum(sae.level_sizes)")]
        if hsae and coact and cfg.update_interval > 0:
            terms.append((pairs, "co-activation matrices", "sae.level_sizes (level pairs)"))
        out.append((stage, cfg.device, "sae.device", terms))
    posthoc = [(model, "the baseline", level_keys),
               (cfg.batch_size * n * FLOAT, "a batch's pre-activations",
                "sae.batch_size x sum(sae.level_sizes)")]
    if coact:
        posthoc.append((pairs, "co-activation matrices", "sae.level_sizes (level pairs)"))
    out.append(("build-posthoc-trees", cfg.device, "sae.device", posthoc))
    for stage, section, models in (("compute-metrics", "metrics", 2),
                                   ("evidence-hsae", "evidence", 1), ("report", "report", 2)):
        sec = configs.get(section)
        if sec is None:
            continue
        out.append((stage, sec.device, f"{section}.device",
                    [(models * model, f"{models} model(s)", level_keys),
                     (sec.batch_size * n * FLOAT, "a batch's pre-activations",
                      f"{section}.batch_size x sum(sae.level_sizes)")]))
    return out


def check_limits(params: dict, configs: dict, store: str | Path | None) -> list[str]:
    """Every limit ``params`` breaks (see the module docstring), one message each.
    ``configs``: the built section configs (``extract``, ``metrics``, ``evidence``, ``report``,
    ``judge``); the HSAE's config is built here from ``params`` with the data's width."""
    from hsae_core.data.lm import ModelError
    from hsae_core.pipeline.params import hsae_config

    problems = []
    try:
        data = data_sizes(configs["extract"], store)
    except ModelError as err:
        return [f"extract: {err}"]
    cfg = hsae_config(params, data.d_model or 1)
    if len(cfg.level_sizes) < 2:
        problems.append(f"sae.level_sizes = {show(list(cfg.level_sizes))} is invalid: the "
                        "pipeline needs at least two levels (its metrics and report are about the "
                        "forest between levels)")
    if data.train_rows is not None and cfg.batch_size > data.train_rows:
        bound = "holds" if data.exact else "can hold at most"
        problems.append(f"sae.batch_size = {cfg.batch_size} is more than the train split "
                        f"{bound} ({data.train_rows} rows; {data.source}): lower sae.batch_size "
                        "or raise extract.max_tokens")
    judge = configs.get("judge")
    if (judge is not None and judge.backend == "openai" and judge.api_key_env
            and not os.environ.get(judge.api_key_env)):
        problems.append(f"judge.api_key_env = {show(judge.api_key_env)}: that environment "
                        "variable is not set: export it before the run, or set "
                        "judge.api_key_env: null for a server without authentication")
    over = []
    for stage, device, device_key, terms in stage_memory(cfg, configs, data.d_model):
        have, what = available_memory(device)
        need = sum(t[0] for t in terms)
        if have is not None and need > have:
            over.append((need, stage, device, device_key, sorted(terms, key=lambda t: -t[0]),
                         what))
    if over:  # the largest in full, the others by name
        over.sort(key=lambda o: -o[0])
        need, stage, device, device_key, terms, what = over[0]
        shown = "; ".join(f"{b / GIB:.1f} GiB for {w} ({k})" for b, w, k in terms if b)
        also = ", ".join(f"{o[1]} {o[0] / GIB:.1f} GiB" for o in over[1:])
        problems.append(f"{stage} needs at least {need / GIB:.1f} GiB on {device_key} = "
                        f"{show(device)} ({shown}), and {what}: lower {_first_key(terms)}, or "
                        "use a device with more memory"
                        + (f" (too large as well: {also})" if also else ""))
    return problems


def _first_key(terms: list[tuple]) -> str:
    """The params keys of the largest term (``sae.batch_size x sum(...)`` -> both)."""
    keys = terms[0][2].split(" on ")[0].split(" (")[0]
    names = [k.strip().removeprefix("sum(").removesuffix(")") for k in keys.split(" x ")]
    return " or ".join(dict.fromkeys(names))


__all__ = ["DataSizes", "available_memory", "check_limits", "data_sizes", "stage_memory"]
