"""Shared pieces of the activation-store tests: a tiny random Llama and a small corpus, on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

WORDS = [f"w{i}" for i in range(250)]
LABELS = ["alpha", "beta", "gamma"]


def tiny_llama(folder: Path, *, n_layers: int = 4, d_model: int = 64, max_positions: int = 256,
               seed: int = 0) -> str:
    """Save a random LlamaForCausalLM and a word-level tokenizer (BOS <s>=1, EOS </s>=2) to
    ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {w: i + 4 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=d_model, intermediate_size=2 * d_model,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def documents(n_docs: int, seed: int = 0, max_words: int = 90) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"text": " ".join(rng.choice(WORDS, size=int(rng.integers(3, max_words)))),
             "topic": LABELS[i % len(LABELS)]} for i in range(n_docs)]


def jsonl_corpus(path: Path, n_docs: int = 60, seed: int = 0, max_words: int = 90) -> str:
    path.write_text("".join(json.dumps(d) + "\n" for d in documents(n_docs, seed, max_words)))
    return str(path)
