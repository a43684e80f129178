"""Judge backends for the autointerp stage (Appendix C) behind one small interface, and the
on-disk response cache.

``Backend.complete(requests) -> list[Completion]``: one chat (a list of ``{"role", "content"}``
messages) in, one completion (text or an error) out, in order. Two backends:

- :class:`OpenAIChatBackend`: any OpenAI-compatible ``POST {base_url}/chat/completions``
  (vLLM, Ollama, llama.cpp server, hosted APIs) through httpx, ``concurrency`` requests in
  flight, retries on timeouts, connection errors, 429 and 5xx with exponential backoff and
  full jitter, waiting at least what ``Retry-After`` asks. Other 4xx fail the request at once;
  401/403 stop the run (a wrong key would fail every request). The API key is read from the
  environment variable the config names; it goes only into the Authorization header, never
  into messages, logs, errors, the cache or artifacts.
- :class:`LocalChatBackend`: a transformers causal LM with its chat template, greedy decoding,
  left-padded batches (default the embedded SmolLM2-135M-Instruct, METHOD §6: a stand-in
  judge that runs offline, not a judge to draw conclusions from). ``answer_prefix`` starts the
  assistant's turn with fixed text (e.g. ``HaveRelationship:``) so a small model answers in the
  format; the recorded answer includes it.

:class:`ResponseCache` keeps every successful completion in ``<dir>/responses.jsonl`` keyed by
``sha256(backend, model, generation settings, messages)``; failed requests are not cached, so a
re-run retries them and pays nothing for the rest.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import os
import random
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
    """Append-only JSONL of ``{"key", "model", "text"}``; later lines win; safe to interrupt."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / "responses.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, str] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.entries[row["key"]] = row["text"]
                except (ValueError, KeyError):
                    continue  # a line cut by an interrupted run
        self._file = None

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, model: str, text: str) -> None:
        self.entries[key] = text
        if self._file is None:
            self._file = self.path.open("a")
        self._file.write(json.dumps({"key": key, "model": model, "text": text},
                                    ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def complete_cached(backend: Backend, requests: list[Messages], cache: ResponseCache,
                    log=print) -> list[Completion]:
    """Serve what the cache holds, send the rest to ``backend``, cache each success (as it
    arrives, so an interrupted run keeps what it paid for); progress every 5%."""
    keys = [cache_key(backend.name, backend.model, backend.settings(), m) for m in requests]
    out: list[Completion | None] = [None] * len(requests)
    todo = []
    for i, key in enumerate(keys):
        hit = cache.get(key)
        if hit is not None:
            out[i] = Completion(hit, cached=True)
        else:
            todo.append(i)
    if todo:
        finished = [0]
        step = max(1, len(todo) // 20)

        def store(i: int, done: Completion) -> None:
            if done.text is not None:
                cache.put(keys[i], backend.model, done.text)
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
    and never less than a server's Retry-After."""

    max_retries: int = 6
    base_s: float = 1.0
    max_s: float = 60.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        wait = self.rng.uniform(0, min(self.max_s, self.base_s * 2 ** attempt))
        return max(wait, retry_after or 0.0)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds (fractions tolerated) or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
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
                    out[i] = await self._one(client, requests[i])
                if on_done is not None:
                    on_done(i, out[i])

            tasks = [asyncio.create_task(one(i)) for i in range(len(requests))]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                raise
        return out  # type: ignore[return-value]

    async def _one(self, client, messages: Messages) -> Completion:
        import httpx

        body = {"model": self.model, "messages": messages, **self.settings()}
        why = ""
        for attempt in range(self.retry.max_retries + 1):
            retry_after = None
            self.requests_sent += 1
            try:
                resp = await client.post("/chat/completions", json=body)
            except httpx.TimeoutException:
                why = "timeout"
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
                else:
                    return Completion(None, f"HTTP {resp.status_code}: {resp.text[:200]}")
            if attempt == self.retry.max_retries:
                break
            self.retries += 1
            wait = self.retry.delay(attempt, retry_after)
            self.log(f"judge: {why}, retry {attempt + 1}/{self.retry.max_retries} in {wait:.1f} s")
            await asyncio.sleep(wait)
        return Completion(None, f"gave up after {self.retry.max_retries + 1} attempts: {why}")


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
           "OpenAIChatBackend", "ResponseCache", "RetryPolicy", "cache_key", "complete_cached",
           "parse_retry_after"]
