"""Autointerp judgement of parent-child pairs (§4.3, Appendix C).

Pairs: ``n_pairs`` links drawn uniformly from the HSAE's forest ("hsae") and from the post-hoc
baseline's forest ("posthoc"), and a control of ``n_random`` random non-linked (parent, child)
pairs of HSAE features between the same levels, in the same level-pair proportions as the
HSAE sample ("random"), so the judge's base rate of "Yes" sits beside the linked rates. Only
features with at least one eval context (hsae_core.evaluation.evidence) can be shown; links
without one are skipped and counted. Within each source exactly half the pairs show the child as
Neuron A (``order = "child_first"``), the rest the parent ("parent_first").

Prompts are Appendix C's system prompt and user template verbatim (PDF line breaks undone);
each feature's contexts (10 top + 5 activation-sampled) are listed as ``Example i: ...`` lines
with activating tokens marked ``<<tok>>``. Answers are parsed tolerantly in form
(``HaveRelationship: Yes`` in any case or spacing, markdown emphasis, a closed ``<think>``
block before it) but strictly in content: a verdict counts only when it is unambiguous (see
:func:`parse_answer`); an answer cut off (a ``<think>`` block left open, or longer than
``max_answer_chars`` and stored cut) or anything else is recorded as ``unparseable`` with its
raw text, never guessed.

Metrics per source: the Yes rate over parsed answers with a 95% Wilson interval, the
unparseable rate, and the same Yes rate by stated confidence and by presentation order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from hsae_core.common.device import resolve_device_field
from hsae_core.common.errors import check_field, coerce_fields
from hsae_core.evaluation.evidence import Evidence
from hsae_core.judge.backends import Backend, Completion, Messages, ResponseCache, complete_cached
from hsae_core.model.forest import Forest

SOURCES = ("hsae", "posthoc", "random")
BACKENDS = ("local", "openai")
CONFIDENCES = ("high", "medium", "low")

SYSTEM_PROMPT = (
    "We're studying neurons in a sparse autoencoder (SAE) within a neural network. Each neuron "
    "activates on specific words, substrings, or concepts in short documents, with activating "
    "words indicated by << ... >>. You will be given two sets of documents where two different "
    "neurons activate. Your task is to compare the activation patterns of these two neurons and "
    "determine if there is a parent-child relationship between them. A parent-child relationship "
    "means that one neuron's activating concept (the child) is a subset or a more specific "
    "version of the other neuron's activating concept (the parent). Analyze the provided examples "
    "and output your judgment in the following format:\n"
    "HaveRelationship: [Yes/No]\n"
    "Confidence: [High/Medium/Low]\n"
    "Do not include any additional text, explanations, or formatting.")

USER_TEMPLATE = (
    "Here are the activating documents for Neuron A:\n{a}\n\n"
    "And for Neuron B:\n{b}\n\n"
    "Based on these documents, determine if Neuron A and Neuron B have a parent-child "
    "relationship.")


@dataclass(frozen=True)
class JudgeConfig:
    """The ``judge:`` section of params.yaml (stage judge)."""

    n_pairs: int = 5000
    """Linked pairs sampled from each forest (HSAE, post-hoc baseline); the paper: 5000."""
    n_random: int | None = None
    """Random non-linked control pairs (None = n_pairs)."""
    backend: str = "local"
    """``local`` (a transformers chat model in process) or ``openai`` (any OpenAI-compatible
    chat-completions endpoint: vLLM, Ollama, hosted APIs)."""
    model: str = "embedded:smollm2"
    """Local: ``embedded:smollm2``, a folder, a .gguf file or a hub name. OpenAI: the served model
    name."""
    base_url: str | None = None
    """OpenAI backend: the API root, e.g. ``http://localhost:8000/v1`` or
    ``https://api.openai.com/v1``."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself never goes in params);
    null for a server without authentication."""
    concurrency: int = 8
    """OpenAI backend: requests in flight at once."""
    max_retries: int = 6
    """Retries per request on timeouts, connection errors, 429 and 5xx."""
    backoff_base_s: float = 1.0
    """First retry waits up to this long (full jitter), doubling each retry."""
    backoff_max_s: float = 60.0
    """Cap of one backoff wait (a longer Retry-After is still honoured, up to max_wait_s)."""
    timeout_s: float = 60.0
    """OpenAI backend: wall-time limit of one attempt, the whole answer's body included (a server
    trickling bytes cannot stretch it); past it the attempt is a timeout and retried."""
    max_wait_s: float = 120.0
    """OpenAI backend: longest single wait before a retry (>= backoff_max_s). A server asking
    (Retry-After) for more fails the request at once, with the reason, instead of waiting."""
    max_request_s: float = 600.0
    """OpenAI backend: wall-time limit of one request, all attempts and waits together
    (>= timeout_s); a retry that would end past it is not made and the request fails."""
    max_answer_chars: int = 4000
    """Longest answer stored (pairs.jsonl and the cache): a longer one keeps its first
    ``max_answer_chars`` characters, is marked ``raw_truncated`` and is unparseable (its end,
    where the verdict may be, is lost). Raise it for reasoning models that think at length."""
    max_tokens: int = 24
    """Answer length limit (the expected answer is about 12 tokens)."""
    temperature: float = 0.0
    """OpenAI backend sampling temperature (the local backend decodes greedily)."""
    batch_size: int = 1
    """Local backend: prompts generated together (left-padded)."""
    answer_prefix: str | None = None
    """Local backend: text that starts the assistant's answer (e.g. ``HaveRelationship:``), so a
    small model answers in the format; recorded as part of the raw answer. A departure from
    Appendix C's protocol for the 135M stand-in; null for a capable judge."""
    device: str = "cpu"
    """Local backend: torch device, cpu, cuda, cuda:N, mps or auto (cuda if torch
    sees one, else cpu)."""
    seed: int = 0
    """Seed of pair sampling and presentation order."""
    max_failed_share: float = 0.1
    """Largest share of pairs whose request may fail for good (after its retries) in a run that
    is recorded: above it the stage exits non-zero with the reason (the Yes rates would rest on
    the pairs a struggling server happened to answer), and writes the records with their
    errors to ``pairs.failed.jsonl`` instead of ``pairs.jsonl``. A run that judged no pair
    fails whatever this says. Answered pairs are cached, so a rerun asks only for the rest."""

    def __post_init__(self) -> None:
        coerce_fields(self)  # every field of its annotated type, or a ConfigError naming it

        def check(name: str, ok: bool, allowed: str) -> None:
            check_field(self, name, ok, allowed)

        for name, low in (("n_pairs", 1), ("concurrency", 1), ("max_retries", 0),
                          ("max_tokens", 1), ("batch_size", 1), ("seed", 0),
                          ("max_answer_chars", 1)):
            check(name, getattr(self, name) >= low, f"an integer >= {low}")
        check("n_random", self.n_random is None or self.n_random >= 0, "null or an integer >= 0")
        check("backend", self.backend in BACKENDS, f"one of {BACKENDS}")
        check("model", self.model != "", "a model name")
        check("base_url", self.backend != "openai" or (
                  self.base_url is not None and self.base_url.startswith(("http://", "https://"))),
              "an http(s) URL when backend is openai (e.g. http://localhost:8000/v1)")
        check("api_key_env", self.api_key_env is None
              or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env) is not None,
              "null or an environment variable name (the key itself never goes in params)")
        for name in ("backoff_base_s", "backoff_max_s", "timeout_s", "max_wait_s",
                     "max_request_s"):
            check(name, getattr(self, name) > 0, "a finite number > 0")
        check("max_wait_s", self.max_wait_s >= self.backoff_max_s,
              f"a number >= backoff_max_s ({self.backoff_max_s})")
        check("max_request_s", self.max_request_s >= self.timeout_s,
              f"a number >= timeout_s ({self.timeout_s})")
        check("temperature", 0 <= self.temperature <= 2, "a number in [0, 2]")
        check("max_failed_share", 0 <= self.max_failed_share <= 1, "a fraction in [0, 1]")
        resolve_device_field(self)


class Pair(NamedTuple):
    source: str
    parent_level: int
    parent: int
    child_level: int
    child: int
    order: str  # "parent_first" | "child_first"


def _with_examples(ev: Evidence, level: int) -> np.ndarray:
    return ev.levels[level].rows[:, 0] >= 0


def sample_linked(forest: Forest, ev: Evidence, n: int,
                  rng: np.random.Generator) -> tuple[list[tuple[int, int, int]], int]:
    """Up to ``n`` links ``(parent_level, parent, child)`` drawn uniformly without replacement
    among the links whose two features have contexts; also returns how many links had none."""
    links, skipped = [], 0
    for l, parent_of in enumerate(forest.parent_of):
        p = parent_of.cpu().numpy()
        kids = np.flatnonzero(p >= 0)
        ok = _with_examples(ev, l + 1)[kids] & _with_examples(ev, l)[p[kids]]
        skipped += int((~ok).sum())
        links += [(l, int(p[c]), int(c)) for c in kids[ok]]
    pick = rng.permutation(len(links))[:n]
    return [links[i] for i in sorted(pick)], skipped


def sample_random(forest: Forest, ev: Evidence, level_pairs: list[int], rng: np.random.Generator,
                  n: int) -> list[tuple[int, int, int]]:
    """``n`` random (parent, child) pairs, not linked in ``forest``, level pairs drawn from
    ``level_pairs`` (the linked sample's mix), features with contexts only, no repeats."""
    out, seen = [], set()
    if not level_pairs:
        return out
    for _ in range(100 * n + 100):
        if len(out) == n:
            break
        l = int(level_pairs[rng.integers(len(level_pairs))])
        parents, kids = (np.flatnonzero(_with_examples(ev, l)),
                         np.flatnonzero(_with_examples(ev, l + 1)))
        if not len(parents) or not len(kids):
            continue
        p, c = int(parents[rng.integers(len(parents))]), int(kids[rng.integers(len(kids))])
        if int(forest.parent_of[l][c]) == p or (l, p, c) in seen:
            continue
        seen.add((l, p, c))
        out.append((l, p, c))
    return out


def with_orders(source: str, links: list[tuple[int, int, int]],
                rng: np.random.Generator) -> list[Pair]:
    """Pairs of ``source``; exactly half (rounded down) shown child first, chosen at random."""
    flip = np.zeros(len(links), dtype=bool)
    flip[rng.permutation(len(links))[: len(links) // 2]] = True
    return [Pair(source, l, p, l + 1, c, "child_first" if f else "parent_first")
            for (l, p, c), f in zip(links, flip)]


def examples_block(ev: Evidence, level: int, feature: int) -> str:
    return "\n".join(f"Example {i + 1}: {text}"
                     for i, text in enumerate(ev.examples(level, feature)))


def build_messages(pair: Pair, ev: Evidence) -> Messages:
    """Appendix C's prompts for one pair, Neuron A/B in the pair's order."""
    parent = examples_block(ev, pair.parent_level, pair.parent)
    child = examples_block(ev, pair.child_level, pair.child)
    a, b = (parent, child) if pair.order == "parent_first" else (child, parent)
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(a=a, b=b)}]


_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_THINK_OPEN, _THINK_CLOSE = re.compile(r"<think>", re.I), re.compile(r"</think>", re.I)
_SEP = r"[\s*_:：\-]{0,8}"  # spacing, colons, markdown emphasis; not "[" (an echoed template)
_VERDICT = re.compile(r"have[\s_\-]*relationship" + _SEP, re.I)
_CONFIDENCE = re.compile(r"confidence" + _SEP, re.I)
_LABEL = re.compile(r"have[\s_\-]*relationship|confidence", re.I)
_EDGE = r"(?<![^\W_])(?<!-)({})(?![^\W_])(?!-)"  # a whole word: "yes-ish" is not "yes"


def _slot_value(body: str, label: re.Pattern, values: tuple[str, ...]) -> str | None:
    """The one value every ``label`` slot (the rest of its line, up to the next label) states,
    or None. A slot states a value when it starts with it as a whole word (not followed by "/"
    or "|") and names no other; a slot naming none is prose and skipped; a slot naming one
    ambiguously, or slots disagreeing, give None."""
    words = re.compile(_EDGE.format("|".join(values)), re.I)
    first = re.compile(_EDGE.format("|".join(values)) + r"(?!\s*[/|])", re.I)
    found = set()
    for m in label.finditer(body):
        slot = body[m.end():].split("\n", 1)[0]
        if (nxt := _LABEL.search(slot)) is not None:
            slot = slot[:nxt.start()]
        named = {w.lower() for w in words.findall(slot)}
        if not named:
            continue
        head = first.match(slot)
        if head is None or len(named) != 1:
            return None
        found.add(head.group(1).lower())
    return found.pop() if len(found) == 1 else None


def parse_answer(text: str | None) -> tuple[str, str | None]:
    """``(verdict, confidence)``: verdict ``yes`` / ``no`` when the answer states exactly one
    HaveRelationship value unambiguously (``Yes or No``, ``Yes|No``, ``yes-ish``, ``Maybe yes``
    are not), else ``unparseable``; confidence ``high`` / ``medium`` / ``low`` by the same rule,
    or None. Closed ``<think>...</think>`` blocks are ignored, as is everything before a lone
    ``</think>`` (a template that opened the block); a ``<think>`` left open means the answer
    was cut off: unparseable."""
    if text is None:
        return "unparseable", None
    body = _THINK.sub(" ", text)
    if _THINK_OPEN.search(body):
        return "unparseable", None
    body = _THINK_CLOSE.split(body)[-1]
    verdict = _slot_value(body, _VERDICT, ("yes", "no"))
    return verdict or "unparseable", _slot_value(body, _CONFIDENCE, CONFIDENCES)


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``k / n`` (NaN for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(records: list[dict]) -> dict:
    """Counts and the Yes rate over parsed answers with its 95% interval (None where undefined)."""
    yes = sum(r["verdict"] == "yes" for r in records)
    no = sum(r["verdict"] == "no" for r in records)
    lo, hi = wilson(yes, yes + no) if yes + no else (None, None)
    return {"n": len(records), "n_yes": yes, "n_no": no, "n_unparseable": len(records) - yes - no,
            "yes_rate": yes / (yes + no) if yes + no else None, "yes_rate_lo": lo,
            "yes_rate_hi": hi,
            "unparseable_rate": (len(records) - yes - no) / len(records) if records else None}


def summarize(records: list[dict]) -> dict:
    """Per source: Yes rate over parsed answers with its 95% interval, by confidence and order."""
    out = {}
    for source in SOURCES:
        rs = [r for r in records if r["source"] == source]
        out[source] = rate(rs) | {
            "by_confidence": {c: rate([r for r in rs if r["confidence"] == c])
                              for c in (*CONFIDENCES, None)},
            "by_order": {o: rate([r for r in rs if r["order"] == o])
                         for o in ("parent_first", "child_first")}}
        out[source]["by_confidence"]["none"] = out[source]["by_confidence"].pop(None)
    return out


def sample_pairs(forests: dict[str, Forest], evidence: dict[str, Evidence],
                 cfg: JudgeConfig) -> tuple[list[Pair], dict]:
    """The judged pairs of all three sources and the sampling counts (see the module docstring)."""
    rng = np.random.default_rng(cfg.seed)
    pairs, info = [], {}
    hsae_links: list[tuple[int, int, int]] = []
    for source in ("hsae", "posthoc"):
        links, skipped = sample_linked(forests[source], evidence[source], cfg.n_pairs, rng)
        info[f"{source}_links_without_contexts"] = skipped
        pairs += with_orders(source, links, rng)
        if source == "hsae":
            hsae_links = links
    n_random = cfg.n_pairs if cfg.n_random is None else cfg.n_random
    rand = sample_random(forests["hsae"], evidence["random"], [l for l, _, _ in hsae_links], rng,
                         n_random)
    pairs += with_orders("random", rand, rng)
    return pairs, info


def judge_pairs(pairs: list[Pair], evidence: dict[str, Evidence], backend: Backend,
                cache: ResponseCache, max_answer_chars: int = 4000,
                stats: dict | None = None) -> list[dict]:
    """Ask ``backend`` about every pair (cached answers are not asked again); one record each.
    An answer over ``max_answer_chars`` keeps that many characters, ``raw_truncated`` says so,
    and it is unparseable. A record holds nothing that depends on the run rather than on the
    answer (whether it came from the cache goes to ``stats["cached"]``, a count), so the same
    answers give the same bytes."""
    messages = [build_messages(p, evidence[p.source]) for p in pairs]
    answers: list[Completion] = complete_cached(backend, messages, cache,
                                                max_chars=max_answer_chars)
    if stats is not None:
        stats["cached"] = sum(a.cached for a in answers)
    records = []
    for pair, ans in zip(pairs, answers):
        verdict, confidence = (("unparseable", None) if ans.truncated
                               else parse_answer(ans.text))
        records.append(pair._asdict() | {"raw": ans.text, "raw_truncated": ans.truncated,
                                         "verdict": verdict, "confidence": confidence,
                                         "error": ans.error, "backend": backend.name,
                                         "model": backend.model})
    return records


def judge_failure(records: list[dict], max_failed_share: float) -> str | None:
    """Why a run's records must not be recorded as a result (one line), or None: no pair at
    all, no pair answered, or more than ``max_failed_share`` of them failed for good."""
    if not records:
        return ("no pair to judge: no link of the forest has contexts on both ends (see the "
                "sampling counts), so there is no Yes rate to record")
    failed = [r["error"] for r in records if r["error"] is not None]
    if not failed or (len(failed) < len(records)
                      and len(failed) <= max_failed_share * len(records)):
        return None
    kinds: dict[str, int] = {}
    for err in failed:
        kind = re.sub(r"(?<!HTTP )\b[0-9][0-9.]*", "N", err)[:80]  # "after N s", "HTTP 503"
        kinds[kind] = kinds.get(kind, 0) + 1
    common = ", ".join(f"{k} ({n})" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:3])
    none = "; none was answered" if len(failed) == len(records) else ""
    return (f"{len(failed)} of {len(records)} pairs failed (more than judge.max_failed_share = "
            f"{max_failed_share:g} allows{none}): {common}. Nothing is recorded; answered pairs "
            "are cached, so a rerun asks only for the failed ones")


__all__ = ["BACKENDS", "JudgeConfig", "Pair", "SOURCES", "SYSTEM_PROMPT", "USER_TEMPLATE",
           "build_messages", "judge_failure", "judge_pairs", "parse_answer", "sample_linked",
           "sample_pairs", "sample_random", "summarize", "wilson", "with_orders"]
