"""Streaming extraction: corpus -> sequences -> residual stream -> sharded Zarr store.

Each split is one pass over the corpus (documents of the other split are skipped before
tokenising). Sequences are batched in a fixed order, so the row stream is a deterministic
function of the config. Rows are gathered into windows of ``shuffle_shards`` shards; a train
window is permuted with a seed derived from (seed, window) and written shard by shard, then the
progress marker records it. A resumed run re-tokenises (without running the model) up to the
first unwritten row and continues, so it yields byte-for-byte the store an uninterrupted run
yields (on the same hardware and thread count). Memory: one window plus one batch.

Distributed (``torchrun``, ``dist`` from :func:`hsae_core.common.distributed.init_from_env`):
every rank tokenises the whole stream (cheap) to learn each split's row count, rank 0 sizes the
arrays, and rank r runs the model only on the batches that overlap the windows ``k`` with
``k % world_size == r``, permutes each window with the same (seed, window) seed and writes
its shards. Windows are whole shards, so each shard has one writer, and the rows and their
order are those of a 1-process extraction (a batch that straddles two ranks' windows is run by
both). A window done is marked by a file, so an interrupted distributed run resumes, on any
number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hsae_core.common import fsio
from hsae_core.common.distributed import SINGLE, DistContext, barrier
from hsae_core.data.config import ExtractConfig
from hsae_core.data.corpus import (
    SPLITS,
    Sequence,
    check_corpus,
    document_split,
    iter_documents,
    pack_sequences,
    shuffle_documents,
    tokenize_documents,
)
from hsae_core.data.lm import LanguageModel, ModelError, load_lm
from hsae_core.data.store import (
    COLUMNS,
    STORAGE,
    Layout,
    StoreInfo,
    StoreWriter,
    open_store,
    to_storage,
)


class ExtractionError(RuntimeError):
    """The model produced activations that cannot be stored (NaN or Inf)."""


def extract_activations(cfg: ExtractConfig, out: str | Path, *, overwrite: bool = False,
                        lm: LanguageModel | None = None, progress: bool = True,
                        on_shard: Callable[[str, int], None] | None = None,
                        dist: DistContext = SINGLE) -> StoreInfo:
    """Write (or resume) the store for ``cfg`` at ``out`` (a path or fsspec URL); return it opened.

    ``lm``: an already loaded model for ``cfg.model`` / ``cfg.layer`` (else it is loaded).
    ``on_shard(split, shard_index)`` is called after each shard is written.
    ``dist``: this rank of a distributed extraction (every rank calls this function).
    Bad input (model, layer, context length, corpus) fails before the weights are loaded.
    """
    check_corpus(cfg.corpus, **_corpus_kwargs(cfg))
    if lm is None:
        lm = load_lm(cfg.model, cfg.layer, cfg.context_len, gguf_file=cfg.gguf_file,
                     device=dist.device if dist.active else cfg.device,
                     compute_dtype=cfg.compute_dtype)
    elif (lm.name, lm.layer) != (cfg.model, cfg.layer):
        raise ModelError(f"loaded model is {lm.name!r} layer {lm.layer}, config asks for "
                         f"{cfg.model!r} layer {cfg.layer}")
    elif lm.max_context is not None and cfg.context_len > lm.max_context:
        raise ModelError(f"context_len {cfg.context_len} exceeds what {lm.name!r} can take "
                         f"({lm.max_context}): choose context_len <= {lm.max_context}")
    layout = Layout.from_bytes(lm.d_model, cfg.dtype, cfg.chunk_bytes, cfg.shard_bytes)
    if dist.active:
        return _extract_distributed(cfg, lm, out, layout, overwrite, progress, on_shard, dist)
    writer = StoreWriter(out, layout, cfg.to_dict(), overwrite=overwrite)
    budget = cfg.split_budget()
    done = sum(writer.rows_done(s) for s in SPLITS)
    with tqdm(total=cfg.max_tokens, initial=done, unit="tok", unit_scale=True,
              disable=not progress, desc="extract", smoothing=0.1) as bar:
        for split in SPLITS:
            if not writer.split_done(split):
                _extract_split(cfg, lm, writer, split, budget[split], bar, on_shard)
    return _finish(cfg, lm, writer, layout, out)


def _finish(cfg: ExtractConfig, lm: LanguageModel, writer: StoreWriter, layout: Layout,
            out: str | Path) -> StoreInfo:
    """Document table, attributes, commit (one process)."""
    n_tokens = {s: writer.rows_done(s) for s in SPLITS}
    if n_tokens["train"] == 0:
        raise ExtractionError(f"corpus {cfg.corpus!r} gave no train tokens: check the corpus and "
                              "eval_fraction")
    n_docs = max(writer.max_doc_id(s) for s in SPLITS) + 1
    writer.write_documents(*_document_table(cfg, n_docs))
    writer.commit({
        "model": cfg.model, "layer": cfg.layer,
        "hook": f"residual stream after block {cfg.layer} (hidden_states[{cfg.layer + 1}])",
        "d_model": lm.d_model, "n_layers": lm.n_layers, "dtype": cfg.dtype,
        "storage_dtype": np.dtype(STORAGE[cfg.dtype]).name, "context_len": cfg.context_len,
        "corpus": cfg.corpus, "n_tokens": n_tokens, "n_documents": n_docs,
        "bos_token_id": lm.bos_token_id, "eos_token_id": lm.eos_token_id, "bos_excluded": True,
        "shuffled": {"train": True, "eval": False},
        "chunk_rows": layout.chunk_rows, "shard_rows": layout.shard_rows,
        "extract_config": cfg.to_dict(), "outliers": {"norm_ratio": cfg.outlier_norm_ratio},
    })
    return open_store(out, model=cfg.model, layer=cfg.layer)


def _extract_distributed(cfg: ExtractConfig, lm: LanguageModel, out, layout: Layout,
                         overwrite: bool, progress: bool, on_shard,
                         dist: DistContext) -> StoreInfo:
    budget = cfg.split_budget()
    plan = {s: _plan_split(cfg, lm, s, budget[s]) for s in SPLITS}  # (rows, max doc id) per split
    if dist.is_main:
        writer = StoreWriter(out, layout, cfg.to_dict(), overwrite=overwrite)
        for split in SPLITS:
            writer.presize(split, plan[split][0])
    barrier(dist)
    if not dist.is_main:
        writer = StoreWriter(out, layout, cfg.to_dict(), attach=True)
    size = layout.shard_rows * cfg.shuffle_shards  # rank 0 shows its own share of the rows
    mine = sum(min(size, rows - k) for rows, _ in plan.values()
               for k in range(0, rows, dist.world_size * size))
    with tqdm(total=mine, unit="tok", unit_scale=True, disable=not (progress and dist.is_main),
              desc=f"extract (rank 0 of {dist.world_size})", smoothing=0.1) as bar:
        for split in SPLITS:
            _extract_windows(cfg, lm, writer, split, plan[split][0], dist, bar, on_shard)
    barrier(dist)
    if dist.is_main:
        for split in SPLITS:
            writer.mark(split, plan[split][0], plan[split][1], done=True)
        fsio.remove(fsio.join(writer.partial, WINDOWS))
        _finish(cfg, lm, writer, layout, out)
    barrier(dist)
    return open_store(out, model=cfg.model, layer=cfg.layer)


#: Folder of per-window "done" markers of a distributed extraction (removed at commit).
WINDOWS = "windows_done"


def _plan_split(cfg: ExtractConfig, lm: LanguageModel, split: str,
                cap: int | None) -> tuple[int, int]:
    """Rows a split will hold and the largest document id among them (tokenising only)."""
    rows, max_doc, seqs = 0, -1, split_sequences(cfg, lm, split)
    while cap is None or rows < cap:
        batch = list(islice(seqs, cfg.batch_size))
        if not batch:
            break
        doc_ids = stored_columns(batch, lm.bos_token_id)["doc_ids"]
        take = len(doc_ids) if cap is None else min(len(doc_ids), cap - rows)
        if take:
            max_doc = max(max_doc, int(doc_ids[:take].max()))
        rows += take
    return rows, max_doc


def _extract_windows(cfg: ExtractConfig, lm: LanguageModel, writer: StoreWriter, split: str,
                     total: int, dist: DistContext, bar, on_shard) -> None:
    """This rank's windows of ``split`` (rows ``[k size, (k+1) size)`` with
    ``k % world == rank``)."""
    lay = writer.layout
    size = lay.shard_rows * cfg.shuffle_shards

    def done(k: int) -> bool:
        return (split in writer.progress["done"] or (k + 1) * size <= writer.rows_done(split)
                or fsio.exists(fsio.join(writer.partial, f"{WINDOWS}/{split}-{k}")))

    todo = [k for k in range(dist.rank, -(-total // size), dist.world_size) if not done(k)]
    if not todo:
        return
    bufs: dict[int, list] = {}  # window -> [acts, cols, rows filled]
    end, seen, seqs = min(total, (todo[-1] + 1) * size), 0, split_sequences(cfg, lm, split)
    while seen < end and todo:
        batch = list(islice(seqs, cfg.batch_size))
        if not batch:
            break
        cols = stored_columns(batch, lm.bos_token_id)
        a, b = seen, seen + len(cols["token_ids"])
        seen = b
        hits = [k for k in todo if k * size < b and min(total, (k + 1) * size) > a]
        if not hits:
            continue
        rows = residual_rows(lm, batch)
        cols["outlier"] = outlier_flags(rows, cfg.outlier_norm_ratio)
        acts = _checked(rows.to(getattr(torch, cfg.dtype)), cols, split, cfg.dtype)
        for k in hits:
            w0, w1 = k * size, min(total, (k + 1) * size)
            if k not in bufs:
                bufs[k] = [np.empty((w1 - w0, lay.d_model), dtype=STORAGE[cfg.dtype]),
                           {c: np.empty(w1 - w0, dtype=t) for c, t in COLUMNS.items()}, 0]
            buf = bufs[k]
            lo, hi = max(a, w0), min(b, w1)
            buf[0][lo - w0: hi - w0] = acts[lo - a: hi - a]
            for c in COLUMNS:
                buf[1][c][lo - w0: hi - w0] = cols[c][lo - a: hi - a]
            buf[2] += hi - lo
            if buf[2] == w1 - w0:
                _write_window(cfg, writer, split, k, size, *bufs.pop(k)[:2], on_shard)
                fsio.write_bytes(fsio.join(writer.partial, f"{WINDOWS}/{split}-{k}"), b"")
                todo.remove(k)
                bar.update(w1 - w0)


def _write_window(cfg: ExtractConfig, writer: StoreWriter, split: str, k: int, size: int,
                  acts: np.ndarray, cols: dict, on_shard) -> None:
    """One window permuted as :class:`_Window` permutes it, written shard by shard."""
    n, shard = len(acts), writer.layout.shard_rows
    order = (np.random.default_rng([cfg.seed, k]).permutation(n) if split == "train"
             else np.arange(n))
    for i in range(0, n, shard):
        part = order[i: i + shard]
        writer.write_shard(split, k * size + i, acts[part], {c: v[part] for c, v in cols.items()})
        if on_shard is not None:
            on_shard(split, (k * size + i) // shard)


def _corpus_kwargs(cfg: ExtractConfig) -> dict:
    return {"text_column": cfg.text_column, "label_column": cfg.label_column,
            "dataset_config": cfg.dataset_config, "dataset_split": cfg.dataset_split}


def split_sequences(cfg: ExtractConfig, lm: LanguageModel, split: str) -> Iterator[Sequence]:
    """The deterministic sequence stream of one split: the corpus's documents in the seeded
    order of :func:`shuffle_documents`, those of ``split`` kept."""
    ordered = shuffle_documents(iter_documents(cfg.corpus, **_corpus_kwargs(cfg)),
                                cfg.doc_shuffle_buffer, cfg.seed)
    docs = (d for d in ordered
            if document_split(d.doc_id, cfg.eval_fraction, cfg.seed) == split)
    return pack_sequences(tokenize_documents(docs, lm.tokenizer), cfg.context_len,
                          lm.bos_token_id, lm.eos_token_id, cfg.packing)


def stored_columns(batch: list[Sequence], bos: int) -> dict[str, np.ndarray]:
    """Id columns of the stored rows of ``batch``: every position whose token is not BOS."""
    keep = [s.tokens != bos for s in batch]
    return {
        "token_ids": np.concatenate([s.tokens[k] for s, k in zip(batch, keep)]).astype(np.int32),
        "doc_ids": np.concatenate([s.doc_ids[k] for s, k in zip(batch, keep)]),
        "positions": np.concatenate([np.flatnonzero(k) for k in keep]).astype(np.int32),
        "sequence_ids": np.concatenate([np.full(k.sum(), s.index) for s, k in zip(batch, keep)]),
    }


def outlier_flags(rows: torch.Tensor, norm_ratio: float | None) -> np.ndarray:
    """The ``outlier`` column of one extraction batch (METHOD §1): 1 where ``||x||^2`` exceeds
    ``norm_ratio`` times the batch's median ``||x||^2`` (attention sinks), else 0."""
    if norm_ratio is None or rows.shape[0] == 0:
        return np.zeros(rows.shape[0], dtype=np.uint8)
    sq = rows.double().pow(2).sum(1)
    return (sq > norm_ratio * sq.median()).cpu().numpy().astype(np.uint8)


def residual_rows(lm: LanguageModel, batch: list[Sequence]) -> torch.Tensor:
    """Residual-stream rows of the non-BOS positions of ``batch``, in batch order.

    Sequences of equal length share one forward pass and nothing is ever padded, so padding
    cannot change a stored activation (the batch shape may still move the last float bit, as
    in any batched forward).
    """
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(batch):
        by_length.setdefault(len(s.tokens), []).append(i)
    rows: list[torch.Tensor] = [torch.empty(0)] * len(batch)
    for members in by_length.values():
        ids = torch.from_numpy(np.stack([batch[i].tokens for i in members])).to(lm.device)
        hidden = lm.residual(ids)
        for j, i in enumerate(members):
            rows[i] = hidden[j][torch.from_numpy(batch[i].tokens != lm.bos_token_id).to(lm.device)]
    return torch.cat(rows)


def _extract_split(cfg, lm, writer, split, cap, bar, on_shard) -> None:
    layout = writer.layout
    start = writer.rows_done(split)
    window = _Window(layout, cfg, split, writer, start, cap, on_shard)
    seen = 0
    seqs = split_sequences(cfg, lm, split)
    while not window.full_stop:
        batch = list(islice(seqs, cfg.batch_size))
        if not batch:
            break
        cols = stored_columns(batch, lm.bos_token_id)
        n = len(cols["token_ids"])
        if seen + n <= start:  # written before an interruption: no forward pass needed
            seen += n
            continue
        rows = residual_rows(lm, batch)
        cols["outlier"] = outlier_flags(rows, cfg.outlier_norm_ratio)
        acts = _checked(rows.to(getattr(torch, cfg.dtype)), cols, split, cfg.dtype)
        skip = max(0, start - seen)
        seen += n
        bar.update(window.add(acts[skip:], {k: v[skip:] for k, v in cols.items()}))
    window.flush(final=True)


def _checked(rows: torch.Tensor, cols: dict, split: str, dtype: str) -> np.ndarray:
    bad = (~torch.isfinite(rows).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        where = ", ".join(f"(sequence {cols['sequence_ids'][i]}, position {cols['positions'][i]}, "
                          f"document {cols['doc_ids'][i]})" for i in bad[:5])
        hint = " float16 overflows: store as bfloat16 or float32." if dtype == "float16" else ""
        raise ExtractionError(f"NaN or Inf activations in the {split} split at {len(bad)} rows, "
                              f"first {where}.{hint}")
    return to_storage(rows, dtype)


class _Window:
    """Rows ``[first, first + size)`` of a split, permuted (train) and written shard by shard."""

    def __init__(self, layout: Layout, cfg: ExtractConfig, split: str, writer: StoreWriter,
                 start: int, cap: int | None, on_shard):
        self.size = layout.shard_rows * cfg.shuffle_shards
        self.layout, self.seed, self.split = layout, cfg.seed, split
        self.writer, self.on_shard = writer, on_shard
        self.first, self.cap, self.n = start, cap, 0
        self.max_doc_id = writer.max_doc_id(split)
        rows = self.size if cap is None else max(1, min(self.size, cap - start))
        self.acts = np.empty((rows, layout.d_model), dtype=STORAGE[cfg.dtype])
        self.cols = {k: np.empty(rows, dtype=v) for k, v in COLUMNS.items()}

    @property
    def full_stop(self) -> bool:
        return self.cap is not None and self.first + self.n >= self.cap

    def add(self, acts: np.ndarray, cols: dict) -> int:
        """Append rows up to the cap, flushing each full window; return rows taken."""
        if self.cap is not None:
            acts = acts[: max(0, self.cap - self.first - self.n)]
        taken = 0
        while taken < len(acts):
            k = min(len(acts) - taken, len(self.acts) - self.n)
            self.acts[self.n: self.n + k] = acts[taken: taken + k]
            for name, col in cols.items():
                self.cols[name][self.n: self.n + k] = col[taken: taken + k]
            self.n, taken = self.n + k, taken + k
            if self.n == len(self.acts) and not self.full_stop:
                self.flush(final=False)
        return taken

    def flush(self, final: bool) -> None:
        n = self.n
        order = np.arange(n)
        if self.split == "train":
            order = np.random.default_rng([self.seed, self.first // self.size]).permutation(n)
        if n:
            self.max_doc_id = max(self.max_doc_id, int(self.cols["doc_ids"][:n].max()))
        for i in range(0, n, self.layout.shard_rows):
            part = order[i: i + self.layout.shard_rows]
            self.writer.write_shard(self.split, self.first + i, self.acts[part],
                                    {k: v[part] for k, v in self.cols.items()})
            if self.on_shard is not None:
                self.on_shard(self.split, (self.first + i) // self.layout.shard_rows)
        self.first, self.n = self.first + n, 0
        self.writer.mark(self.split, self.first, self.max_doc_id, done=final)


def _document_table(cfg: ExtractConfig, n_docs: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    splits = np.zeros(n_docs, dtype=np.uint8)
    labels = np.full(n_docs, -1, dtype=np.int32)
    names: dict[str, int] = {}
    for doc in islice(iter_documents(cfg.corpus, **_corpus_kwargs(cfg)), n_docs):
        splits[doc.doc_id] = SPLITS.index(document_split(doc.doc_id, cfg.eval_fraction, cfg.seed))
        if doc.label is not None:
            labels[doc.doc_id] = names.setdefault(doc.label, len(names))
    return splits, labels, list(names)


__all__ = ["ExtractionError", "extract_activations", "outlier_flags", "residual_rows",
           "split_sequences", "stored_columns"]
