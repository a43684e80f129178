"""Next-token loss with a level's reconstruction spliced into the language model (METHOD §4,
SAEBench "CE loss recovered").

The eval split stores, per token, its id, its sequence and its position (BOS positions are never
stored), in sequence order, so the model inputs are rebuilt exactly from the store without the
corpus. A forward hook on block ``layer`` replaces the residual stream at every stored position
by ``decode(encode(scale * h)) / scale`` (the SAEs work on normalised activations, Appendix
A.1); BOS positions are left as they are, as in training, and so are attention-sink positions
(``outlier_norm_ratio``: the extraction's rule, METHOD §1, applied to the batch's stored
positions), which the SAEs never saw. Reported per condition: the mean
cross-entropy of the next token over predictions made from stored positions; and
``recovered = (loss_zero - loss_spliced) / (loss_zero - loss_clean)`` where ``loss_zero``
splices zeros instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from hsae_core.data.lm import _decoder_blocks, _kwargs, resolve_model
from hsae_core.data.store import StoreInfo

Replace = Callable[[torch.Tensor], torch.Tensor]  # [n, d] raw hidden -> [n, d] replacement


def eval_sequences(store: StoreInfo, max_tokens: int, block: int = 65536) -> Iterator[np.ndarray]:
    """Model inputs of the eval split in store order, each ``[BOS] + tokens`` (int64), until at
    least ``max_tokens`` stored tokens were served (whole sequences only)."""
    bos = int(store.attrs["bos_token_id"])
    arrays = {c: store.array("eval", c) for c in ("token_ids", "positions", "sequence_ids")}
    n, served = store.n_rows("eval"), 0
    pending: dict[str, list[np.ndarray]] = {c: [] for c in arrays}

    def build() -> np.ndarray:
        pos = np.concatenate(pending["positions"])
        tokens = np.full(int(pos.max()) + 1, bos, dtype=np.int64)
        tokens[pos] = np.concatenate(pending["token_ids"])
        for v in pending.values():
            v.clear()
        return tokens

    for start in range(0, n, block):
        cols = {c: a[start: start + block] for c, a in arrays.items()}
        seq = cols["sequence_ids"]
        cuts = np.flatnonzero(np.diff(seq)) + 1
        for i, (lo, hi) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, len(seq)])):
            if pending["sequence_ids"] and (i > 0 or pending["sequence_ids"][-1][-1] != seq[lo]):
                tokens = build()
                yield tokens
                served += int((tokens != bos).sum())
                if served >= max_tokens:
                    return
            for c in arrays:
                pending[c].append(cols[c][lo:hi])
    if pending["sequence_ids"]:
        yield build()


def load_full_lm(model: str, gguf_file: str | None = None, device: str = "cpu"):
    """The whole causal LM (all blocks, final norm and head), fp32, in eval mode."""
    from transformers import AutoModelForCausalLM

    src = resolve_model(model, gguf_file)
    lm = AutoModelForCausalLM.from_pretrained(src.name_or_path, dtype=torch.float32,
                                              **_kwargs(src))
    return lm.to(device).eval()


class SplicedLoss:
    """Accumulates next-token loss sums per condition over batches of equal-length sequences."""

    def __init__(self, lm, layer: int, bos_token_id: int, outlier_norm_ratio: float | None = None):
        config = lm.config.get_text_config()
        blocks, _ = _decoder_blocks(lm.base_model, config.num_hidden_layers)
        self.lm, self.block, self.bos = lm, blocks[layer], bos_token_id
        self.outlier_norm_ratio = outlier_norm_ratio
        self.sums: dict[str, float] = {}
        self.count = 0

    @torch.no_grad()
    def add(self, input_ids: torch.Tensor, conditions: dict[str, Replace | None]) -> None:
        """One batch ``[B, T]``; ``conditions`` maps a name to a replacement (None = clean)."""
        input_ids = input_ids.to(self.lm.device)
        stored = input_ids != self.bos
        # predictions from stored positions p (spliced) of the token at p + 1
        src = stored[:, :-1]
        targets = input_ids[:, 1:][src]
        for name, replace in conditions.items():
            handle = None if replace is None else self.block.register_forward_hook(
                _splice_hook(stored, replace, self.outlier_norm_ratio))
            try:
                logits = self.lm(input_ids=input_ids, use_cache=False).logits[:, :-1][src]
            finally:
                if handle is not None:
                    handle.remove()
            loss = F.cross_entropy(logits.float(), targets, reduction="sum")
            self.sums[name] = self.sums.get(name, 0.0) + float(loss)
        self.count += int(targets.numel())

    def losses(self) -> dict[str, float]:
        return {k: v / max(1, self.count) for k, v in self.sums.items()}


def _splice_hook(stored: torch.Tensor, replace: Replace, outlier_norm_ratio: float | None):
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        where = stored
        if outlier_norm_ratio is not None:  # attention sinks keep their residual
            sq = hidden.double().pow(2).sum(-1)
            where = stored & (sq <= outlier_norm_ratio * sq[stored].median())
        hidden[where] = replace(hidden[where]).to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    return hook


def batched_by_length(sequences: Iterator[np.ndarray], batch: int) -> Iterator[torch.Tensor]:
    """Group consecutive sequences of equal length into ``[<= batch, T]`` tensors (no padding)."""
    group: list[np.ndarray] = []
    for seq in sequences:
        if group and (len(group) == batch or len(seq) != len(group[0])):
            yield torch.from_numpy(np.stack(group))
            group = []
        group.append(seq)
    if group:
        yield torch.from_numpy(np.stack(group))


def recovered(clean: float, zero: float, spliced: float) -> float:
    """Fraction of the loss gap between zero-ablation and the clean model that splicing
    recovers."""
    gap = zero - clean
    return (zero - spliced) / gap if gap else float("nan")


__all__ = ["SplicedLoss", "batched_by_length", "eval_sequences", "load_full_lm", "recovered"]
