"""Data parallelism over ``torch.distributed`` (launched by ``torchrun``): which rank this process
is, the backend and device it uses, and the few collectives the trainer and extraction need.

``torchrun --nproc_per_node N -m stages.train_hsae ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_from_env` reads them, picks NCCL for CUDA devices and Gloo for the
CPU, and pins each rank to ``cuda:LOCAL_RANK``. Without those variables (a plain ``python``
run) everything here is a no-op over one rank, so the same code serves both.

The CUDA branch (NCCL, per-rank device) is written to PyTorch's documented contract but was
not run on a GPU in this project (no GPU was available); the Gloo branch is tested.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: ``rank`` of ``world_size``; ``device`` it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def active(self) -> bool:
        """A process group with more than one rank is running."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that writes checkpoints, curves and outputs."""
        return self.rank == 0


SINGLE = DistContext()


def backend_for(device: str) -> str:
    """NCCL for CUDA devices, Gloo for the CPU (PyTorch's recommendation for each)."""
    return "nccl" if device.split(":")[0] == "cuda" else "gloo"


def rank_device(device: str, local_rank: int) -> str:
    """The device of one rank: ``cuda`` / ``cuda:N`` become ``cuda:LOCAL_RANK`` (one GPU per
    rank, as torchrun's ``--nproc_per_node`` = GPUs per node assumes); ``cpu`` stays."""
    kind = device.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device "
                               f"(torch {torch.__version__}): set device: cpu or install a CUDA "
                               "build")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ValueError(f"rank with LOCAL_RANK {local_rank} needs cuda:{local_rank}, but "
                               f"this node has {n} GPU(s): launch at most {n} processes per node")
        return f"cuda:{local_rank}"
    if kind == "mps":
        raise ValueError("distributed training on mps is not supported by torch.distributed: "
                           "use cpu (Gloo) or cuda (NCCL)")
    return device


def init_from_env(device: str) -> DistContext:
    """Join the torchrun job described by the environment (or return the single-process
    context). Idempotent: a second call returns the running group's context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = rank_device(device, local)
    if not dist.is_initialized():
        if dev.startswith("cuda"):
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend_for(dev), rank=rank, world_size=world,
                                **({"device_id": torch.device(dev)} if dev.startswith("cuda")
                                   else {}))
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (after a final barrier) if this context joined one."""
    if ctx.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def all_reduce_sum_(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (identity on one rank)."""
    if ctx.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    if ctx.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_(ctx: DistContext, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s value."""
    if ctx.active:
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_rows(ctx: DistContext, x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``[b, ...]`` rows in rank order (equal ``b`` on every rank):
    the global batch, when each rank holds its slice of it."""
    if not ctx.active:
        return x
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def rank_slice(n: int, ctx: DistContext) -> slice:
    """Rows of a global batch of ``n`` that this rank takes: the ``rank``-th of ``world_size``
    equal contiguous parts (``n`` must divide evenly)."""
    if n % ctx.world_size:
        raise ValueError(f"a global batch of {n} rows does not split evenly over {ctx.world_size} "
                         f"ranks: choose a batch size divisible by the number of processes")
    b = n // ctx.world_size
    return slice(ctx.rank * b, (ctx.rank + 1) * b)


__all__ = ["DistContext", "SINGLE", "all_gather_rows", "all_reduce_max_", "all_reduce_sum_",
           "backend_for", "barrier", "broadcast_", "init_from_env", "rank_device", "rank_slice",
           "shutdown"]
