"""The LLM client contract: responses, errors, retries with backoff, rate limits and the response cache.

Every client (``llm.clients``) shares this retry layer and is called through ``cached_complete``, so a
re-run asks only for what is not cached, and a failed call is an error, never an empty answer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..cache import cache_key


@dataclass
class LLMResponse:
    text: str
    reasoning: str | None = None
    usage: dict = field(default_factory=dict)  # {"input_tokens": int, "output_tokens": int}
    latency_s: float = 0.0
    model: str = ""
    provider: str = ""
    stop_reason: str | None = None  # "end_turn", "max_tokens"/"length" (answer may be cut off), ...
    retries: int = 0  # retries our layer needed for this call


class LLMCallError(RuntimeError):
    """A call failed after its retries; ``reason`` is a short machine-readable cause."""

    def __init__(self, reason: str, message: str, retries: int = 0):
        self.reason = reason
        self.retries = retries
        super().__init__(f"{reason}: {message}")


class TransientError(Exception):
    """Raised by a client's ``_call`` for errors worth retrying (throttling, 5xx, timeouts)."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None):
        self.reason, self.retry_after = reason, retry_after
        super().__init__(f"{reason}: {message}")


class LLMClient(Protocol):
    provider: str
    model: str

    def complete(self, messages: list[dict], **params) -> LLMResponse:
        """One chat call; ``messages`` are {"role", "content"} dicts. Raises LLMCallError on failure."""
        ...


# ---------------------------------------------------------------- retries and rate limits

@dataclass
class RetryPolicy:
    max_retries: int = 6
    base_delay_s: float = 2.0
    max_delay_s: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Full-jitter exponential backoff; never shorter than a server's Retry-After."""
        wait = random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2 ** attempt))
        return max(wait, retry_after or 0.0)


class RateLimiter:
    """Sliding one-minute window over requests and tokens, shared by all threads of a client.

    Tokens are only known when an answer arrives, so the token limit holds back *new* requests while
    the last minute's tokens are at or above the limit.
    """

    def __init__(self, requests_per_minute: int | None = None, tokens_per_minute: int | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.clock, self.sleep = clock, sleep
        self._requests: deque[float] = deque()
        self._tokens: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self.waited_s = 0.0

    def _prune(self, now: float) -> None:
        while self._requests and self._requests[0] <= now - 60:
            self._requests.popleft()
        while self._tokens and self._tokens[0][0] <= now - 60:
            self._tokens.popleft()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = self.clock()
                self._prune(now)
                waits = []
                if self.rpm and len(self._requests) >= self.rpm:
                    waits.append(self._requests[0] + 60 - now)
                if self.tpm and sum(n for _, n in self._tokens) >= self.tpm:
                    waits.append(self._tokens[0][0] + 60 - now)
                if not waits:
                    self._requests.append(now)
                    return
                wait = max(min(waits), 0.01)
                self.waited_s += wait
            self.sleep(wait)

    def record_tokens(self, n: int) -> None:
        if self.tpm and n:
            with self._lock:
                self._tokens.append((self.clock(), n))


def split_reasoning(text: str) -> tuple[str, str | None]:
    """Servers without a reasoning parser return '<think>chain</think>answer' as one text."""
    if "</think>" not in text:
        return text, None
    head, answer = text.split("</think>", 1)
    return answer.strip(), head.replace("<think>", "", 1).strip() or None


class BaseClient:
    """The shared call loop: rate limit, call, retry transient errors with backoff, measure."""

    provider = "base"

    def __init__(self, model: str, temperature: float = 0.6, max_tokens: int = 32768,
                 retry: RetryPolicy | None = None, limiter: RateLimiter | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.retry = retry or RetryPolicy()
        self.limiter, self.sleep = limiter, sleep

    def default_params(self) -> dict:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}

    def _call(self, messages: list[dict], params: dict) -> LLMResponse:
        raise NotImplementedError

    def complete(self, messages: list[dict], **params) -> LLMResponse:
        params = {**self.default_params(), **params}
        retries = 0
        while True:
            if self.limiter:
                self.limiter.acquire()
            t0 = time.perf_counter()
            try:
                resp = self._call(messages, params)
            except TransientError as e:
                if retries >= self.retry.max_retries:
                    raise LLMCallError(e.reason, f"{e} (gave up after {retries} retries)", retries) from None
                self.sleep(self.retry.delay(retries, e.retry_after))
                retries += 1
                continue
            except LLMCallError as e:
                e.retries = retries
                raise
            resp.latency_s = resp.latency_s or time.perf_counter() - t0
            resp.provider, resp.model, resp.retries = self.provider, self.model, retries
            if self.limiter:
                self.limiter.record_tokens(sum(resp.usage.get(k, 0) for k in ("input_tokens", "output_tokens")))
            return resp


# ---------------------------------------------------------------- replay of recorded responses

def messages_key(messages: list[dict]) -> str:
    """Content hash of a conversation: the replay lookup key."""
    canon = [{"role": m["role"], "content": m["content"]} for m in messages]
    return hashlib.sha256(json.dumps(canon, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def cache_parts(client: LLMClient, messages: list[dict], params: dict, sample_index: int = 0,
                extra: dict | None = None) -> dict:
    """Everything that determines an answer: provider, model, messages, inference parameters, sample."""
    defaults = getattr(client, "default_params", dict)()
    return {"provider": client.provider, "model": client.model, "messages": messages,
            "params": {**defaults, **params}, "sample_index": sample_index, **(extra or {})}


_INFLIGHT: dict[str, threading.Lock] = {}
_INFLIGHT_GUARD = threading.Lock()


def cached_complete(client: LLMClient, cache, messages: list[dict], *, sample_index: int = 0,
                    extra: dict | None = None, **params) -> tuple[LLMResponse, bool]:
    """(response, came from the cache). Only successful answers are stored, so failures are retried.

    Identical requests in flight at the same time are made once (the others wait for the stored
    answer), so every reader of a key sees the same answer, in this run and the next.
    """
    parts = cache_parts(client, messages, params, sample_index, extra)
    with _INFLIGHT_GUARD:
        lock = _INFLIGHT.setdefault(cache_key(parts), threading.Lock())
    with lock:
        hit = cache.get(parts)
        if hit is not None:
            return LLMResponse(**hit), True
        resp = client.complete(messages, **params)
        cache.put(parts, dataclasses.asdict(resp))
        return resp, False
