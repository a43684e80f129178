"""Save and load a trained HSAE: ``model.safetensors`` + ``config.json`` + ``forest.json``, in a
local folder or under an fsspec URL (:mod:`hsae_core.common.fsio`); a forest alone as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes

from hsae_core.common import fsio
from hsae_core.model.config import HSAEConfig
from hsae_core.model.forest import Forest
from hsae_core.model.hsae import HSAE

WEIGHTS, CONFIG, FOREST = "model.safetensors", "config.json", "forest.json"
#: Where a training run ended (Trainer.summary): optional, written by the training stages.
TRAINING = "training.json"


def save_hsae(model: HSAE, folder: str | Path, training: dict | None = None) -> str | Path:
    """Write the model to ``folder`` (created; a path or URL); tensors are saved contiguous on
    the CPU, byte-identical for identical content. ``training``: where its training run ended
    (``training.json``; an older one is removed when None). Every file is serialised before
    the first is written, and each replaces the old one by a rename
    (:func:`~hsae_core.common.fsio.write_bytes`: never rewritten in place); other files in
    ``folder`` are left alone."""
    folder = fsio.as_location(folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    files = {WEIGHTS: fsio.safetensors_bytes(tensors, {"format": "hsae",
                                                       "levels": str(model.n_levels)}),
             CONFIG: json.dumps(model.cfg.to_dict(), indent=2).encode(),
             FOREST: forest_bytes(model.forest)}
    if training is not None:
        files[TRAINING] = json.dumps(training, indent=2, sort_keys=True).encode()
    elif fsio.exists(fsio.join(folder, TRAINING)):
        fsio.remove(fsio.join(folder, TRAINING))  # it described another run
    for name, data in files.items():
        fsio.write_bytes(fsio.join(folder, name), data)
    return folder


def load_training(folder: str | Path) -> dict | None:
    """The ``training.json`` of a saved model folder, or None when it has none."""
    path = fsio.join(fsio.as_location(folder), TRAINING)
    return fsio.read_json(path) if fsio.exists(path) else None


def forest_bytes(forest: Forest) -> bytes:
    """``{"level_sizes": [...], "parent_of": [[...], ...]}`` as JSON bytes."""
    return json.dumps(forest.to_dict()).encode()


def save_forest(forest: Forest, path: str | Path) -> None:
    """:func:`forest_bytes` at a path or URL (atomically)."""
    fsio.write_bytes(fsio.as_location(path), forest_bytes(forest))


def load_forest(path: str | Path) -> Forest:
    return Forest.from_dict(fsio.read_json(fsio.as_location(path)))


def load_hsae(folder: str | Path, device: str | torch.device = "cpu") -> HSAE:
    folder = fsio.as_location(folder)
    missing = [n for n in (WEIGHTS, CONFIG, FOREST) if not fsio.exists(fsio.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"{folder} is not a saved HSAE: missing {missing} "
                                f"(expected the output of save_hsae)")
    cfg = HSAEConfig.from_dict(fsio.read_json(fsio.join(folder, CONFIG))).replace(
        device=str(device))
    model = HSAE(cfg)
    model.load_state_dict(load_bytes(fsio.read_bytes(fsio.join(folder, WEIGHTS))))
    model.forest = load_forest(fsio.join(folder, FOREST))
    if model.forest.level_sizes != cfg.level_sizes:
        raise ValueError(f"{folder}: forest sizes {model.forest.level_sizes} do not match "
                         f"config level_sizes {cfg.level_sizes}")
    return model.to(device)


def load_for_store(folders: dict[str, str | Path], d_model: int, store: str | Path,
                   device: str | torch.device = "cpu") -> dict[str, HSAE]:
    """Load the named models and check that each reads the store's activation width."""
    models = {name: load_hsae(folder, device) for name, folder in folders.items()}
    for name, model in models.items():
        if model.cfg.d_model != d_model:
            raise ValueError(f"{name} model has d_model {model.cfg.d_model}, store {store} holds "
                             f"d = {d_model}: retrain it on this store")
    return models
