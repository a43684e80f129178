"""Judge backends for the autointerp stage (Appendix C) behind one small interface, and the
on-disk response cache.

``Backend.complete(requests) -> list[Completion]``: one chat (a list of ``{"role", "content"}``
messages) in, one completion (text or an error) out, in order. Two backends:

- :class:`OpenAIChatBackend`: any OpenAI-compatible ``POST {base_url}/chat/completions``
  (vLLM, Ollama, llama.cpp server, hosted APIs) through httpx, ``concurrency`` requests in
  flight, retries on timeouts, connection errors, 429 and 5xx with exponential backoff and
  full jitter, waiting at least what ``Retry-After`` asks. Bounded in time: ``timeout_s``
  limits an attempt's wall time (body read included, so a trickling server cannot stretch it),
  a Retry-After over ``max_wait_s`` fails the request at once, and no retry starts that would
  end past ``max_request_s`` after the request began; each such failure says why. Other 4xx
  fail the request at once; 401/403 stop the run (a wrong key would fail every request). The
  API key is read from the environment variable the config names and goes only into the
  Authorization header; what a server sends back is scrubbed of it (and of any ``Bearer``
  token, in error texts) before it is logged, cached or stored.
- :class:`LocalChatBackend`: a transformers causal LM with its chat template, greedy decoding,
  left-padded batches (default the embedded SmolLM2-135M-Instruct, METHOD §6: a stand-in
  judge that runs offline, not a judge to draw conclusions from). ``answer_prefix`` starts the
  assistant's turn with fixed text (e.g. ``HaveRelationship:``) so a small model answers in the
  format; the recorded answer includes it.

:class:`ResponseCache` keeps every successful completion in ``<dir>/responses.jsonl`` keyed by
``sha256(backend, model, generation settings, messages)``; failed requests are not cached, so a
re-run retries them and pays nothing for the rest. :func:`complete_cached` keeps at most
``max_chars`` characters of an answer (the rest is dropped, the answer marked ``truncated``),
in the cache as in what it returns; a cut cached answer is asked again under a larger cap.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

Messages = list[dict[str, str]]


class JudgeBackendError(RuntimeError):
    """The backend cannot serve any request (bad key, unreachable model): the run stops."""


class Completion(NamedTuple):
    text: str | None  # the answer, or None when the request failed for good
    error: str | None = None  # why it failed (never contains the API key)
    cached: bool = False
    truncated: bool = False  # text is the answer's first max_chars characters only


REDACTED = "[REDACTED]"
_BEARER = re.compile(r"(\bbearer\s+)(?!\[REDACTED\])[^\s\"'`,;)\]}]+", re.I)


def redact(text: str, secret: str | None, bearer: bool = True) -> str:
    """``text`` with ``secret`` and (``bearer``) any ``Bearer <token>`` replaced by
    ``[REDACTED]``."""
    if secret:
        text = text.replace(secret, REDACTED)
    return _BEARER.sub(r"\1" + REDACTED, text) if bearer else text


class Backend(Protocol):
    name: str
    model: str

    def settings(self) -> dict:
        """Generation settings that change answers (part of the cache key)."""

    def complete(self, requests: list[Messages], on_done=None) -> list[Completion]:
        """Answer every request, in order; a request that fails for good gets ``text=None``.
        ``on_done(i, completion)`` is called as each one finishes (the cache writes there)."""


def cache_key(backend: str, model: str, settings: dict, messages: Messages) -> str:
    blob = json.dumps({"backend": backend, "model": model, "settings": settings,
                       "messages": messages},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """Append-only JSONL of ``{"key", "model", "text"}`` (plus ``"truncated": true`` for a cut
    answer); later lines win; safe to interrupt."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / "responses.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, tuple[str, bool]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.entries[row["key"]] = (row["text"], bool(row.get("truncated")))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a line cut by an interrupted run
        self._file = None

    def get(self, key: str) -> tuple[str, bool] | None:
        """``(text, truncated)`` or None."""
        return self.entries.get(key)

    def put(self, key: str, model: str, text: str, truncated: bool = False) -> None:
        self.entries[key] = (text, truncated)
        if self._file is None:
            self._file = self.path.open("a")
        row = {"key": key, "model": model, "text": text} | ({"truncated": True} if truncated
                                                             else {})
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def complete_cached(backend: Backend, requests: list[Messages], cache: ResponseCache,
                    log=print, max_chars: int = 4000) -> list[Completion]:
    """Serve what the cache holds, send the rest to ``backend``, cache each success (as it
    arrives, so an interrupted run keeps what it paid for); progress every 5%. An answer over
    ``max_chars`` characters is cut to them and marked ``truncated``; a cached cut answer
    shorter than ``max_chars`` is asked again."""
    keys = [cache_key(backend.name, backend.model, backend.settings(), m) for m in requests]
    out: list[Completion | None] = [None] * len(requests)
    todo = []
    for i, key in enumerate(keys):
        hit = cache.get(key)
        if hit is not None and not (hit[1] and len(hit[0]) < max_chars):
            text, cut = hit
            out[i] = Completion(text[:max_chars], cached=True,
                                truncated=cut or len(text) > max_chars)
        else:
            todo.append(i)
    if todo:
        finished = [0]
        step = max(1, len(todo) // 20)

        def store(i: int, done: Completion) -> None:
            if done.text is not None:
                if len(done.text) > max_chars:
                    done = done._replace(text=done.text[:max_chars], truncated=True)
                cache.put(keys[i], backend.model, done.text, done.truncated)
            out[i] = done
            finished[0] += 1
            if finished[0] % step == 0 or finished[0] == len(todo):
                log(f"judge: {finished[0]}/{len(todo)} answered "
                    f"({len(requests) - len(todo)} from the cache)")
        backend.complete([requests[i] for i in todo], on_done=lambda j, done: store(todo[j], done))
    return [c for c in out]  # type: ignore[misc]


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter: attempt k waits U(0, min(max_s, base_s 2^k)),
    and never less than a server's Retry-After. One wait is at most ``max_wait_s`` (a longer
    Retry-After fails the request instead) and one request, attempts and waits together, at
    most ``max_request_s``."""

    max_retries: int = 6
    base_s: float = 1.0
    max_s: float = 60.0
    max_wait_s: float = 120.0
    max_request_s: float = 600.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        wait = self.rng.uniform(0, min(self.max_s, self.max_wait_s, self.base_s * 2 ** attempt))
        return max(wait, retry_after or 0.0)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds (fractions tolerated) or an HTTP date;
    None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
        return None if math.isnan(seconds) else max(0.0, seconds)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


RETRY_STATUS = {408, 409, 425, 429}


class OpenAIChatBackend:
    """OpenAI-compatible chat completions over httpx (see the module docstring)."""

    name = "openai"

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None, concurrency: int = 8,
                 timeout_s: float = 60.0, retry: RetryPolicy | None = None, max_tokens: int = 32,
                 temperature: float = 0.0, log=print):
        self.base_url, self.model = base_url.rstrip("/"), model
        self._key: str | None = None
        if api_key_env:
            self._key = os.environ.get(api_key_env)
            if not self._key:
                raise JudgeBackendError(
                    f"judge.api_key_env names {api_key_env!r}, which is not set in the "
                    f"environment: export it, or set judge.api_key_env to null for a "
                    f"server without authentication")
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.retry = retry or RetryPolicy()
        self.max_tokens, self.temperature = max_tokens, temperature
        self.log = log
        self.requests_sent = 0
        self.retries = 0

    def settings(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature}

    def complete(self, requests: list[Messages], on_done=None) -> list[Completion]:
        return asyncio.run(self._complete_all(requests, on_done))

    async def _complete_all(self, requests: list[Messages], on_done) -> list[Completion]:
        import httpx

        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        limits = httpx.Limits(max_connections=self.concurrency,
                              max_keepalive_connections=self.concurrency)
        sem = asyncio.Semaphore(self.concurrency)
        out: list[Completion | None] = [None] * len(requests)
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, limits=limits,
                                     timeout=httpx.Timeout(self.timeout_s)) as client:
            async def one(i: int) -> None:
                async with sem:
                    done = await self._one(client, requests[i])
                out[i] = done._replace(
                    text=done.text if done.text is None else redact(done.text, self._key,
                                                                    bearer=False),
                    error=done.error if done.error is None else redact(done.error, self._key))
                if on_done is not None:
                    on_done(i, out[i])

            tasks = [asyncio.create_task(one(i)) for i in range(len(requests))]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                # let the cancelled requests unwind while the client is still open
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return out  # type: ignore[return-value]

    async def _one(self, client, messages: Messages) -> Completion:
        import httpx

        body = {"model": self.model, "messages": messages, **self.settings()}
        policy = self.retry
        deadline = time.monotonic() + policy.max_request_s
        why = ""
        for attempt in range(policy.max_retries + 1):
            retry_after = None
            budget = min(self.timeout_s, deadline - time.monotonic())
            if budget <= 0:  # a wait overshot the deadline
                return Completion(None, f"gave up after {attempt} attempts: {why}; "
                                        f"judge.max_request_s = {policy.max_request_s:g} s "
                                        "reached")
            self.requests_sent += 1
            try:  # the whole exchange, body read included, within the budget
                resp = await asyncio.wait_for(client.post("/chat/completions", json=body),
                                              budget)
            except (TimeoutError, asyncio.TimeoutError, httpx.TimeoutException):
                why = f"timeout (no complete answer within {budget:.1f} s)"
            except httpx.TransportError as err:
                why = f"connection error ({type(err).__name__})"
            else:
                if resp.status_code == 200:
                    try:
                        text = resp.json()["choices"][0]["message"]["content"]
                        if not isinstance(text, str):
                            raise TypeError("content is not a string")
                        return Completion(text)
                    except (ValueError, KeyError, IndexError, TypeError) as err:
                        why = f"malformed response body ({type(err).__name__})"
                elif resp.status_code in (401, 403):
                    raise JudgeBackendError(
                        f"{self.base_url} refused the request with HTTP {resp.status_code}: "
                        "check the key's environment variable (judge.api_key_env) and the model")
                elif resp.status_code in RETRY_STATUS or resp.status_code >= 500:
                    why = f"HTTP {resp.status_code}"
                    retry_after = parse_retry_after(resp.headers.get("retry-after"))
                else:  # scrubbed before the cut, so no fragment of the key survives it
                    return Completion(None, f"HTTP {resp.status_code}: "
                                            f"{redact(resp.text, self._key)[:200]}")
            if attempt == policy.max_retries:
                break
            if retry_after is not None and retry_after > policy.max_wait_s:
                return Completion(None, f"{why}: the server asked to retry after "
                                        f"{retry_after:.0f} s (Retry-After), more than "
                                        f"judge.max_wait_s = {policy.max_wait_s:g} s: not retried")
            wait = self.retry.delay(attempt, retry_after)
            if time.monotonic() + wait >= deadline:
                return Completion(None, f"gave up after {attempt + 1} attempts: {why}; a retry "
                                        f"in {wait:.1f} s would end past judge.max_request_s = "
                                        f"{policy.max_request_s:g} s")
            self.retries += 1
            self.log(redact(f"judge: {why}, retry {attempt + 1}/{policy.max_retries} in "
                            f"{wait:.1f} s", self._key))
            await asyncio.sleep(wait)
        return Completion(None, f"gave up after {policy.max_retries + 1} attempts: {why}")


class LocalChatBackend:
    """A local transformers chat model, greedy, batched (see the module docstring).

    ``model`` is anything :func:`hsae_core.data.lm.resolve_model` accepts (``embedded:smollm2``, a
    folder, a .gguf file, a hub name). A tokenizer without a chat template gets a plain
    ``System:/User:/Assistant:`` layout.
    """

    name = "local"

    def __init__(self, model: str, *, max_new_tokens: int = 24, batch_size: int = 1,
                 answer_prefix: str | None = None, device: str = "cpu"):
        from hsae_core.data.lm import resolve_model

        self.source = resolve_model(model)  # a missing file fails here, before any work
        self.model, self.max_new_tokens, self.batch_size = model, max_new_tokens, batch_size
        self.answer_prefix = answer_prefix or ""
        self.device = device
        self.generated = 0
        # loaded on the first request: a fully cached run loads nothing
        self.tokenizer = self.lm = None

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from hsae_core.data.lm import _kwargs

        src = self.source
        self.tokenizer = AutoTokenizer.from_pretrained(src.name_or_path, **_kwargs(src))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.lm = AutoModelForCausalLM.from_pretrained(src.name_or_path, dtype=torch.float32,
                                                       **_kwargs(src)).to(self.device).eval()

    def settings(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "decoding": "greedy",
                "answer_prefix": self.answer_prefix}

    def prompt(self, messages: Messages) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        else:
            text = ("\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
                    + "\n\nAssistant: ")
        return text + self.answer_prefix

    def complete(self, requests: list[Messages], on_done=None) -> list[Completion]:
        import torch

        if self.lm is None:
            self._load()
        out: list[Completion] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start: start + self.batch_size]
            enc = self.tokenizer([self.prompt(m) for m in chunk], return_tensors="pt",
                                 padding=True, add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                gen = self.lm.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                       pad_token_id=self.tokenizer.pad_token_id)
            texts = self.tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                                skip_special_tokens=True)
            for j, text in enumerate(texts):
                done = Completion(self.answer_prefix + text)
                out.append(done)
                self.generated += 1
                if on_done is not None:
                    on_done(start + j, done)
        return out


__all__ = ["Backend", "Completion", "JudgeBackendError", "LocalChatBackend", "Messages",
           "OpenAIChatBackend", "REDACTED", "ResponseCache", "RetryPolicy", "cache_key",
           "complete_cached", "parse_retry_after", "redact"]
