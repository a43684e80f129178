"""The GPU check's step-time phase (issue 23), split out of gpu_check.py: the HSAE against the
same levels trained independently and against the plain dense step of the same levels
(benchmarks/dense_floor.py), per precision (fp32, TF32, bf16 autocast) and per batch (the
paper's 1,024 and 4,096), interleaved in the same blocks on the same batches; and the goals
block that reads those phases. gpu_check imports everything here back, so
``gpu_check.timed_block`` and the rest still resolve.

Report keys: ``step_time_<mode>`` at the first of ``--batches`` (the goal batch, 1,024 at the
paper's sizes: the keys of reports written before batches were added), ``step_time_<mode>_b<N>``
at every other batch N (``step_time_bf16_b4096``). :func:`phase_name` and :func:`parse_key`
map between them; every step-time dict also says its ``batch``.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from dense_floor import build as build_dense_floor
from streams import stream
from hsae_core.model.config import HSAEConfig
from hsae_core.model.trainer import Trainer

#: Issue 23's goal for HSAE / independent step time on one GPU (issue 17's was 1.10).
RATIO_GOAL = 1.25
#: Issue 23's throughput goal for the HSAE step at the goal batch (1,024 at the paper's sizes).
TOKENS_GOAL = 250_000
PREFIX = "step_time_"


def phase_name(mode: str, batch: int, goal_batch: int) -> str:
    """``step_time_bf16`` at the goal batch, ``step_time_bf16_b4096`` at any other."""
    return f"{PREFIX}{mode}" if batch == goal_batch else f"{PREFIX}{mode}_b{batch}"


def parse_key(key: str, goal_batch: int) -> tuple[str, int] | None:
    """(mode, batch) of a step-time report key, None for any other key."""
    if not key.startswith(PREFIX):
        return None
    mode, _, b = key[len(PREFIX):].partition("_b")
    return mode, int(b) if b else goal_batch


# ---------------------------------------------------------------- helpers

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_mib(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)


def make_trainer(sz: dict, device, independent: bool, **kw) -> Trainer:
    coupling = dict(rho=0.0, swap_rate=0.0) if independent else dict(rho=0.01, swap_rate=0.05)
    cfg = HSAEConfig(d_model=sz["d"], level_sizes=sz["sizes"], batch_size=sz["batch"],
                     target_l0=sz["l0"], device=str(device), **{**coupling, **kw})
    return Trainer(cfg)


@contextlib.contextmanager
def matmul_mode(mode: str, device):
    """fp32 (no TF32), tf32 (fp32 parameters, TF32 matmuls) or bf16 (autocast, set in the
    config)."""
    cuda = torch.device(device).type == "cuda"
    old = torch.backends.cuda.matmul.allow_tf32 if cuda else None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    try:
        yield
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = old


def timed_block(trainer, data, steps: int, device) -> float:
    """Seconds per step over ``steps`` back-to-back steps (one sync at the end, as in
    training) of a :class:`Trainer` or a :class:`dense_floor.DenseFloor`."""
    step = getattr(trainer, "train_step", None) or trainer.step  # a Trainer or a DenseFloor
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(data[i % len(data)])
    sync(device)
    return (time.perf_counter() - t0) / steps


# ---------------------------------------------------------------- the phase

def step_time(args, run, sz: dict, mode: str, batch: int | None = None) -> dict:
    """HSAE (rho 0.01, r 0.05, a real forest) against the same levels with rho = r = 0 and
    against the plain dense JumpReLU step of the same levels (benchmarks/dense_floor.py, issue
    23's floor to beat: bf16 autocast in bf16 mode, TF32 matmuls in tf32 mode), on the same
    batches of ``batch`` tokens (default ``sz["batch"]``); blocks of steps interleaved
    (ABC CBA ...) so drift hits all alike. Peak memory per model above what was allocated
    before it was built."""
    device = args.device
    sz = dict(sz, batch=batch or sz["batch"])
    src = stream(sz, device, seed=1)
    data = [src.batch(sz["batch"]) for _ in range(4)]
    kw = {"autocast_dtype": "bfloat16"} if mode == "bf16" else {}
    out: dict = {"mode": mode, "batch": sz["batch"]}
    trainers = {}
    with matmul_mode(mode, device):
        for name in ("hsae", "independent", "dense"):
            base = 0
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
            if name == "dense":
                t = build_dense_floor(sz["d"], sz["sizes"], sz["batch"], device,
                                      target_l0=sz["l0"],
                                      autocast="bf16" if mode == "bf16" else None)
                t.step(data[0])  # thresholds at the target L0, as the trainers' first step
            else:
                t = make_trainer(sz, device, independent=name == "independent",
                                 total_steps=100_000, update_interval=0, **kw)
                t.train_step(data[0])  # thresholds at the target L0
            if name == "hsae":
                sync(device)
                t0 = time.perf_counter()
                forest = t.update_hierarchy()
                sync(device)
                out["hierarchy_update_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
                out["forest_assigned"] = [forest.n_assigned(l) for l in range(forest.n_pairs)]
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            timed_block(t, data, args.warmup, device)
            mem = peak_mib(device)
            out[name] = {"peak_mib": None if mem is None else round(mem - base / 2 ** 20, 1)}
            trainers[name] = t
        times = {name: [] for name in trainers}
        for b in range(args.blocks):
            order = list(trainers) if b % 2 == 0 else list(reversed(trainers))
            for name in order:
                times[name].append(timed_block(trainers[name], data, args.block_steps, device))
    latents = sum(sz["sizes"])
    for name, ts in times.items():
        s = statistics.median(ts)
        out[name].update(ms_per_step=round(s * 1e3, 2), tokens_per_s=round(sz["batch"] / s),
                         latent_tokens_per_s_M=round(sz["batch"] * latents / s / 1e6, 1),
                         block_ms=[round(t * 1e3, 2) for t in ts])
        t = trainers[name]
        ema = t.l0_ema if name == "dense" else t.controller.l0_ema
        out[name]["l0"] = [round(v, 2) for v in ema.tolist()]
    out["ratio"] = round(out["hsae"]["ms_per_step"] / out["independent"]["ms_per_step"], 3)
    out["hsae_over_dense"] = round(out["hsae"]["ms_per_step"] / out["dense"]["ms_per_step"], 3)
    out["independent_over_dense"] = round(
        out["independent"]["ms_per_step"] / out["dense"]["ms_per_step"], 3)
    with torch.no_grad():
        out["density"] = [round(c.pattern.density, 4) for c in
                          trainers["hsae"].model(data[0]).codes]
    run.log(f"   {mode} batch {sz['batch']}: HSAE {out['hsae']['ms_per_step']} ms "
            f"({out['hsae']['tokens_per_s']} tok/s, peak {out['hsae']['peak_mib']} MiB), "
            f"independent {out['independent']['ms_per_step']} ms, ratio {out['ratio']}; "
            f"dense floor {out['dense']['ms_per_step']} ms (peak {out['dense']['peak_mib']} "
            f"MiB), HSAE / dense {out['hsae_over_dense']}")
    del trainers
    return out


# ---------------------------------------------------------------- goals

def goals(report: dict, goal_batch: int) -> dict | None:
    """Issue 23's goals, judged at ``goal_batch`` only (1,024 at the paper's sizes): the best
    mode's HSAE tokens/s >= 250,000, HSAE / independent <= 1.25 and HSAE / dense < 1 in every
    mode. Every other batch's numbers sit beside them under ``other_batches`` ("b4096": tokens/s,
    both ratios and HSAE peak memory per mode), judged against nothing. None when no step-time
    phase finished."""
    by_batch: dict[int, dict[str, dict]] = {}
    for key, v in report.items():
        mb = parse_key(key, goal_batch)
        if mb is not None and isinstance(v, dict) and "hsae" in v:
            by_batch.setdefault(mb[1], {})[mb[0]] = v
    if not by_batch:
        return None
    out: dict = {"batch": goal_batch}
    st = by_batch.pop(goal_batch, {})
    if st:
        best = max(st.values(), key=lambda v: v["hsae"]["tokens_per_s"])
        out["hsae_tokens_per_s"] = {
            "best": best["hsae"]["tokens_per_s"], "mode": best["mode"], "batch": goal_batch,
            "goal": TOKENS_GOAL, "met": best["hsae"]["tokens_per_s"] >= TOKENS_GOAL}
        out["hsae_over_independent"] = {m: v["ratio"] for m, v in st.items()} | {
            "goal": RATIO_GOAL, "met": all(v["ratio"] <= RATIO_GOAL for v in st.values())}
        # issue 23: faster than the plain dense step of the same levels in every precision
        out["hsae_over_dense"] = {m: v["hsae_over_dense"] for m, v in st.items()} | {
            "goal": "< 1 in every mode",
            "met": all(v["hsae_over_dense"] < 1 for v in st.values())}
    out["other_batches"] = {f"b{b}": {
        "hsae_tokens_per_s": {m: v["hsae"]["tokens_per_s"] for m, v in st_b.items()},
        "hsae_over_independent": {m: v["ratio"] for m, v in st_b.items()},
        "hsae_over_dense": {m: v["hsae_over_dense"] for m, v in st_b.items()},
        "hsae_peak_mib": {m: v["hsae"]["peak_mib"] for m, v in st_b.items()}}
        for b, st_b in sorted(by_batch.items())}
    return out
