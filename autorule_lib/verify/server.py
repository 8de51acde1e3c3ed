"""The verifier as a `vllm serve` process, reached through its OpenAI-compatible ``/v1/completions``.

Why a server: in the paper setup the GRPO stage trains on several GPUs with ZeRO-3; a vLLM engine inside
every training rank would ask each GPU for a large share beside the policy shard (and load the 8B judge
once per rank). One server on dedicated GPUs (started by ``autorule slurm``) serves every rank, and its
prefix cache is shared across them. The chat endpoint (backend ``openai``) would work too, but only for
paper-parity generation: chat APIs apply their own template and do not return next-token probabilities.

``/v1/completions`` takes the prompt as token ids, so the server sees exactly the tokens the local
backends see (our template, our truncation, no BOS added by the server), and with ``max_tokens: 1``,
``logprobs`` and vLLM's ``logprob_token_ids`` it returns the probabilities of the two answer tokens:
the fast mode without generating. ``return_tokens_as_token_ids`` makes the keys ``"token_id:N"``, so no
detokenised string has to be matched. As for the in-process vLLM backend, P(answer prefix) is not
measured (taken as 1). Prompts are sent sorted by token ids, in batches, so prompts sharing a
conversation reach the server back to back and hit its prefix cache.

A batch whose request fails becomes unscored verdicts naming the error (never a 0); a reply without
the probabilities asked for (a server that is not vLLM, e.g. ``transformers serve``, which ignores
``logprobs``) is unscored as ``no_logprobs``.
"""
from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from ..config import VerifierConfig
from .prompt import AnswerTokens, VerifierTemplate, PieceMemo, answer_tokens, prompt_token_ids
from .verdict import Verdict, parse_verdict, unscored
from .backends import verdict_from_probs

TOKEN_ID_PREFIX = "token_id:"


class ServerError(RuntimeError):
    pass


def post_json(url: str, body: dict, timeout_s: float, api_key: str | None = None) -> dict:
    """One POST; any failure is a ``ServerError`` with the status and the server's message."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode(errors="replace")
        raise ServerError(f"HTTP {e.code} from {url}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
        raise ServerError(f"{type(e).__name__} calling {url}: {e}") from None


def top_token_logprobs(choice: dict) -> dict[int, float] | None:
    """{token id: logprob} of the first generated position of one completions choice, or None."""
    lp = choice.get("logprobs") or {}
    tops = lp.get("top_logprobs") or []
    if not tops or not tops[0]:
        return None
    out = {}
    for key, value in tops[0].items():
        if key.startswith(TOKEN_ID_PREFIX):
            try:
                out[int(key[len(TOKEN_ID_PREFIX):])] = float(value)
            except ValueError:
                continue
    return out or None


class VLLMServerBackend:
    """Parity (greedy generation) and fast (answer-token probabilities) through a vLLM server."""

    name = "vllm_server"
    supports_fast = True

    def __init__(self, base_url: str, model: str, tokenizer, *, num_workers: int = 8, timeout_s: float = 600.0,
                 api_key_env: str | None = None):
        if not base_url:
            raise ValueError("verifier.backend 'vllm_server' needs verifier.api_base_url (e.g. http://127.0.0.1:8100/v1)")
        self.url = base_url.rstrip("/") + "/completions"
        self.model, self.tok = model, tokenizer
        self.num_workers, self.timeout_s = max(1, num_workers), timeout_s
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.answer: AnswerTokens = answer_tokens(tokenizer)
        self.pieces = PieceMemo()
        self.requests = 0  # counted for the chapters and tests

    def _batches(self, ids: list[list[int]], batch_size: int) -> list[list[int]]:
        order = sorted(range(len(ids)), key=lambda j: ids[j])  # shared prefixes back to back: prefix-cache hits
        n = max(1, batch_size)
        return [order[i:i + n] for i in range(0, len(order), n)]

    def _complete(self, prompts: list[list[int]], **params) -> list[dict]:
        body = {"model": self.model, "prompt": prompts, "temperature": 0.0, **params}
        self.requests += 1
        reply = post_json(self.url, body, self.timeout_s, self.api_key)
        choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise ServerError(f"{self.url} answered {len(choices)} choices for {len(prompts)} prompts")
        return choices

    def _run(self, ids: list[list[int]], cfg: VerifierConfig, readout, **params) -> list[Verdict]:
        out: list[Verdict | None] = [None] * len(ids)

        def one(batch: list[int]) -> None:
            try:
                choices = self._complete([ids[j] for j in batch], **params)
                for j, c in zip(batch, choices):
                    out[j] = readout(c)
            except ServerError as e:  # unscored and counted; the cache keeps nothing, so a re-run retries
                for j in batch:
                    out[j] = unscored(f"backend_error: {e}")

        with ThreadPoolExecutor(max_workers=self.num_workers) as pool:
            list(pool.map(one, self._batches(ids, cfg.batch_size)))
        return out  # type: ignore[return-value]

    def generate(self, template: VerifierTemplate, items: Sequence[tuple[str, str]], cfg: VerifierConfig) -> list[Verdict]:
        ids = prompt_token_ids(self.tok, template, items, cfg.truncate_prompt_tokens, self.pieces)
        return self._run(ids, cfg, lambda c: parse_verdict(c.get("text"), cfg.unparseable_as_no),
                         max_tokens=cfg.max_new_tokens)

    def score(self, template: VerifierTemplate, items: Sequence[tuple[str, str]], cfg: VerifierConfig,
              reuse_prefix: bool = True) -> list[Verdict]:
        ids = [x + list(self.answer.prefix)
               for x in prompt_token_ids(self.tok, template, items, cfg.truncate_prompt_tokens, self.pieces)]
        yes, no = self.answer.yes, self.answer.no

        def readout(choice: dict) -> Verdict:
            top = top_token_logprobs(choice)
            if top is None:
                return unscored("no_logprobs: the server returned no token-id log-probabilities "
                                "(a vLLM server is needed for the fast mode)")
            p = lambda t: math.exp(top[t]) if t in top else 0.0  # noqa: E731
            return verdict_from_probs(p(yes), p(no), 1.0, cfg.min_answer_mass)

        return self._run(ids, cfg, readout, max_tokens=1, logprobs=2, logprob_token_ids=[yes, no],
                         return_tokens_as_token_ids=True)


def build_server_backend(profile, cfg: VerifierConfig, tokenizer_path: str) -> VLLMServerBackend:
    """The judge for ``verifier.backend: vllm_server``: the tokenizer is loaded here (a few MB), the model
    is the server's; the served model name is ``models.verifier`` (what ``autorule slurm`` serves it as)."""
    from transformers import AutoTokenizer

    return VLLMServerBackend(cfg.api_base_url, profile.models.verifier, AutoTokenizer.from_pretrained(tokenizer_path),
                           num_workers=cfg.num_workers, timeout_s=float(profile.extraction.read_timeout_s))
