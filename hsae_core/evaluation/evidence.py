"""Evidence per feature for the autointerp judge (Appendix C) and the forest browser.

For every feature of every level: the ``n_top`` (10) top-activating contexts plus ``n_sampled``
(5) contexts sampled with probability proportional to activation (SAEBench's method, which
Appendix C follows), each a window of ``buffer`` tokens either side of the activating position,
with the feature's activation on every token of the window.

Selection (SAEBench ``get_k_largest_indices(no_overlap=True)`` / ``get_iw_sample_indices``):
- top: the highest activations, greedily, skipping any position within ``buffer`` tokens of an
  already chosen one in the same sequence; ties go to the earlier eval row.
- sampled: successive sampling without replacement, weights = activation, over all positions
  where the feature fired, skipping positions within ``buffer`` of any chosen top or sampled
  one. It is drawn as Efraimidis-Spirakis keys ``log(u) / a`` (largest first), ``u`` a hash of
  ``(seed, level, feature, row)``, so the draw is reproducible and independent of batching.

Streaming (memory bounded, one pass over the eval split for all features of all levels at
once): each feature keeps its ``n_top * (2 buffer + 1)`` best activations and its
``(n_top + n_sampled) * (2 buffer + 1)`` best keys. That is exact: each chosen window excludes
at most ``2 buffer + 1`` positions, so the greedy choice over the kept candidates equals the
choice over all positions. A second pass fills in each chosen window's per-token activations
(it encodes only the batches that hold a window). Memory: the candidate buffers
(16 bytes x ``sum(n_l) x (2 n_top + n_sampled) x (2 buffer + 1)``: 7,680 features -> 65 MB,
30,720 -> 258 MB) plus one batch, plus 24 bytes per eval token (token, sequence, document ids
and position); never the ``[tokens, features]`` activation matrix.

On-disk format (``save_evidence`` / ``load_evidence``), one folder per model::

    <out>/index.json            {"format": "hsae-evidence", "format_version": 1,
                                  "source": name, "model_dir": the HSAE folder it came from,
                                  "lm": store model, "layer": store layer, "store": store path,
                                  "eval_tokens": rows streamed, "level_sizes": [n_0, ...],
                                  "n_top": 10, "n_sampled": 5, "buffer": 10, "window": 21,
                                  "seed": 0, "pad_token_id": -1, "vocab": "vocab.json",
                                  "levels": [{"level": l, "n_features": n_l,
                                              "file": "level<l>.safetensors"}, ...]}
    <out>/vocab.json            ["tok0", "tok1", ...]: vocab[id] = tokenizer.decode([id])
                                (the text a token adds; '\ufffd' for a partial UTF-8 byte)
    <out>/level<l>.safetensors  numpy arrays, n = n_l features, E = n_top + n_sampled
                                examples, W = 2 buffer + 1 window tokens:
      token_ids  int32   [n, E, W]  window token ids; -1 outside the sequence or no example
      acts       float32 [n, E, W]  the feature's activation on each window token (0 = inactive)
      rows       int64   [n, E]     eval-split row of the activating (centre) token; -1 = no
                                    example (the feature fired on too few distinct windows)
      doc_ids    int64   [n, E]     document id of the example (store documents/label: topic)
      positions  int32   [n, E]     position of the centre token in its sequence (-1 = none)
      n_fired    int64   [n]        eval tokens on which the feature fired
      sum_act    float64 [n]        sum of its activations over the eval tokens
      max_act    float32 [n]        its largest activation (0 = never fired)

Examples ``0 .. n_top-1`` are the top contexts in descending activation, ``n_top ..`` the
sampled ones in draw order. The centre token is always window index ``buffer``; the window is
cut (padded with -1) at the edges of the centre's document (packed sequences hold several; a
document's closing EOS token belongs to it) and never crosses into another sequence.
Activations are in the SAE's units on normalised inputs (Appendix A.1). :func:`render` marks
activating tokens ``<<tok>>`` (adjacent ones merged, newlines shown as ``↵``), as SAEBench
formats them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.numpy import load_file

from hsae_core.common import fsio
from hsae_core.common.device import resolve_device_field
from hsae_core.common.errors import check_field, coerce_fields
from hsae_core.model.hsae import HSAE

FORMAT, FORMAT_VERSION = "hsae-evidence", 1
PAD = -1


@dataclass(frozen=True)
class EvidenceConfig:
    """The ``evidence:`` section of params.yaml (stage collect-evidence)."""

    n_top: int = 10
    """Top-activating contexts per feature (Appendix C, SAEBench: 10)."""
    n_sampled: int = 5
    """Contexts sampled with probability proportional to activation (Appendix C: 5)."""
    buffer: int = 10
    """Tokens shown on each side of the activating token (SAEBench's buffer: 10)."""
    eval_tokens: int | None = None
    """Eval-split tokens streamed (None = the whole split)."""
    batch_size: int = 2048
    """Eval tokens encoded at once."""
    seed: int = 0
    """Seed of the activation-proportional draw."""
    device: str = "cpu"
    """Torch device of the encoders: cpu, cuda, cuda:N, mps or auto (cuda if torch
    sees one, else cpu)."""

    def __post_init__(self) -> None:
        coerce_fields(self)
        for name, low in (("n_top", 1), ("n_sampled", 0), ("buffer", 0), ("batch_size", 1),
                          ("seed", 0)):
            check_field(self, name, getattr(self, name) >= low, f"an integer >= {low}")
        check_field(self, "eval_tokens", self.eval_tokens is None or self.eval_tokens >= 1,
                    "null or an integer >= 1")
        resolve_device_field(self)

    @property
    def window(self) -> int:
        return 2 * self.buffer + 1


class Batch(NamedTuple):
    """What the collector needs of an eval batch (``hsae_core.data.reader.EvalBatch`` fits)."""

    activations: torch.Tensor  # [b, d] normalised
    token_ids: torch.Tensor  # [b]
    doc_ids: torch.Tensor  # [b]
    positions: torch.Tensor  # [b]
    sequence_ids: torch.Tensor  # [b]


def _uniform(seed: int, level: int, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A uniform in (0, 1) per (seed, level, feature, row): splitmix64 of the packed ids."""
    with np.errstate(over="ignore"):
        z = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
             + np.uint64(level) * np.uint64(0xD1B54A32D192ED03)
             + cols.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
             + rows.astype(np.uint64) * np.uint64(0x94D049BB133111EB))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def sample_keys(seed: int, level: int, cols: np.ndarray, rows: np.ndarray,
                acts: np.ndarray) -> np.ndarray:
    """Efraimidis-Spirakis keys ``log(u) / a``: taking the largest keys first is successive
    sampling without replacement with probability proportional to ``a``."""
    return np.log(_uniform(seed, level, cols, rows)) / acts.astype(np.float64)


class TopBuffer:
    """Per feature, the ``capacity`` largest keys seen so far and their rows (ties: earlier
    row)."""

    def __init__(self, n_features: int, capacity: int):
        self.keys = np.full((n_features, capacity), -np.inf)
        self.rows = np.full((n_features, capacity), PAD, dtype=np.int64)

    def push(self, cols: np.ndarray, keys: np.ndarray, rows: np.ndarray) -> None:
        """Offer candidates; rows must exceed every row offered before (stream order)."""
        keep = keys > self.keys[cols, -1]  # an equal key loses to the kept, earlier row
        cols, keys, rows = cols[keep], keys[keep], rows[keep]
        if not len(cols):
            return
        touched = np.unique(cols)
        cap = self.keys.shape[1]
        all_c = np.concatenate([np.repeat(touched, cap), cols])
        all_k = np.concatenate([self.keys[touched].ravel(), keys])
        all_r = np.concatenate([self.rows[touched].ravel(), rows])
        order = np.lexsort((all_r, -all_k, all_c))
        all_c, all_k, all_r = all_c[order], all_k[order], all_r[order]
        rank = np.arange(len(all_c)) - np.searchsorted(all_c, all_c, side="left")
        sel = rank < cap
        self.keys[all_c[sel], rank[sel]] = all_k[sel]
        self.rows[all_c[sel], rank[sel]] = all_r[sel]


def choose(rows_in_order: np.ndarray, seq: np.ndarray, k: int, buffer: int,
           taken: list[int]) -> list[int]:
    """Greedy: walk ``rows_in_order`` (-1 ends), keep a row unless it lies within ``buffer``
    rows of a taken one in the same sequence (eval rows are contiguous within a sequence)."""
    out: list[int] = []
    for r in rows_in_order:
        if r < 0 or len(out) == k:
            break
        r = int(r)
        if all(seq[t] != seq[r] or abs(t - r) > buffer for t in taken):
            out.append(r)
            taken.append(r)
    return out


@dataclass
class LevelEvidence:
    """One level's evidence arrays (see the module docstring for each array's meaning)."""

    token_ids: np.ndarray
    acts: np.ndarray
    rows: np.ndarray
    doc_ids: np.ndarray
    positions: np.ndarray
    n_fired: np.ndarray
    sum_act: np.ndarray
    max_act: np.ndarray

    @property
    def n_features(self) -> int:
        return self.rows.shape[0]

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(vars(self))


def _active(model: HSAE, x: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per level the active entries of ``x``'s code: (rows in batch, features, activations)."""
    out = []
    for lv in model.levels:
        code = lv.encode(x)
        on = code.active
        out.append((code.pattern.rows[on].cpu().numpy(), code.pattern.cols[on].cpu().numpy(),
                    code.vals[on].detach().float().cpu().numpy()))
    return out


@torch.no_grad()
def collect_evidence(model: HSAE, batches: Callable[[], Iterable[Batch]],
                     cfg: EvidenceConfig) -> list[LevelEvidence]:
    """Stream eval ``batches`` (in store order) through every level of ``model`` and return each
    level's evidence. ``batches`` is a zero-argument callable returning a fresh iterable (the
    second pass re-reads the split)."""
    device = torch.device(cfg.device)
    sizes = [lv.n_features for lv in model.levels]
    cap_top = cfg.n_top * cfg.window
    cap_iw = (cfg.n_top + cfg.n_sampled) * cfg.window
    tops = [TopBuffer(n, cap_top) for n in sizes]
    iws = [TopBuffer(n, cap_iw) if cfg.n_sampled else None for n in sizes]
    fired = [np.zeros(n, dtype=np.int64) for n in sizes]
    sums = [np.zeros(n) for n in sizes]
    maxes = [np.zeros(n, dtype=np.float32) for n in sizes]
    tok, seq, doc, pos = [], [], [], []
    start = 0
    for batch in batches():
        x = batch.activations.to(device).float()
        for l, (r, c, v) in enumerate(_active(model, x)):
            rows = r.astype(np.int64) + start
            tops[l].push(c, v.astype(np.float64), rows)
            if iws[l] is not None:
                iws[l].push(c, sample_keys(cfg.seed, l, c, rows, v), rows)
            fired[l] += np.bincount(c, minlength=sizes[l])
            sums[l] += np.bincount(c, weights=v, minlength=sizes[l])
            np.maximum.at(maxes[l], c, v)
        tok.append(batch.token_ids.numpy().astype(np.int32))
        seq.append(batch.sequence_ids.numpy().astype(np.int64))
        doc.append(batch.doc_ids.numpy().astype(np.int64))
        pos.append(batch.positions.numpy().astype(np.int32))
        start += x.shape[0]
    n_rows = start
    tok, seq, doc, pos = (np.concatenate(a) if a else np.zeros(0, np.int64)
                          for a in (tok, seq, doc, pos))

    # choose the examples: E centre rows per feature (-1 = none)
    n_ex = cfg.n_top + cfg.n_sampled
    centres = []
    for l, n in enumerate(sizes):
        cen = np.full((n, n_ex), PAD, dtype=np.int64)
        for f in np.flatnonzero(fired[l]):
            taken: list[int] = []
            top = choose(tops[l].rows[f], seq, cfg.n_top, cfg.buffer, taken)
            cen[f, :len(top)] = top
            if iws[l] is not None:
                smp = choose(iws[l].rows[f], seq, cfg.n_sampled, cfg.buffer, taken)
                cen[f, cfg.n_top: cfg.n_top + len(smp)] = smp
        centres.append(cen)
    del tops, iws

    # windows: rows centre - buffer .. centre + buffer within the centre's sequence and document
    offsets = np.arange(-cfg.buffer, cfg.buffer + 1)
    needed = np.zeros(n_rows, dtype=bool)
    out, slot_keys, slot_ids = [], [], []
    for l, cen in enumerate(centres):
        win = cen[:, :, None] + offsets
        ok = (cen[:, :, None] >= 0) & (win >= 0) & (win < n_rows)
        centre = np.broadcast_to(cen[:, :, None], win.shape)[ok]
        ok[ok] &= (seq[win[ok]] == seq[centre]) & (doc[win[ok]] == doc[centre])
        win = np.where(ok, win, PAD)
        needed[win[ok]] = True
        token_ids = np.full(win.shape, PAD, dtype=np.int32)
        token_ids[ok] = tok[win[ok]]
        feat = np.broadcast_to(np.arange(len(cen))[:, None, None], win.shape)
        keys = feat[ok] * np.int64(max(1, n_rows)) + win[ok]
        order = np.argsort(keys, kind="stable")
        slot_keys.append(keys[order])
        slot_ids.append(np.flatnonzero(ok.ravel())[order])
        has = cen >= 0
        safe = np.where(has, cen, 0)
        out.append(LevelEvidence(
            token_ids=token_ids, acts=np.zeros(win.shape, dtype=np.float32), rows=cen,
            doc_ids=np.where(has, doc[safe] if n_rows else 0, PAD).astype(np.int64),
            positions=np.where(has, pos[safe] if n_rows else 0, PAD).astype(np.int32),
            n_fired=fired[l], sum_act=sums[l], max_act=maxes[l]))

    # second pass: per-token activations of each chosen window (only blocks holding a window)
    start = 0
    for batch in batches():
        b = batch.activations.shape[0]
        if start >= n_rows:
            break
        if needed[start: start + b].any():
            x = batch.activations.to(device).float()
            for l, (r, c, v) in enumerate(_active(model, x)):
                keys = c.astype(np.int64) * np.int64(max(1, n_rows)) + r.astype(np.int64) + start
                lo = np.searchsorted(slot_keys[l], keys, side="left")
                hi = np.searchsorted(slot_keys[l], keys, side="right")
                flat = out[l].acts.reshape(-1)
                for extra in range(int((hi - lo).max(initial=0))):  # a row may lie in two windows
                    m = hi - lo > extra
                    flat[slot_ids[l][lo[m] + extra]] = v[m]
        start += b
    return out


def save_evidence(levels: list[LevelEvidence], folder: str | Path, *, vocab: list[str], meta: dict,
                  cfg: EvidenceConfig) -> Path:
    """Write ``index.json``, ``vocab.json`` and one ``level<l>.safetensors`` per level into a
    temporary folder that then replaces ``folder`` whole (never a file rewritten in place;
    byte-identical for identical content)."""
    folder = Path(folder)
    index = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta,
             "level_sizes": [ev.n_features for ev in levels], "n_top": cfg.n_top,
             "n_sampled": cfg.n_sampled, "buffer": cfg.buffer, "window": cfg.window,
             "seed": cfg.seed, "pad_token_id": PAD, "vocab": "vocab.json", "levels": []}
    with fsio.replacing_folder(folder) as tmp:
        for l, ev in enumerate(levels):
            name = f"level{l}.safetensors"
            fsio.write_bytes(tmp / name, fsio.safetensors_bytes(
                {k: np.ascontiguousarray(v) for k, v in ev.arrays().items()}))
            index["levels"].append({"level": l, "n_features": ev.n_features, "file": name})
        fsio.write_text(tmp / "vocab.json", json.dumps(vocab, ensure_ascii=False))
        fsio.write_text(tmp / "index.json", json.dumps(index, indent=2) + "\n")
    return folder


@dataclass
class Evidence:
    """A saved evidence folder: ``index``, ``vocab`` and ``levels[l]`` (:class:`LevelEvidence`)."""

    index: dict
    vocab: list[str]
    levels: list[LevelEvidence]

    def examples(self, level: int, feature: int) -> list[str]:
        """The feature's contexts rendered with ``<<tok>>`` marks (top first; missing ones
        omitted)."""
        ev = self.levels[level]
        return [render([self.vocab[t] for t in ev.token_ids[feature, e] if t != PAD],
                       ev.acts[feature, e][ev.token_ids[feature, e] != PAD])
                for e in range(ev.rows.shape[1]) if ev.rows[feature, e] >= 0]


def load_evidence(folder: str | Path) -> Evidence:
    folder = Path(folder)
    path = folder / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no evidence at {folder}: "
                                "run `python -m stages.collect_evidence`")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder} is not {FORMAT} version {FORMAT_VERSION}")
    vocab = json.loads((folder / index["vocab"]).read_text())
    levels = [LevelEvidence(**load_file(str(folder / lv["file"]))) for lv in index["levels"]]
    return Evidence(index, vocab, levels)


def render(tokens: list[str], acts: np.ndarray | list[float], threshold: float = 0.0) -> str:
    """One context as text, tokens with activation > ``threshold`` marked ``<<tok>>``
    (adjacent marks merged, newlines as ``↵``, replacement characters dropped; SAEBench)."""
    text = "".join(f"<<{t}>>" if a > threshold else t for t, a in zip(tokens, acts))
    return text.replace(">><<", "").replace("\ufffd", "").replace("\n", "↵")


def decode_vocab(tokenizer) -> list[str]:
    """``vocab[id]`` = the text token ``id`` decodes to on its own."""
    n = len(tokenizer)
    return tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)


__all__ = ["Batch", "Evidence", "EvidenceConfig", "LevelEvidence", "TopBuffer", "choose",
           "collect_evidence", "decode_vocab", "load_evidence", "render", "sample_keys",
           "save_evidence"]
