"""The judge stage (Appendix C): parsing, intervals and pair sampling; the OpenAI backend against a
real chat-completions server on 127.0.0.1 that injects 429 + Retry-After, 500s, timeouts and
malformed answers, and hostile modes (echoed keys, huge Retry-After, trickled bodies, huge
answers); the local backend with a tiny random model in process."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from hsae_core.evaluation.evidence import (
    EvidenceConfig,
    LevelEvidence,
    load_evidence,
    save_evidence,
)
from hsae_core.judge.backends import (
    LocalChatBackend,
    ResponseCache,
    RetryPolicy,
    parse_retry_after,
)
from hsae_core.judge.pairs import (
    SYSTEM_PROMPT,
    JudgeConfig,
    Pair,
    build_messages,
    judge_pairs,
    parse_answer,
    sample_pairs,
    summarize,
    wilson,
)
from hsae_core.model.forest import Forest
from hsae_core.pipeline.io import load_forest, save_forest
from stages import judge as judge_stage
from tests.store_helpers import WORDS, tiny_llama

KEY = "sk-test-SECRET-4f1b2c"
SIZES = (6, 12, 24)


# ---------------------------------------------------------------------------- parsing, statistics
@pytest.mark.parametrize("text,want", [
    ("HaveRelationship: Yes\nConfidence: High", ("yes", "high")),
    ("haverelationship:no confidence:low", ("no", "low")),
    ("**HaveRelationship**: **YES**\n**Confidence**: Medium", ("yes", "medium")),
    ("Have Relationship : No\nConfidence - High", ("no", "high")),
    ("<think>HaveRelationship: No? maybe</think>\nHaveRelationship: Yes\nConfidence: Low",
     ("yes", "low")),
    ("HaveRelationship: Yes", ("yes", None)),
    ("Yes", ("unparseable", None)),  # no label: not guessed
    ("HaveRelationship: Yes\nHaveRelationship: No", ("unparseable", None)),  # contradictory
    ("HaveRelationship: Yesterday", ("unparseable", None)),
    ("HaveRelationship: [Yes/No]\nConfidence: [High/Medium/Low]",  # the template
     ("unparseable", None)),
    ("HaveRelationship: Yes/No\nConfidence: High/Low", ("unparseable", None)),
    ("Neuron A and B have a parent-child relationship.", ("unparseable", None)),
    (None, ("unparseable", None)),
])
def test_parse_answer(text, want):
    assert parse_answer(text) == want


@pytest.mark.parametrize("text,want", [
    ("<think>so HaveRelationship: Yes, but", ("unparseable", None)),  # cut off while thinking
    ("<think>a</think>\nHaveRelationship: Yes\nConfidence: High\n<think>more",
     ("unparseable", None)),  # a think block left open: cut off
    ("HaveRelationship: Yes or No\nConfidence: High", ("unparseable", "high")),
    ("HaveRelationship: Yes|No", ("unparseable", None)),
    ("HaveRelationship: yes-ish", ("unparseable", None)),
    ("HaveRelationship: Maybe yes", ("unparseable", None)),
    ("HaveRelationship: Yes, no doubt", ("unparseable", None)),  # both words: not guessed
    ("HaveRelationship: [Yes/No]\nHaveRelationship: Yes", ("unparseable", None)),
    ("HaveRelationship: Yes\nConfidence: High or Low", ("yes", None)),
    ("HaveRelationship: Yes, but only partly\nConfidence: Low", ("yes", "low")),
    ("HaveRelationship: _No_\nConfidence: *medium*", ("no", "medium")),
    ("HaveRelationship:\n  No\nConfidence: High", ("no", "high")),
    # a template that opened the think block in the prompt: only what follows </think> counts
    ("HaveRelationship: Yes? No...</think>\nHaveRelationship: No\nConfidence: Low",
     ("no", "low")),
])
def test_parse_answer_only_unambiguous_complete_verdicts(text, want):
    assert parse_answer(text) == want


def test_wilson_interval():
    lo, hi = wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-4 and abs(hi - 0.7634) < 1e-4
    lo, hi = wilson(0, 10)
    assert lo == 0 and abs(hi - 0.2775) < 1e-4
    assert all(np.isnan(wilson(0, 0)))


def test_retry_after_and_backoff():
    assert (parse_retry_after("3") == 3 and parse_retry_after("0.5") == 0.5
            and parse_retry_after(None) is None)
    assert 0 < parse_retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                               time.gmtime(time.time() + 30))) <= 31
    policy = RetryPolicy(max_retries=5, base_s=1.0, max_s=8.0)
    waits = [policy.delay(a, None) for a in range(5) for _ in range(200)]
    assert max(waits) <= 8.0 and min(waits) >= 0
    assert (np.mean([policy.delay(0, None) for _ in range(500)])
            < np.mean([policy.delay(3, None) for _ in range(500)]))
    assert policy.delay(0, 5.0) >= 5.0  # a server's Retry-After is a floor
    assert parse_retry_after("inf") == float("inf") and parse_retry_after("nan") is None


# ------------------------------------------------------------------------- a small world on disk
def tiny_world(root: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """Evidence folders and forests for an HSAE and a baseline with SIZES features per level."""
    rng = np.random.default_rng(seed)
    cfg = EvidenceConfig(n_top=2, n_sampled=1, buffer=2)
    vocab = [f" {w}" for w in WORDS]
    for name in ("hsae", "baseline"):
        levels = []
        for n in SIZES:
            shape = (n, cfg.n_top + cfg.n_sampled, cfg.window)
            rows = rng.integers(0, 10_000, size=shape[:2])
            rows[rng.random(n) < 0.15] = -1  # features that never fired
            has = (rows >= 0)[:, :, None]
            acts = np.where(has & (rng.random(shape) < 0.3),
                            rng.random(shape), 0).astype(np.float32)
            acts[:, :, cfg.buffer] = np.where(has[:, :, 0], 1.0, 0.0)
            levels.append(LevelEvidence(
                token_ids=np.where(has, rng.integers(0, len(vocab), size=shape),
                                   -1).astype(np.int32),
                acts=acts, rows=rows, doc_ids=np.where(rows >= 0, 0, -1),
                positions=np.where(rows >= 0, 3, -1).astype(np.int32),
                n_fired=(rows >= 0).sum(1), sum_act=np.ones(n),
                max_act=np.ones(n, dtype=np.float32)))
        save_evidence(levels, root / "evidence" / name, vocab=vocab, meta={"source": name},
                      cfg=cfg)
    for name in ("hsae", "posthoc"):
        parent_of = [torch.tensor(np.where(rng.random(m) < 0.8, rng.integers(0, n, size=m), -1))
                     for n, m in zip(SIZES[:-1], SIZES[1:])]
        (root / name).mkdir(parents=True, exist_ok=True)
        save_forest(Forest(SIZES, parent_of), root / name / "forest.json")
    return root / "hsae", root / "posthoc", root / "evidence"


def test_sampling_linked_random_and_counterbalanced(tmp_path):
    hsae, posthoc, evidence = tiny_world(tmp_path)
    forests = {"hsae": load_forest(hsae / "forest.json"),
               "posthoc": load_forest(posthoc / "forest.json")}
    ev = {"hsae": load_evidence(evidence / "hsae"),
          "posthoc": load_evidence(evidence / "baseline")}
    ev["random"] = ev["hsae"]
    pairs, info = sample_pairs(forests, ev, JudgeConfig(n_pairs=12, n_random=9, seed=3))
    by = defaultdict(list)
    for p in pairs:
        by[p.source].append(p)
    assert [len(by[s]) for s in ("hsae", "posthoc", "random")] == [12, 12, 9]
    for source, ps in by.items():
        assert sum(p.order == "child_first" for p in ps) == len(ps) // 2
        assert len(set(p[1:5] for p in ps)) == len(ps)  # no pair twice
        for p in ps:
            assert p.child_level == p.parent_level + 1
            assert ev[source].levels[p.parent_level].rows[p.parent, 0] >= 0
            assert ev[source].levels[p.child_level].rows[p.child, 0] >= 0
            linked = int(forests["hsae" if source == "random" else source]
                         .parent_of[p.parent_level][p.child]) == p.parent
            assert linked == (source != "random")
    assert {p.parent_level for p in by["random"]} <= {p.parent_level for p in by["hsae"]}
    assert info["hsae_links_without_contexts"] > 0
    m = build_messages(by["hsae"][0], ev["hsae"])
    assert m[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert m[1]["content"].startswith(
        "Here are the activating documents for Neuron A:\nExample 1: ")
    assert "<<" in m[1]["content"] and m[1]["content"].endswith(
        "have a parent-child relationship.")


# --------------------------------------------------------------------- a real HTTP judge server
def scenario(content: str) -> tuple[int, str, str]:
    """(fault kind, verdict, confidence) the server assigns to a prompt, from its hash."""
    h = int(hashlib.sha256(content.encode()).hexdigest()[:12], 16)
    return h % 6, ("Yes", "No")[(h // 6) % 2], ("High", "Medium", "Low")[(h // 12) % 3]


def answer_text(verdict: str, confidence: str, style: int) -> str:
    return ["HaveRelationship: {v}\nConfidence: {c}", "**haverelationship**:{v}  confidence: {c}",
            "Have Relationship : {v}\nConfidence: {c}"][style % 3].format(
                v=verdict.upper() if style % 2 else verdict, c=confidence.lower())


class JudgeServer:
    """Chat completions on 127.0.0.1. Faults by prompt hash: 0 answers at once; 1 answers 429 with
    Retry-After: 1 first; 2 answers 500 twice first; 3 stalls past the client's timeout first;
    4 answers prose that is not in the format; 5 sends a body that is not JSON first.
    ``always_fail`` turns every request into a 503. ``mode`` (hostile servers): "echo_key" echoes
    the Authorization header in 400 error bodies (even kinds) and in answers (odd kinds);
    "retry_after" answers every request 429 with ``Retry-After: retry_after``; "trickle" sends a
    valid answer one byte every ``trickle_s``; "huge" appends ``huge_chars`` characters to the
    answers of even kinds."""

    def __init__(self, expect_key: str | None):
        self.requests: dict[str, list[float]] = defaultdict(list)
        self.auth: set[str | None] = set()
        self.always_fail = False
        self.expect_key = expect_key
        self.mode: str | None = None
        self.retry_after = "1"
        self.trickle_s = 0.25
        self.huge_chars = 1_000_000
        self.closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/chat/completions" and body["model"] == "judge-model"
                auth = self.headers.get("Authorization")
                server.auth.add(auth)
                if server.expect_key and auth != f"Bearer {server.expect_key}":
                    return self.reply(401, {"error": "bad key"})
                content = body["messages"][1]["content"]
                times = server.requests[content]
                times.append(time.monotonic())
                kind, verdict, conf = scenario(content)
                attempt = len(times)
                if server.always_fail:
                    return self.reply(503, {"error": "down"})
                if server.mode is not None:
                    return self.hostile(server.mode, kind, verdict, conf, auth)
                if kind == 1 and attempt == 1:
                    return self.reply(429, {"error": "slow down"}, {"Retry-After": "1"})
                if kind == 2 and attempt <= 2:
                    return self.reply(500, {"error": "boom"})
                if kind == 3 and attempt == 1:
                    time.sleep(4.0)  # past the client timeout (2 s)
                if kind == 5 and attempt == 1:
                    return self.reply(200, None, raw=b'{"choices": [')
                text = ("I think these neurons are related." if kind == 4
                        else answer_text(verdict, conf, attempt + kind))
                self.reply(200, {"choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}}]})

            def hostile(self, mode, kind, verdict, conf, auth):
                text = answer_text(verdict, conf, 0)
                if mode == "echo_key" and kind % 2 == 0:
                    if kind == 0:  # the key where a 200-character cut would split it
                        return self.reply(400, {"error": "x" * 172 + auth})
                    return self.reply(400, {"error": {"message": "invalid request", "request": {
                        "headers": {"Authorization": auth, "X-Api-Key": auth.split()[-1]}}}})
                if mode == "echo_key":
                    text += f"\n(you sent Authorization: {auth})"
                if mode == "retry_after":
                    return self.reply(429, {"error": "slow down"},
                                      {"Retry-After": server.retry_after})
                if mode == "huge" and kind % 2 == 0:
                    text += "\n" + "x" * server.huge_chars
                data = json.dumps({"choices": [{"index": 0, "message": {
                    "role": "assistant", "content": text}}]}).encode()
                if mode != "trickle":
                    return self.reply(200, None, raw=data)
                try:  # headers at once, then the body one byte at a time
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    for i in range(len(data)):
                        if server.closing.wait(server.trickle_s):
                            return
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def reply(self, status, payload, headers=None, raw=None):
                data = raw if raw is not None else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def n_requests(self) -> int:
        return sum(len(t) for t in self.requests.values())


def run_stage(root: Path, judge: dict, hsae: Path, posthoc: Path, evidence: Path):
    (root / "params.yaml").write_text(yaml.safe_dump({"judge": judge}))
    return CliRunner().invoke(judge_stage.app, [
        "--params", str(root / "params.yaml"), "--hsae", str(hsae), "--posthoc", str(posthoc),
        "--evidence", str(evidence), "--out", str(root / "judge"),
        "--metrics", str(root / "judge.json")])


def run_stage_within(seconds: float, *args):
    """``run_stage`` in a thread; fails if it has not finished after ``seconds``."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=run_stage(*args)), daemon=True)
    t0 = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the stage was still running after {seconds} s"
    return box["result"], time.monotonic() - t0


def read_records(root: Path, name: str = "pairs.jsonl") -> list[dict]:
    return [json.loads(line) for line in (root / "judge" / name).read_text().splitlines()]


def server_params(url: str, **kw) -> dict:
    return {"n_pairs": 14, "n_random": 14, "backend": "openai", "model": "judge-model",
            "base_url": url, "api_key_env": "HSAE_TEST_JUDGE_KEY", "concurrency": 4,
            "max_retries": 4, "timeout_s": 2.0, "backoff_base_s": 0.01, "backoff_max_s": 0.05} | kw


def test_openai_backend_faults_cache_and_key(tmp_path, monkeypatch):
    hsae, posthoc, evidence = tiny_world(tmp_path)
    monkeypatch.setenv("HSAE_TEST_JUDGE_KEY", KEY)
    with JudgeServer(expect_key=KEY) as server:
        result = run_stage(tmp_path, server_params(server.url), hsae, posthoc, evidence)
        assert result.exit_code == 0, result.output
        records = [json.loads(line)
                   for line in (tmp_path / "judge" / "pairs.jsonl").read_text().splitlines()]
        assert (len(records) == 42
                and {r["source"] for r in records} == {"hsae", "posthoc", "random"})
        ev = {"hsae": load_evidence(evidence / "hsae"),
              "posthoc": load_evidence(evidence / "baseline")}
        ev["random"] = ev["hsae"]
        kinds = set()
        for r in records:
            assert set(r) >= {"source", "parent_level", "parent", "child_level", "child", "order",
                              "raw", "verdict", "confidence"}
            pair = Pair(*(r[k] for k in Pair._fields))
            content = build_messages(pair, ev[r["source"]])[1]["content"]
            kind, verdict, conf = scenario(content)
            kinds.add(kind)
            assert r["error"] is None and "cached" not in r  # nothing run-dependent
            if kind == 4:  # malformed answer: recorded, never guessed
                assert r["verdict"] == "unparseable" and r["confidence"] is None and r["raw"]
            else:  # each answer reached its own pair, whatever the completion order
                assert (r["verdict"], r["confidence"]) == (verdict.lower(), conf.lower())
            times = server.requests[content]
            # retries: exactly the faults
            assert len(times) == {2: 3, 1: 2, 3: 2, 5: 2}.get(kind, 1)
            if kind == 1:
                assert times[1] - times[0] >= 0.95  # Retry-After: 1 was honoured
        assert kinds == set(range(6))
        assert server.auth == {f"Bearer {KEY}"}
        metrics = json.loads((tmp_path / "judge.json").read_text())
        assert (metrics["hsae"]["n"] == 14
                and 0 <= metrics["hsae"]["yes_rate_lo"] <= metrics["hsae"]["yes_rate"])
        assert set(metrics["random"]["by_confidence"]) == {"high", "medium", "low", "none"}
        n_first = server.n_requests
        first = (tmp_path / "judge" / "pairs.jsonl").read_bytes()

        # a second run asks nothing: every answer, the malformed ones included, is cached, and
        # the records are the same bytes (issue 25: `"cached": true` used to change them, so DVC
        # re-ran the report after a way back)
        result2 = run_stage(tmp_path, server_params(server.url), hsae, posthoc, evidence)
        assert result2.exit_code == 0, result2.output
        assert server.n_requests == n_first and "0 asked, 42 from cache" in result2.output
        assert (tmp_path / "judge" / "pairs.jsonl").read_bytes() == first
    # the key reaches the Authorization header only: no artifact, cache line or log holds it
    for path in [*tmp_path.rglob("*.json*"), tmp_path / "judge" / "cache" / "responses.jsonl"]:
        assert KEY not in path.read_text(), path
    assert KEY not in result.output + result2.output


def test_openai_backend_gives_up_after_bounded_retries(tmp_path, monkeypatch):
    """Every pair fails for good: the stage exits 2 with the reason in one line and records
    nothing (issue 25: it exited 0, so DVC recorded a run that judged nothing)."""
    hsae, posthoc, evidence = tiny_world(tmp_path)
    monkeypatch.setenv("HSAE_TEST_JUDGE_KEY", KEY)
    with JudgeServer(expect_key=None) as server:
        server.always_fail = True
        result = run_stage(tmp_path,
                           server_params(server.url, n_pairs=3, n_random=2, max_retries=2),
                           hsae, posthoc, evidence)
        assert result.exit_code == 2, result.output
        reason = [line for line in result.output.splitlines() if "failed (more than" in line]
        assert len(reason) == 1 and "8 of 8 pairs failed" in reason[0], result.output
        assert "none was answered" in reason[0] and "HTTP 503 (8)" in reason[0]
        assert not (tmp_path / "judge" / "pairs.jsonl").exists()
        assert not (tmp_path / "judge.json").exists()
        records = read_records(tmp_path, "pairs.failed.jsonl")
        assert len(records) == 8 and all(r["verdict"] == "unparseable" and r["raw"] is None
                                         for r in records)
        assert all("HTTP 503" in r["error"] for r in records)
        assert all(len(t) == 3 for t in server.requests.values()) and len(server.requests) == 8
        # failures are not cached: the next run asks again, and is recorded
        server.always_fail = False
        result = run_stage(tmp_path,
                           server_params(server.url, n_pairs=3, n_random=2, max_retries=2),
                           hsae, posthoc, evidence)
        assert result.exit_code == 0 and server.n_requests > 24
        assert len(read_records(tmp_path)) == 8 and (tmp_path / "judge.json").is_file()
        assert not (tmp_path / "judge" / "pairs.failed.jsonl").exists()


def test_judge_failure_share():
    from hsae_core.judge.pairs import judge_failure

    ok = {"error": None}
    bad = {"error": "gave up after 3 attempts: HTTP 503"}
    assert judge_failure([ok] * 19 + [bad], 0.1) is None
    assert judge_failure([ok] * 18 + [bad] * 2, 0.1) is None
    assert "3 of 20 pairs failed" in judge_failure([ok] * 17 + [bad] * 3, 0.1)
    assert "none was answered" in judge_failure([bad] * 4, 1.0)  # nothing judged: never done
    assert "no pair to judge" in judge_failure([], 1.0)
    assert judge_failure([ok] * 3, 0.0) is None


def test_openai_backend_stops_on_bad_or_missing_key(tmp_path, monkeypatch):
    hsae, posthoc, evidence = tiny_world(tmp_path)
    monkeypatch.delenv("HSAE_TEST_JUDGE_KEY", raising=False)
    with JudgeServer(expect_key=KEY) as server:
        result = run_stage(tmp_path, server_params(server.url), hsae, posthoc, evidence)
        assert (result.exit_code == 2 and "HSAE_TEST_JUDGE_KEY" in result.output
                and server.n_requests == 0)
        monkeypatch.setenv("HSAE_TEST_JUDGE_KEY", "sk-wrong-key-77")
        result = run_stage(tmp_path, server_params(server.url), hsae, posthoc, evidence)
        assert (result.exit_code == 2 and "HTTP 401" in result.output
                and "sk-wrong-key-77" not in result.output)
    bad = run_stage(tmp_path, server_params("localhost:8000"), hsae, posthoc, evidence)
    assert bad.exit_code == 2 and "judge" in bad.output and "base_url" in bad.output


def test_openai_backend_scrubs_an_echoed_key(tmp_path, monkeypatch):
    hsae, posthoc, evidence = tiny_world(tmp_path)
    monkeypatch.setenv("HSAE_TEST_JUDGE_KEY", KEY)
    with JudgeServer(expect_key=KEY) as server:
        server.mode = "echo_key"  # about half the pairs fail: allowed here, to see them stored
        result = run_stage(tmp_path, server_params(server.url, max_failed_share=1.0), hsae,
                           posthoc, evidence)
        assert result.exit_code == 0, result.output
        records = read_records(tmp_path)
        kinds = {scenario(c)[0] for c in server.requests}
        assert {0, 1} <= kinds and any(k % 2 == 0 and k > 0 for k in kinds)
        failed = [r for r in records if r["error"] is not None]
        answered = [r for r in records if r["error"] is None]
        assert failed and answered
        assert all(r["error"].startswith("HTTP 400") and "[REDACTED]" in r["error"]
                   and r["raw"] is None for r in failed)
        assert all(r["verdict"] in ("yes", "no") and "Bearer [REDACTED]" in r["raw"]
                   for r in answered)
    # neither the key nor a fragment of it nor the Bearer token reaches any file or the log
    for path in tmp_path.rglob("*.json*"):
        text = path.read_text()
        assert KEY[:10] not in text and "Bearer sk" not in text, path
    assert KEY[:10] not in result.output


def test_openai_backend_caps_retry_after_and_request_time(tmp_path, monkeypatch):
    hsae, posthoc, evidence = tiny_world(tmp_path)
    monkeypatch.setenv("HSAE_TEST_JUDGE_KEY", KEY)
    small = {"n_pairs": 2, "n_random": 2}
    with JudgeServer(expect_key=KEY) as server:
        server.mode, server.retry_after = "retry_after", "100000"  # default max_wait_s: 120
        result, took = run_stage_within(30, tmp_path, server_params(server.url, **small),
                                        hsae, posthoc, evidence)
        assert result.exit_code == 2, result.output  # every pair failed: nothing recorded
        assert took < 20 and all(len(t) == 1 for t in server.requests.values())
        records = read_records(tmp_path, "pairs.failed.jsonl")
        assert records and all(r["verdict"] == "unparseable" and r["raw"] is None
                               and "Retry-After" in r["error"] and "100000" in r["error"]
                               and "max_wait_s" in r["error"] for r in records)
    with JudgeServer(expect_key=KEY) as server:  # every wait allowed, but not their total
        server.mode, server.retry_after = "retry_after", "1"
        params = server_params(server.url, max_retries=10, max_request_s=2.5, **small)
        result, took = run_stage_within(30, tmp_path, params, hsae, posthoc, evidence)
        assert result.exit_code == 2, result.output
        assert took < 20 and all(2 <= len(t) <= 3 for t in server.requests.values())
        assert all(t[-1] - t[0] < 2.5 for t in server.requests.values())
        records = read_records(tmp_path, "pairs.failed.jsonl")
        assert records and all(r["verdict"] == "unparseable" and "max_request_s" in r["error"]
                               for r in records)
    bad = run_stage(tmp_path, server_params("http://x/v1", max_wait_s=0.01), hsae, posthoc,
                    evidence)
    assert bad.exit_code == 2 and "max_wait_s" in bad.output


def test_openai_backend_timeout_bounds_a_trickled_answer(tmp_path, monkeypatch):
    hsae, posthoc, evidence = tiny_world(tmp_path)
    monkeypatch.setenv("HSAE_TEST_JUDGE_KEY", KEY)
    with JudgeServer(expect_key=KEY) as server:
        server.mode, server.trickle_s = "trickle", 0.25  # a valid answer takes > 25 s to arrive
        params = server_params(server.url, n_pairs=2, n_random=2, timeout_s=1.0, max_retries=1)
        result, took = run_stage_within(30, tmp_path, params, hsae, posthoc, evidence)
        assert result.exit_code == 2, result.output
        assert took < 20 and all(len(t) == 2 for t in server.requests.values())
        records = read_records(tmp_path, "pairs.failed.jsonl")
        assert records and all(r["verdict"] == "unparseable" and r["raw"] is None
                               and r["error"].startswith("gave up after 2 attempts: timeout")
                               for r in records)


def test_openai_backend_caps_a_huge_answer(tmp_path, monkeypatch):
    hsae, posthoc, evidence = tiny_world(tmp_path)
    monkeypatch.setenv("HSAE_TEST_JUDGE_KEY", KEY)
    small = {"n_pairs": 8, "n_random": 8}  # enough prompts for both kinds
    with JudgeServer(expect_key=KEY) as server:
        server.mode = "huge"
        result = run_stage(tmp_path, server_params(server.url, **small), hsae, posthoc, evidence)
        assert result.exit_code == 0, result.output
        records = read_records(tmp_path)
        huge = [r for r in records if r["raw_truncated"]]
        whole = [r for r in records if not r["raw_truncated"]]
        assert huge and whole and all(r["error"] is None for r in records), [
            (r["source"], r["parent"], r["child"], r["raw"][:40], r["error"]) for r in records]
        # cut: the first 4,000 characters kept, never parsed (its end is unknown)
        assert all(len(r["raw"]) == 4000 and r["raw"].startswith("HaveRelationship:")
                   and r["verdict"] == "unparseable" and r["confidence"] is None
                   for r in huge)
        assert all(r["verdict"] in ("yes", "no") and len(r["raw"]) < 100 for r in whole)
        assert "cut" in result.output
        for name in ("pairs.jsonl", "cache/responses.jsonl"):
            assert (tmp_path / "judge" / name).stat().st_size < 100_000, name
        n_first = server.n_requests
        first = (tmp_path / "judge" / "pairs.jsonl").read_bytes()
        # from the cache: the same records (the same bytes), still marked truncated
        result = run_stage(tmp_path, server_params(server.url, **small), hsae, posthoc, evidence)
        assert result.exit_code == 0 and server.n_requests == n_first
        assert (tmp_path / "judge" / "pairs.jsonl").read_bytes() == first
        # a larger cap asks again for the answers that were cut, and only for them
        result = run_stage(tmp_path, server_params(server.url, max_answer_chars=2_000_000,
                                                   **small), hsae, posthoc, evidence)
        assert result.exit_code == 0 and server.n_requests == n_first + len(huge)
        third = read_records(tmp_path)
        assert not any(r["raw_truncated"] for r in third)
        assert all(r["verdict"] in ("yes", "no") for r in third)


# ------------------------------------------------------------------------------- the local backend
def test_local_backend_tiny_model_and_cache(tmp_path):
    hsae, posthoc, evidence = tiny_world(tmp_path)
    model = tiny_llama(tmp_path / "model", d_model=32, n_layers=2)
    forests = {"hsae": load_forest(hsae / "forest.json"),
               "posthoc": load_forest(posthoc / "forest.json")}
    ev = {"hsae": load_evidence(evidence / "hsae"),
          "posthoc": load_evidence(evidence / "baseline")}
    ev["random"] = ev["hsae"]
    pairs, _ = sample_pairs(forests, ev, JudgeConfig(n_pairs=3, n_random=2))
    backend = LocalChatBackend(model, max_new_tokens=5, batch_size=2,
                               answer_prefix="HaveRelationship:")
    cache = ResponseCache(tmp_path / "cache")
    records = judge_pairs(pairs, ev, backend, cache)
    cache.close()
    assert len(records) == 8 and backend.generated == 8
    for r in records:
        assert (r["raw"].startswith("HaveRelationship:")
                and len(r["raw"]) > len("HaveRelationship:"))
        assert r["verdict"] in ("yes", "no", "unparseable") and r["backend"] == "local"
    cache = ResponseCache(tmp_path / "cache")
    stats = {}
    again = judge_pairs(pairs, ev, backend, cache, stats=stats)
    assert backend.generated == 8 and stats == {"cached": 8}
    assert again == records  # from the cache or not, the same records
    summary = summarize(records)
    assert summary["hsae"]["n"] == 3 and summary["random"]["n"] == 2
