"""Save and load a trained HSAE: ``model.safetensors`` + ``config.json`` + ``forest.json``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import HSAEConfig
from .forest import Forest
from .model import HSAE

WEIGHTS, CONFIG, FOREST = "model.safetensors", "config.json", "forest.json"


def save_hsae(model: HSAE, folder: str | Path) -> Path:
    """Write the model to ``folder`` (created); tensors are saved contiguous on the CPU."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "hsae", "levels": str(model.n_levels)})
    (folder / CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=2))
    model.forest.save(folder / FOREST)
    return folder


def load_hsae(folder: str | Path, device: str | torch.device = "cpu") -> HSAE:
    folder = Path(folder)
    missing = [n for n in (WEIGHTS, CONFIG, FOREST) if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a saved HSAE: missing {missing} "
                                f"(expected the output of save_hsae)")
    cfg = HSAEConfig.from_dict(json.loads((folder / CONFIG).read_text())).replace(device=str(device))
    model = HSAE(cfg)
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    model.forest = Forest.load(folder / FOREST)
    if model.forest.level_sizes != cfg.level_sizes:
        raise ValueError(f"{folder}: forest sizes {model.forest.level_sizes} do not match "
                         f"config level_sizes {cfg.level_sizes}")
    return model.to(device)
