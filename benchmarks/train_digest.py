"""A digest of a short deterministic training run: run it at two commits to show that a
refactor leaves training bit for bit unchanged (issue 23's sync work was checked so).

    python benchmarks/train_digest.py                    # default, merged and per-level paths
    git worktree add /tmp/old <commit> && cp benchmarks/train_digest.py /tmp/old/benchmarks/ \\
        && python /tmp/old/benchmarks/train_digest.py    # the same digests = the same training

A 300-step HSAE run at toy size with everything that couples the levels: swaps, PC loss,
hierarchy updates every 25 steps, ghost grads and dead-feature resampling; on synthetic sparse
data from a fixed generator, one thread. Digested: every parameter, the forest, the
controller's lambdas, and the logged records (the training curves). The decode path is forced
with ``sparse_ops.DENSE_CUTOFF``: 1.1 every support sparse (the merged decode), 0.0 every
support dense (level by level), or the library's default.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hsae_core.model import sparse_ops  # noqa: E402
from hsae_core.model.config import HSAEConfig  # noqa: E402
from hsae_core.model.trainer import Trainer  # noqa: E402

PATHS = {"default": None, "merged": 1.1, "per-level": 0.0}


def digest(path: str = "default", steps: int = 300) -> dict[str, str]:
    """sha256 (first 16 hex digits) of the final state and of the logged records."""
    before = sparse_ops.DENSE_CUTOFF
    if PATHS[path] is not None:
        sparse_ops.DENSE_CUTOFF = PATHS[path]
    try:
        torch.manual_seed(0)
        cfg = HSAEConfig(d_model=32, level_sizes=(64, 128, 256, 512), batch_size=256,
                         total_steps=steps, target_l0=6, update_interval=25, swap_rate=0.1,
                         rho=0.05, lr=3e-3, dead_window_tokens=2000, resample_interval=40)
        trainer = Trainer(cfg)
        records: list = []
        trainer.on_log = lambda step, rec: records.append(rec)
        gen = torch.Generator().manual_seed(1)
        basis = torch.randn(48, 32, generator=gen)
        for _ in range(steps):
            codes = ((torch.rand(256, 48, generator=gen) < 0.1).float()
                     * torch.rand(256, 48, generator=gen))
            trainer.train_step(codes @ basis + 0.05 * torch.randn(256, 32, generator=gen))
    finally:
        sparse_ops.DENSE_CUTOFF = before
    state = hashlib.sha256()
    for name, t in sorted(trainer.model.state_dict().items()):
        state.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    for p in trainer.model.forest.parent_of:
        state.update(p.cpu().numpy().tobytes())
    state.update(trainer.controller.lambdas.cpu().numpy().tobytes())
    logs = hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode())
    return {"state": state.hexdigest()[:16], "logs": logs.hexdigest()[:16]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = {p: digest(p, args.steps) for p in args.paths}
    for p, d in out.items():
        print(f"{p:10s} state {d['state']}  logs {d['logs']}")
    return out


if __name__ == "__main__":
    main()
