"""LLM clients behind one small interface: final text, reasoning chain, token usage and latency.

Implementations (Bedrock converse, OpenAI-compatible HTTP, local transformers/vLLM, replay of recorded
demonstration responses) live in this module; callers only use ``LLMClient.complete``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class LLMResponse:
    text: str
    reasoning: str | None = None
    usage: dict = field(default_factory=dict)  # {"input_tokens": int, "output_tokens": int}
    latency_s: float = 0.0
    model: str = ""
    provider: str = ""


class LLMCallError(RuntimeError):
    """A call failed after its retries; ``reason`` is a short machine-readable cause."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"{reason}: {message}")


class LLMClient(Protocol):
    provider: str
    model: str

    def complete(self, messages: list[dict], **params) -> LLMResponse:
        """One chat call; ``messages`` are {"role", "content"} dicts. Raises LLMCallError on failure."""
        ...
