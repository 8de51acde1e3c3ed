"""The policy's plain-text conversation format (book/method.md §4), used by every stage.

``<|user|>{prompt}<|assistant|>{response} <|end_of_text|>``: no BOS, a space before EOS. The
markers are ordinary text for Llama-3 base, not special tokens, so callers must encode with
``add_special_tokens=False`` to keep the BOS out.
"""
from __future__ import annotations

USER = "<|user|>"
ASSISTANT = "<|assistant|>"


def policy_prompt(prompt: str) -> str:
    """What the policy sees before it answers (also the AlpacaEval/FastChat prompt)."""
    return f"{USER}{prompt}{ASSISTANT}"


def policy_text(prompt: str, response: str, eos_token: str) -> str:
    """A full training sequence."""
    return f"{policy_prompt(prompt)}{response} {eos_token}"


def completion_text(response: str, eos_token: str) -> str:
    """The part after the prompt that SFT learns (response-only loss)."""
    return f"{response} {eos_token}"


def verifier_conversation(prompt: str, response: str, eos_token: str | None = None) -> str:
    """The raw policy text the verifier judges, EOS stripped (book/method.md §3)."""
    if eos_token:
        response = response.rstrip()
        if response.endswith(eos_token):
            response = response[: -len(eos_token)].rstrip()
    return f"{policy_prompt(prompt)}{response}"
