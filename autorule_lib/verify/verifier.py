"""The rule verifier (book/method.md §3): one verdict per (conversation, rule).

A verdict is 1 (the response follows the rule), 0 (it does not) or *unscored* with a reason. An
unscored check is counted and reported, never turned into a silent 0.

Two modes, one judge prompt (an editable template in ``prompts/``):

* ``parity`` — the paper's judge: the prompt rendered with the verifier's chat template, greedy
  generation up to ``max_new_tokens``, verdict 1 if the output contains ``[[Yes]]``. An answer with
  neither ``[[Yes]]`` nor ``[[No]]`` is a 0 as in the original, with the reason ``no_verdict`` so it is
  counted (``unparseable_as_no: false`` makes it unscored instead). A backend failure (no answer at
  all) is always unscored, never a 0.
* ``fast`` — one forward pass per (response, rule): the common start of the two answers (``[[``) is
  appended to the prompt and the verdict read from the next-token probabilities of ``Yes`` vs ``No``.
  With the ``conversation_first`` layout all rules of one response share the conversation as a prompt
  prefix: it is encoded once and every rule's short suffix attends to it (``shared_prefix.py``).

Backends (transformers, vLLM, API clients) live in ``verifier_backends.py``; this module holds the
prompt, the verdict contract, the persistent cache and the bookkeeping.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .. import models
from ..config import Profile, VerifierConfig
from .prompt import VerifierTemplate, load_template
from .verdict import Verdict, reason_kind, unscored
from ..cache import ResponseCache
from . import backends as vb
from .server import build_server_backend
from ..engines import check_verifier_engine_layout, vllm_kwargs

# ---------------------------------------------------------------- the verifier


class RuleVerifier:
    """Checks conversations against rules through one backend, with a persistent verdict cache and counters.

    ``stats`` counts every check: ``checks``, ``cache_hits``, ``model_checks`` (sent to the backend),
    ``yes``, ``no``, ``unscored`` and ``unscored:<kind>`` per reason.
    """

    def __init__(self, backend, template: VerifierTemplate, cfg: VerifierConfig, verifier_id: str,
                 mode: str | None = None, cache=None):
        self.backend, self.template, self.cfg, self.verifier_id = backend, template, cfg, verifier_id
        self.mode = mode or cfg.mode
        if self.mode == "fast" and not getattr(backend, "supports_fast", False):
            raise ValueError(f"verifier mode 'fast' needs next-token probabilities; backend {backend.name!r} "
                             "only generates (use mode: parity, or backend transformers/vllm)")
        self.cache = cache if cfg.use_cache else None
        self.reuse_prefix = True  # fast mode: encode shared prompt prefixes once (benchmarks turn it off)
        self.stats: Counter = Counter()

    def variant(self, mode: str | None = None, layout: str | None = None) -> "RuleVerifier":
        """The same judge (model, cache) in another mode or prompt layout; counters start at zero."""
        template = load_template(layout, self.template.concise_clause) if layout else self.template
        cfg = dataclasses.replace(self.cfg, mode=mode or self.mode, layout=template.layout)
        return RuleVerifier(self.backend, template, cfg, self.verifier_id, cfg.mode, self.cache)

    def describe(self) -> dict:
        return {"verifier_id": self.verifier_id, "backend": self.backend.name, "mode": self.mode,
                "layout": self.template.layout, "template_version": self.template.version,
                "concise_clause": self.template.concise_clause, "max_new_tokens": self.cfg.max_new_tokens,
                "truncate_prompt_tokens": self.cfg.truncate_prompt_tokens, "min_answer_mass": self.cfg.min_answer_mass,
                "unparseable_as_no": self.cfg.unparseable_as_no}

    def cache_parts(self, conversation: str, rule: str) -> dict:
        """Everything that fixes a verdict: judge, template, decoding settings, the rule and the exact text."""
        decode = ({"max_new_tokens": self.cfg.max_new_tokens} if self.mode == "parity"
                  else {"min_answer_mass": self.cfg.min_answer_mass})
        decode["unparseable_as_no"] = self.cfg.unparseable_as_no
        return {"kind": "rule_verdict", "verifier": self.verifier_id, "mode": self.mode,
                "template": self.template.version, "truncate": self.cfg.truncate_prompt_tokens,
                "decode": decode, "rule": rule, "text": conversation}

    def verify(self, conversations: Sequence[str], rules: Sequence[str]) -> list[list[Verdict]]:
        """``verdicts[i][k]``: conversation i under rule k."""
        flat = self.verify_items([(c, r) for c in conversations for r in rules])
        k = len(rules)
        return [flat[i * k:(i + 1) * k] for i in range(len(conversations))]

    def verify_items(self, items: Sequence[tuple[str, str]]) -> list[Verdict]:
        """One verdict per (conversation, rule) item, from the cache where possible."""
        out: list[Verdict | None] = [None] * len(items)
        todo: dict[tuple[str, str], list[int]] = {}
        for j, (conv, rule) in enumerate(items):
            hit = self.cache.get(self.cache_parts(conv, rule)) if self.cache is not None else None
            if hit is not None:
                out[j] = Verdict.from_json(hit, cached=True)
                self.stats["cache_hits"] += 1
            else:
                todo.setdefault((conv, rule), []).append(j)  # identical checks are made once
        if todo:
            unique = list(todo)
            for (conv, rule), verdict in zip(unique, self._call_backend(unique)):
                if self.cache is not None and reason_kind(verdict.reason) != "backend_error":
                    self.cache.put(self.cache_parts(conv, rule), verdict.to_json())  # failures are retried next time
                for j in todo[(conv, rule)]:
                    out[j] = verdict
            self.stats["model_checks"] += len(unique)
        for v in out:
            self._count(v)
        return out  # type: ignore[return-value]

    def _call_backend(self, items: list[tuple[str, str]]) -> list[Verdict]:
        try:
            if self.mode == "parity":
                verdicts = self.backend.generate(self.template, items, self.cfg)
            else:
                verdicts = self.backend.score(self.template, items, self.cfg, reuse_prefix=self.reuse_prefix)
        except Exception as e:  # the backends catch per batch; this is the last line of defence
            warnings.warn(f"verifier backend failed on {len(items)} checks: {type(e).__name__}: {e}")
            verdicts = [unscored(f"backend_error: {type(e).__name__}: {e}") for _ in items]
        if len(verdicts) != len(items):
            raise RuntimeError(f"backend {self.backend.name} returned {len(verdicts)} verdicts for {len(items)} checks")
        return verdicts

    def _count(self, v: Verdict) -> None:
        self.stats["checks"] += 1
        if v.value is None:
            self.stats["unscored"] += 1
        else:
            self.stats["yes" if v.value == 1 else "no"] += 1
        if v.reason:
            self.stats[f"{'unscored' if v.value is None else 'imposed'}:{reason_kind(v.reason)}"] += 1


# ---------------------------------------------------------------- construction

def load_local_judge(model_path: str, profile: Profile):
    """(model, tokenizer) for the transformers backend, in the profile's precision (bf16 kept even on a CPU,
    as this backend always did: see ``models.pick_dtype``) and on its device."""
    model = models.load_causal_lm(model_path, models.pick_device(profile), profile.precision, keep_bf16_on_cpu=True)
    return model, models.load_tokenizer(model_path)


def build_verifier(profile: Profile, models_dir: str | Path, cache_path: str | Path | None = None, *,
                   client=None, model=None, tokenizer=None, **overrides: Any) -> RuleVerifier:
    """The verifier a profile asks for. ``overrides`` replace ``profile.verifier`` fields (e.g. ``mode``).

    ``client`` (an ``llm.LLMClient``) serves the API backends; ``model``/``tokenizer`` reuse a loaded
    judge. vLLM is optional: when it is not importable the transformers backend is used, with a warning.
    """
    cfg = dataclasses.replace(profile.verifier, **overrides)
    template = load_template(cfg.layout, cfg.concise_clause)
    cache = ResponseCache(cache_path) if cache_path and cfg.use_cache else None
    if cfg.backend in ("openai", "bedrock"):
        client = client or vb.make_api_client(profile, cfg)
        backend = vb.APIBackend(client, cfg.num_workers)
        return RuleVerifier(backend, template, cfg, f"{cfg.backend}:{profile.models.verifier}", cfg.mode, cache)
    path = models.resolve(profile, "verifier", models_dir)
    if cfg.backend == "vllm_server":  # one server for every rank (autorule_lib.verify.server)
        backend = build_server_backend(profile, cfg, path)
        return RuleVerifier(backend, template, cfg, f"vllm_server:{models.model_id(path)}", cfg.mode, cache)
    if cfg.backend == "vllm":
        check_verifier_engine_layout(cfg.backend)
        try:
            backend = vb.VLLMBackend(path, dtype="bfloat16" if profile.precision == "bf16" else "float32",
                                   **vllm_kwargs(cfg.gpu_memory_utilization))
        except ImportError as e:
            warnings.warn(f"verifier backend 'vllm' is not available ({e}); using transformers instead")
            backend = None
        if backend is not None:
            return RuleVerifier(backend, template, cfg, models.model_id(path), cfg.mode, cache)
    if model is None or tokenizer is None:
        model, tokenizer = load_local_judge(path, profile)
    return RuleVerifier(vb.TransformersBackend(model, tokenizer), template, cfg, models.model_id(path), cfg.mode, cache)
