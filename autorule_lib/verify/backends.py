"""Where verdicts are computed: transformers (parity generation and fast scoring), vLLM, API judges.

Every backend takes a list of (conversation, rule) items and returns one ``Verdict`` per item, in
order. A batch that fails becomes unscored verdicts carrying the error, so one bad batch does not stop
a training step and is still counted.
"""
from __future__ import annotations

import math
import os
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from ..config import Profile, VerifierConfig
from .verdict import NO_VERDICT, Verdict, parse_verdict, unscored
from .prompt import AnswerTokens, VerifierTemplate, PieceMemo, answer_tokens, verifier_prompt_ids
from ..llm.clients import make_client
from .. import engines
from ..llm.base import LLMCallError


def _chunks(seq: Sequence, n: int):
    n = max(1, n)
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    return len(os.path.commonprefix(list(seqs)))  # works on any sequences: compares only the min and max


def verdict_from_probs(p_yes_tok: float, p_no_tok: float, p_prefix: float, min_mass: float,
                       no_verdict_as_zero: bool = True) -> Verdict:
    """Fast-mode verdict: Yes iff P(Yes) > P(No). When the judge would rarely answer either, it is the
    fast counterpart of a generated answer with no verdict: 0 (reason ``no_verdict``) or unscored, as
    the parity mode would treat that answer."""
    pair = p_yes_tok + p_no_tok
    mass = p_prefix * pair
    if pair <= 0 or mass < min_mass:
        why, p_yes = f"low_answer_mass ({mass:.3g} < {min_mass})", p_yes_tok / pair if pair > 0 else None
        if no_verdict_as_zero:
            return Verdict(0, reason=f"{NO_VERDICT} ({why}, counted as 0)", answer_mass=mass, p_yes=p_yes)
        return unscored(why, answer_mass=mass, p_yes=p_yes)
    p_yes = p_yes_tok / pair
    return Verdict(int(p_yes > 0.5), p_yes=p_yes, answer_mass=mass)


def _zero_truncated(verdicts: list, zero: list[bool]) -> list[Verdict]:
    """Fast mode: a no-verdict check whose prompt was truncated is a 0 whatever ``unparseable_as_no`` says
    (see ``verifier.verifier_prompt_ids``); backend failures stay unscored."""
    for j, v in enumerate(verdicts):
        if zero[j] and v.value is None and (v.reason or "").startswith("low_answer_mass"):
            verdicts[j] = Verdict(0, reason=f"{NO_VERDICT} ({v.reason}, truncated prompt, counted as 0)",
                                  p_yes=v.p_yes, answer_mass=v.answer_mass)
    return verdicts


def _stop_ids(model, tokenizer) -> list[int]:
    """End-of-answer tokens: the generation config's (Llama-3-Instruct: <|end_of_text|>, <|eot_id|>) and EOS."""
    eos = model.generation_config.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


class TransformersBackend:
    """A local causal LM as the judge, in both modes."""

    name = "transformers"
    supports_fast = True

    def __init__(self, model, tokenizer):
        from . import shared_prefix

        self.model, self.tok = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = _stop_ids(model, tokenizer)
        self.answer: AnswerTokens = answer_tokens(tokenizer)
        self.pieces = PieceMemo()
        self.can_share_prefix = shared_prefix.enable(self.model)
        if not self.can_share_prefix:
            warnings.warn(f"{type(model).__name__} does not dispatch attention through transformers' "
                          "AttentionInterface: the fast verifier re-encodes every prompt (no prefix reuse)")

    # ------------------------------------------------------------ paper parity: greedy generation

    def generate(self, template: VerifierTemplate, items, cfg: VerifierConfig) -> list[Verdict]:
        ids, zero = verifier_prompt_ids(self.tok, template, items, cfg, self.pieces)
        order = sorted(range(len(ids)), key=lambda j: len(ids[j]))  # similar lengths together: less padding
        out: list[Verdict | None] = [None] * len(ids)
        for chunk in _chunks(order, cfg.batch_size):
            try:
                texts = self._generate_batch([ids[j] for j in chunk], cfg.max_new_tokens)
                for j, text in zip(chunk, texts):
                    out[j] = parse_verdict(text, zero[j])
            except (RuntimeError, ValueError) as e:  # e.g. out of memory: unscored, counted, retried next run
                warnings.warn(f"verifier generation failed for {len(chunk)} checks: {e}")
                for j in chunk:
                    out[j] = unscored(f"backend_error: {type(e).__name__}: {e}")
        return out  # type: ignore[return-value]

    def _generate_batch(self, batch: list[list[int]], max_new_tokens: int) -> list[str]:
        import torch
        from transformers import GenerationConfig

        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, x in enumerate(batch):  # left padding, so every row continues from its own last token
            input_ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.stop_ids,
                               pad_token_id=self.pad_id)
        with torch.inference_mode():
            seqs = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                       generation_config=gen)
        texts = []
        for row in seqs[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in self.stop_ids), len(row))
            texts.append(self.tok.decode(row[:cut], skip_special_tokens=True))
        return texts

    # ------------------------------------------------------------ fast: next-token probabilities

    def score(self, template: VerifierTemplate, items, cfg: VerifierConfig, reuse_prefix: bool = True) -> list[Verdict]:
        """One forward pass per batch of items. With ``reuse_prefix``, the items of one conversation share
        the longest common token prefix of their prompts, encoded once and attended to by every rule."""
        ids, zero = verifier_prompt_ids(self.tok, template, items, cfg, self.pieces)
        ids = [x + list(self.answer.prefix) for x in ids]
        out: list[Verdict | None] = [None] * len(ids)
        groups: dict[str, list[int]] = {}
        for j, (conv, _) in enumerate(items):
            groups.setdefault(conv if reuse_prefix and self.can_share_prefix else str(j), []).append(j)
        group_list = sorted(groups.values(), key=lambda g: len(ids[g[0]]))
        if not (reuse_prefix and self.can_share_prefix):  # plain batches of whole prompts
            for chunk in _chunks([g[0] for g in group_list], cfg.batch_size):
                self._guarded(chunk, out, lambda c=chunk: self._score_rows([ids[j] for j in c], cfg), "")
            return _zero_truncated(out, zero)
        plen = {g[0]: self._shared_prefix_len(g, ids) for g in group_list}  # keyed by each group's first item
        # The head every prompt starts with (the instructions) is encoded once for the whole call.
        head_len = 0 if len(group_list) < 2 else min(_common_prefix_len([ids[g[0]] for g in group_list]),
                                                     *plen.values())
        head = ids[group_list[0][0]][:head_len]
        try:
            head_kv = self._encode_head(head)
        except (RuntimeError, ValueError) as e:
            warnings.warn(f"verifier scoring (shared head) failed for {len(ids)} checks: {e}")
            return [unscored(f"backend_error: {type(e).__name__}: {e}") for _ in ids]
        # Conversations per forward pass; one conversation's rules always share a pass.
        per_batch = max(1, cfg.batch_size // max(len(g) for g in group_list))
        for gchunk in _chunks(group_list, per_batch):
            rows = [j for g in gchunk for j in g]
            self._guarded(rows, out, lambda gc=gchunk: self._score_with_prefix(gc, ids, plen, head, head_kv, cfg),
                          " (prefix reuse)")
        return _zero_truncated(out, zero)

    def _encode_head(self, head: list[int]):
        import torch

        from .shared_prefix import encode_head

        with torch.inference_mode():
            return encode_head(self.model, head)

    def _guarded(self, rows, out, fn, what: str) -> None:
        try:
            for j, v in zip(rows, fn()):
                out[j] = v
        except (RuntimeError, ValueError) as e:
            warnings.warn(f"verifier scoring{what} failed for {len(rows)} checks: {e}")
            for j in rows:
                out[j] = unscored(f"backend_error: {type(e).__name__}: {e}")

    def _readout(self, logits, cfg: VerifierConfig) -> list[Verdict]:
        """logits [rows, len(prefix)+1, V] at the positions that predict the forced prefix and then the answer."""
        import torch

        logp = torch.log_softmax(logits.float(), dim=-1)
        n = len(self.answer.prefix)
        lp_prefix = sum((logp[:, t, tok] for t, tok in enumerate(self.answer.prefix)), logp.new_zeros(len(logp)))
        rows = zip(logp[:, n, self.answer.yes].exp().tolist(), logp[:, n, self.answer.no].exp().tolist(),
                   lp_prefix.exp().tolist())
        return [verdict_from_probs(y, no, pre, cfg.min_answer_mass, cfg.unparseable_as_no) for y, no, pre in rows]

    def _score_rows(self, batch: list[list[int]], cfg: VerifierConfig) -> list[Verdict]:
        """Whole prompts, left padded; the last len(prefix)+1 positions carry the answer."""
        import torch

        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, x in enumerate(batch):
            input_ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = len(self.answer.prefix) + 1
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=pos.to(self.device), logits_to_keep=keep).logits
        return self._readout(logits[:, -keep:], cfg)

    def _shared_prefix_len(self, group: list[int], ids: list[list[int]]) -> int:
        # Every readout position must lie after the shared prefix, so it stops short of them.
        keep = len(self.answer.prefix) + 1
        return max(1, min(_common_prefix_len([ids[j] for j in group]), min(len(ids[j]) for j in group) - keep))

    def _score_with_prefix(self, groups: list[list[int]], ids: list[list[int]], plen: dict[int, int], head: list[int],
                           head_kv, cfg: VerifierConfig) -> list[Verdict]:
        """One forward pass for these conversations: the call's shared head (encoded once per call), each
        conversation's part of the prefix once, then its rules' suffixes (``shared_prefix``: packed,
        unpadded, shared keys/values never copied per rule)."""
        import torch

        from .shared_prefix import check_logits

        with torch.inference_mode():
            logits = check_logits(self.model, head, [ids[g[0]][len(head):plen[g[0]]] for g in groups],
                                  [[ids[j][plen[g[0]]:] for j in g] for g in groups], len(self.answer.prefix) + 1,
                                  head_kv)
        return self._readout(logits, cfg)


class VLLMBackend:
    """vLLM with automatic prefix caching; requests sorted so prompts sharing a prefix run back to back.

    Optional: importing this backend needs ``vllm`` (the ``gpu`` extra). Not exercised on CPU machines.
    """

    name = "vllm"
    supports_fast = True

    def __init__(self, model_path: str, dtype: str = "bfloat16", **engine_kwargs):
        import vllm  # noqa: F401  ImportError -> the caller falls back to transformers
        from transformers import AutoTokenizer

        # The engine starts on first use and can be released (autorule_lib.engines): one engine at a time.
        self.model_path, self.dtype, self.engine_kwargs, self._llm = model_path, dtype, engine_kwargs, None
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.answer = answer_tokens(self.tok)
        self.pieces = PieceMemo()

    @property
    def llm(self):
        if self._llm is None:
            from vllm import LLM

            engines.make_room("verifier")
            self._llm = LLM(model=self.model_path, dtype=self.dtype, enable_prefix_caching=True, **self.engine_kwargs)
            engines.register("verifier", self.release)
        return self._llm

    def release(self) -> None:
        engine, self._llm = self._llm, None
        if engine is not None:
            engines.shutdown_vllm(engine)

    def _run(self, ids: list[list[int]], params):
        # Lexicographic order of token ids puts prompts with long common prefixes next to each other,
        # so the prefix blocks are still cached when the next request needs them.
        order = sorted(range(len(ids)), key=lambda j: ids[j])
        results = self.llm.generate([{"prompt_token_ids": ids[j]} for j in order], params, use_tqdm=False)
        out = [None] * len(ids)
        for j, r in zip(order, results):
            out[j] = r
        return out

    def generate(self, template: VerifierTemplate, items, cfg: VerifierConfig) -> list[Verdict]:
        from vllm import SamplingParams

        ids, zero = verifier_prompt_ids(self.tok, template, items, cfg, self.pieces)
        try:
            results = self._run(ids, SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens))
        except (RuntimeError, ValueError) as e:
            return [unscored(f"backend_error: {type(e).__name__}: {e}") for _ in items]
        return [parse_verdict(r.outputs[0].text, z) for r, z in zip(results, zero)]

    def score(self, template: VerifierTemplate, items, cfg: VerifierConfig, reuse_prefix: bool = True) -> list[Verdict]:
        from vllm import SamplingParams

        ids, zero = verifier_prompt_ids(self.tok, template, items, cfg, self.pieces)
        ids = [x + list(self.answer.prefix) for x in ids]
        try:  # one generated token with its top log-probabilities; P(prefix) is not measured here (taken as 1)
            results = self._run(ids, SamplingParams(temperature=0.0, max_tokens=1, logprobs=20))
        except (RuntimeError, ValueError) as e:
            return [unscored(f"backend_error: {type(e).__name__}: {e}") for _ in items]
        verdicts = []
        for r in results:
            top = r.outputs[0].logprobs[0]
            p = lambda t: math.exp(top[t].logprob) if t in top else 0.0  # noqa: E731
            verdicts.append(verdict_from_probs(p(self.answer.yes), p(self.answer.no), 1.0, cfg.min_answer_mass,
                                               cfg.unparseable_as_no))
        return _zero_truncated(verdicts, zero)


class APIBackend:
    """A chat API as the judge (parity mode only): the server applies its own chat template."""

    name = "api"
    supports_fast = False

    def __init__(self, client, num_workers: int = 8):
        self.client, self.num_workers = client, num_workers

    def generate(self, template: VerifierTemplate, items, cfg: VerifierConfig) -> list[Verdict]:
        if cfg.truncate_prompt_tokens:
            warnings.warn("truncate_prompt_tokens is not applied by API judges (their tokenizer is remote)")

        def one(item: tuple[str, str]) -> Verdict:
            conv, rule = item
            messages = [{"role": "user", "content": template.user_message(rule, conv)}]
            try:
                resp = self.client.complete(messages, temperature=0.0, max_tokens=cfg.max_new_tokens)
            except LLMCallError as e:
                return unscored(f"backend_error: {e.reason}")
            except Exception as e:  # a client bug or network error must not become a 0
                return unscored(f"backend_error: {type(e).__name__}: {e}")
            return parse_verdict(resp.text, cfg.unparseable_as_no)

        with ThreadPoolExecutor(max_workers=max(1, self.num_workers)) as pool:
            return list(pool.map(one, items))


def make_api_client(profile: Profile, cfg: VerifierConfig):
    """An ``llm`` client for the judge: greedy, ``max_new_tokens`` per answer, the profile's retry policy."""
    settings = types.SimpleNamespace(
        llm=cfg.backend, model=profile.models.verifier, region=cfg.api_region, base_url=cfg.api_base_url,
        temperature=0.0, max_tokens=cfg.max_new_tokens, max_retries=profile.extraction.max_retries,
        api_key_env=profile.extraction.api_key_env, read_timeout_s=profile.extraction.read_timeout_s)
    return make_client(settings)
