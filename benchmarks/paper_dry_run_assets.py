"""What the paper-shaped dry run (benchmarks/paper_dry_run.py) builds before any stage runs: a
language model of gemma-2-2b's architecture and sizes with random weights, a word-level
tokenizer, a generated corpus with topic labels, and the params.yaml of the temp project
(configs/paper.yaml with local assets and token counts scaled to fit).

Nothing is downloaded. ``PAPER`` holds gemma-2-2b's published dimensions (its config.json on the
hub); ``SMALL`` the same architecture at toy sizes for the CPU (``--small``, run by
tests/test_paper_dry_run.py).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

#: gemma-2-2b's published config (google/gemma-2-2b config.json): 2.61B parameters.
GEMMA2_2B = {
    "hidden_size": 2304, "num_hidden_layers": 26, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 9216, "vocab_size": 256000,
    "max_position_embeddings": 8192, "sliding_window": 4096, "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "hidden_activation": "gelu_pytorch_tanh", "initializer_range": 0.02,
    "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
}
#: The same architecture at toy sizes (the CPU run).
GEMMA2_TINY = GEMMA2_2B | {
    "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
    "max_position_embeddings": 2048, "sliding_window": 64, "query_pre_attn_scalar": 16,
}
TOPICS = ("people", "history", "geography", "arts", "philosophy", "everyday", "society",
          "biology", "physics", "technology", "mathematics", "sports")


@dataclass(frozen=True)
class Scale:
    """Sizes of one dry run: the model, the corpus, and the params.yaml keys that differ from
    configs/paper.yaml (token counts scaled to fit the time limit; the projection scales each
    stage's work back by the ratio, benchmarks/paper_dry_run_report.py)."""

    name: str
    model: dict
    layer: int
    vocab_words: int
    n_docs: int
    doc_words: tuple[int, int]
    params: dict = field(default_factory=dict)
    store_bench_rows: int = 262_144


# Dry-run sizes at the paper's architecture, estimated (before any GPU ran them) at about 4 of
# the 5.5 minutes --time-limit allows on one H100: extraction at ~50k tokens/s, training at the
# H200's ~33k tokens/s (docs/performance.md), the full LM in fp32 for the spliced loss and the
# judge. Keys missing here are configs/paper.yaml's; the JSON lists every difference.
PAPER = Scale(
    name="paper", model=GEMMA2_2B, layer=13, vocab_words=6000, n_docs=1800,
    doc_words=(150, 800), store_bench_rows=131_072,
    params={
        "extract": {"max_tokens": 600_000, "eval_fraction": 0.1, "batch_size": 16},
        "normalize": {"n_tokens": 100_000},
        "sae": {"total_steps": 200, "dead_window_tokens": 100_000, "resample_interval": 100},
        "hierarchy": {"update_interval": 100},
        "train": {"checkpoint_every": 100, "log_every": 10},
        # the paper's ratio of spliced-loss to eval tokens (262144 / 1M), so one factor scales both
        "metrics": {"eval_tokens": 50_000, "lm_loss_tokens": 13_107},
        "evidence": {"eval_tokens": None},
        "judge": {"n_pairs": 4, "n_random": None, "max_tokens": 8, "batch_size": 1},
        "report": {"eval_tokens": None},
    },
)
# The same stages at toy sizes on the CPU: every stage in about a minute on 2 cores.
SMALL = Scale(
    name="small", model=GEMMA2_TINY, layer=2, vocab_words=250, n_docs=160, doc_words=(3, 90),
    store_bench_rows=16_384,
    params={
        "extract": {"context_len": 32, "batch_size": 8, "max_tokens": 3000, "eval_fraction": 0.25,
                    "chunk_bytes": 4096, "shard_bytes": 65536, "shuffle_shards": 2},
        "normalize": {"n_tokens": 1000},
        "sae": {"level_sizes": [8, 16, 32, 64], "target_l0": 3.0, "batch_size": 64,
                "total_steps": 40, "dead_window_tokens": 0, "resample_interval": 0,
                "lr": 3.0e-3},
        "hierarchy": {"update_interval": 10},
        "train": {"checkpoint_every": 10, "log_every": 5},
        "metrics": {"eval_tokens": None, "batch_size": 200, "lm_loss_tokens": 120,
                    "lm_batch_sequences": 4, "bootstrap": 50},
        "evidence": {"eval_tokens": None, "batch_size": 256},
        "judge": {"n_pairs": 3, "n_random": 2, "max_tokens": 3, "batch_size": 1},
        "report": {"eval_tokens": None, "batch_size": 256, "umap_points": 30,
                   "umap_panels": 1, "umap_min_fires": 5},
    },
)

SECTIONS_WITH_DEVICE = ("extract", "sae", "metrics", "evidence", "judge", "report")


def words(n: int) -> list[str]:
    """``n`` distinct pronounceable words (consonant-vowel syllables), deterministic."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    out, seen, k = [], set(), 0
    while len(out) < n:
        syl, x = [], (k * 2654435761) % 70 ** 4
        for _ in range(2 + k % 3):
            syl.append(cons[x % len(cons)] + vows[(x // len(cons)) % len(vows)])
            x //= len(cons) * len(vows)
        word = "".join(syl)
        if word not in seen:
            seen.add(word)
            out.append(word)
        k += 1
    return out


def write_corpus(path: Path, scale: Scale, seed: int = 0) -> dict:
    """A .jsonl corpus of ``scale.n_docs`` documents with a ``topic`` label each: every topic
    draws most words (Zipf-weighted) from its own slice of the vocabulary and the rest from a
    shared one, so features have topics to pick up even on random weights' activations."""
    rng = np.random.default_rng(seed)
    vocab = words(scale.vocab_words)
    shared = vocab[: len(vocab) // 4]
    own = np.array_split(np.array(vocab[len(vocab) // 4:], dtype=object), len(TOPICS))
    zipf = lambda n: (w := 1.0 / np.arange(1, n + 1)) / w.sum()  # noqa: E731
    n_words = 0
    with path.open("w") as f:
        for i in range(scale.n_docs):
            t = i % len(TOPICS)
            n = int(rng.integers(*scale.doc_words))
            from_own = rng.random(n) < 0.7
            text = np.where(from_own, rng.choice(own[t], n, p=zipf(len(own[t]))),
                            rng.choice(shared, n, p=zipf(len(shared))))
            n_words += n
            f.write(json.dumps({"text": " ".join(text), "topic": TOPICS[t]}) + "\n")
    return {"path": str(path), "documents": scale.n_docs, "words": n_words,
            "vocabulary": len(vocab), "topics": len(TOPICS)}


def write_model(folder: Path, scale: Scale, device: str, seed: int = 0) -> dict:
    """A Gemma2ForCausalLM of ``scale.model`` with random weights in bfloat16 and a word-level
    tokenizer (pad 0, eos 1, bos 2, unk 3, as Gemma's), saved as a local model folder that
    hsae_core.data.lm loads. Built on ``device`` (a GPU builds 2.6B parameters in seconds)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    t0 = time.perf_counter()
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab |= {w: i + 4 for i, w in enumerate(words(scale.vocab_words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    dims = dict(scale.model)
    if scale.name != "paper":  # toy sizes: a vocabulary of the tokenizer's size
        dims["vocab_size"] = len(vocab)
    config = Gemma2Config(**dims)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Gemma2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    n_params = sum(p.numel() for p in model.parameters())
    t_build = time.perf_counter() - t0
    model.save_pretrained(folder)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"path": str(folder), "architecture": "Gemma2ForCausalLM", "config": dims,
            "parameters": n_params, "dtype": "bfloat16", "bytes": size,
            "build_s": round(t_build, 2), "save_s": round(time.perf_counter() - t0 - t_build, 2)}


def missing_params(params: dict) -> list[str]:
    """The params.yaml keys that some stage of dvc.yaml declares (``params:``) and ``params``
    lacks: ``dvc repro`` stops at such a stage (``Parameters '...' are missing``)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = []
    for stage in stages.values():
        for item in stage.get("params", []):
            for key in ([item] if isinstance(item, str) else []):
                node = params
                for part in key.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                if node is None and key not in missing:
                    missing.append(key)
    return missing


def dry_params(scale: Scale, model: str, corpus: str, device: str) -> tuple[dict, dict, dict]:
    """configs/paper.yaml with the local model and corpus, ``scale``'s counts and ``device``
    for every device key. Returns ``(params, overrides, filled)``: every key that differs from
    configs/paper.yaml, and the keys it lacks that DVC needs (:func:`missing_params`), filled
    with their config class's default (a whole section as ``{}`` plus the device)."""
    from stages.check_params import SECTIONS

    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    params = copy.deepcopy(paper)
    filled = {}
    for key in missing_params(paper):
        section, _, name = key.partition(".")
        if not name:
            params[section] = {}
            filled[key] = {}
        else:
            params[section][name] = filled[key] = getattr(SECTIONS[section](), name)
    extract = {"model": model, "layer": scale.layer, "corpus": corpus, "text_column": "text",
               "label_column": "topic"}
    params["extract"].pop("dataset_split", None)
    params["extract"] |= extract
    for section, values in scale.params.items():
        params[section] = (params.get(section) or {}) | values
    params["judge"] |= {"backend": "local", "model": model}
    for section in SECTIONS_WITH_DEVICE:
        params[section]["device"] = device
    overrides = {s: {k: v for k, v in (params[s] or {}).items()
                     if not isinstance(paper.get(s), dict) or paper[s].get(k) != v}
                 for s in params if isinstance(params[s], dict)}
    return params, {s: v for s, v in overrides.items() if v}, filled


__all__ = ["GEMMA2_2B", "GEMMA2_TINY", "PAPER", "SMALL", "Scale", "dry_params",
           "missing_params", "write_corpus", "write_model"]
