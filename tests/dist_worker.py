"""Worker of the torchrun tests (tests/test_scale_distributed.py): one rank of a data-parallel
run on CPU (Gloo).

    torchrun --nproc_per_node N tests/dist_worker.py train CFG_JSON STORE OUT CKPT [STOP_AT]
    torchrun --nproc_per_node N tests/dist_worker.py extract CFG_JSON OUT [KILL_AFTER]

``train`` runs ``train_on_store`` (rank 0 saves the model to OUT); with STOP_AT it trains only
that many steps through the same reader and checkpoint (an interrupted run). ``extract`` runs
``extract_activations`` over a tiny in-process llama (tests/store_helpers.py).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsae_core.common.distributed import init_from_env, shutdown  # noqa: E402
from hsae_core.data.reader import TrainActivations  # noqa: E402
from hsae_core.model.config import HSAEConfig  # noqa: E402
from hsae_core.model.trainer import Trainer  # noqa: E402
from hsae_core.pipeline.checkpoint import Checkpoint  # noqa: E402
from hsae_core.pipeline.io import save_hsae  # noqa: E402
from hsae_core.pipeline.train_run import (
    TrainRunConfig,  # noqa: E402
    train_on_store,  # noqa: E402
)


def train(cfg_json: str, store: str, out: str, ckpt: str, stop_at: str | None = None) -> None:
    cfg = HSAEConfig.from_dict(json.loads(cfg_json))
    dist = init_from_env(cfg.device)
    run = TrainRunConfig(checkpoint_every=int(stop_at) if stop_at else 0, log_every=5)
    if stop_at is None:
        model = train_on_store(cfg, store, 1.0, checkpoint=ckpt, curves=Path(out) / "curves",
                               run=run, dist=dist)
        if dist.is_main:
            save_hsae(model, out)
    else:
        reader = TrainActivations(store, 1.0, batch_size=cfg.batch_size, seed=cfg.seed,
                                  epochs=None, max_tokens=cfg.total_steps * cfg.batch_size,
                                  drop_last=True, rank=dist.rank, world_size=dist.world_size)
        trainer = Trainer(cfg, checkpoint_every=int(stop_at), on_checkpoint=Checkpoint(ckpt).save,
                          dist=dist)
        try:
            trainer.fit(itertools.islice(reader, int(stop_at)))
        except RuntimeError as err:  # the source ran out at STOP_AT on every rank: "interrupted"
            assert "ran out" in str(err), err
    shutdown(dist)


def extract(cfg_json: str, out: str, kill_after: str | None = None) -> None:
    """With KILL_AFTER, rank 1 dies after writing that many shards (an interrupted job)."""
    from hsae_core.data.config import ExtractConfig
    from hsae_core.data.extract import extract_activations

    cfg = ExtractConfig.from_dict(json.loads(cfg_json))
    dist = init_from_env(cfg.device)
    written = []

    def on_shard(split: str, index: int) -> None:
        written.append((split, index))
        if kill_after is not None and dist.rank == 1 and len(written) == int(kill_after):
            raise SystemExit(3)

    extract_activations(cfg, out, progress=False, dist=dist, on_shard=on_shard)
    print(f"rank {dist.rank} wrote {len(written)} shards", flush=True)
    shutdown(dist)


if __name__ == "__main__":
    {"train": train, "extract": extract}[sys.argv[1]](*sys.argv[2:])
