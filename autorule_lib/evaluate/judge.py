"""The evaluation judge behind one small interface, in one of two modes.

* ``generate``: an LLM client (bedrock, openai, local, replay: the same clients as rule extraction)
  writes an answer; the caller parses it safely. A failed call is recorded as failed, with its reason,
  never as a score.
* ``likelihood``: a local causal LM scores each admissible answer (for the win rate the two rankings,
  for MT-Bench the ratings 1-10) as a continuation of the judge prompt under its chat template; the
  likeliest answer is the verdict. Even a tiny random model thus gives a verdict on every item, which
  is what the smoke book needs; the chapters say which mode a run used.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import models
from ..cache import ResponseCache
from ..llm.base import LLMCallError, cached_complete
from ..llm.clients import make_client
from .. import engines


@dataclass
class JudgeReply:
    text: str | None  # None when the call failed
    error: str | None = None  # the failure reason
    cached: bool = False
    scores: list[float] | None = field(default=None)  # likelihood mode: log-likelihood of each candidate


@dataclass
class JudgeSpec:
    """What a results table needs to say about the judge behind a number."""
    mode: str
    client: str
    model: str

    def label(self) -> str:
        name = Path(self.model).name if self.client == "local" else self.model  # a local path: its folder name
        return f"{self.client}:{name} ({self.mode})"


class GeneratingJudge:
    """Asks an LLM client; answers are cached (successful ones only, so failures are retried next run)."""

    mode = "generate"

    def __init__(self, client, cache: ResponseCache | None, temperature: float = 0.0, max_tokens: int = 2048,
                 num_proc: int = 8):
        self.client, self.cache, self.num_proc = client, cache, num_proc
        self.params = {"temperature": temperature, "max_tokens": max_tokens}
        self.spec = JudgeSpec("generate", client.provider, client.model)

    def ask(self, messages: list[dict]) -> JudgeReply:
        try:
            if self.cache is None:
                resp, cached = self.client.complete(messages, **self.params), False
            else:
                resp, cached = cached_complete(self.client, self.cache, messages, extra={"kind": "judge"},
                                               **self.params)
        except LLMCallError as e:
            return JudgeReply(None, e.reason)
        return JudgeReply(resp.text, None, cached)

    def ask_many(self, conversations: list[list[dict]]) -> list[JudgeReply]:
        if self.num_proc <= 1 or len(conversations) <= 1:
            return [self.ask(m) for m in conversations]
        with ThreadPoolExecutor(self.num_proc) as pool:
            return list(pool.map(self.ask, conversations))


class LikelihoodJudge:
    """Scores fixed candidate answers with a local causal LM; no text is generated."""

    mode = "likelihood"

    def __init__(self, model_path: str, device: str = "cpu", dtype: str = "fp32", batch_size: int = 16):
        self.model_path, self.device, self.dtype, self.batch_size = model_path, device, dtype, batch_size
        self.spec = JudgeSpec("likelihood", "local", str(model_path))
        self._loaded = None
        self._lock = threading.Lock()

    def _load(self):
        if self._loaded is None:
            engines.make_room("judge")
            tok = models.load_tokenizer(self.model_path)
            self._loaded = (tok, models.load_causal_lm(self.model_path, self.device, self.dtype))
            engines.register("judge", self.release)
        return self._loaded

    def release(self) -> None:
        """Drop the model (engines.make_room calls this before another model loads); it reloads when next used."""
        self._loaded = None

    def score(self, messages: list[dict], candidates: list[str]) -> list[float]:
        """Log-likelihood of each candidate as the judge's whole answer to ``messages``."""
        import torch

        with self._lock:
            tok, model = self._load()
            prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
            if isinstance(prompt_ids, dict):  # some tokenizers ignore return_dict=False
                prompt_ids = prompt_ids["input_ids"]
            limit = getattr(model.config, "max_position_embeddings", None)
            cand_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in candidates]
            if limit is not None:  # keep the end of an over-long prompt: the answer format is stated there
                room = limit - max(len(c) for c in cand_ids)
                prompt_ids = prompt_ids[-room:]
            scores = []
            for start in range(0, len(cand_ids), self.batch_size):
                chunk = cand_ids[start: start + self.batch_size]
                seqs = [prompt_ids + c for c in chunk]
                width = max(len(s) for s in seqs)
                pad = tok.pad_token_id if tok.pad_token_id is not None else 0
                ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=self.device)
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.device)
                with torch.no_grad():
                    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
                for row, c in enumerate(chunk):
                    pos = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(c), device=self.device)
                    target = torch.tensor(c, device=self.device)
                    scores.append(float(logp[row, pos, target].sum()))
            return scores

    def choose(self, messages: list[dict], candidates: list[str]) -> JudgeReply:
        scores = self.score(messages, candidates)
        best = max(range(len(candidates)), key=scores.__getitem__)
        return JudgeReply(candidates[best], None, False, scores)


def make_judge(profile, models_dir: str | Path, cache: ResponseCache | None, device: str = "cpu"):
    """The profile's judge: ``evaluation.judge_llm`` / ``judge_model`` in ``evaluation.judge_mode``."""
    ev = profile.evaluation
    if ev.judge_mode == "likelihood":
        if ev.judge_llm != "local":
            raise ValueError("evaluation.judge_mode 'likelihood' needs a local judge (judge_llm: local): an API "
                             "judge does not return the probability of a given answer")
        return LikelihoodJudge(models.resolve(profile, "judge", models_dir), device=device, dtype=profile.precision)
    model = models.resolve(profile, "judge", models_dir) if ev.judge_llm == "local" else ev.judge_model
    client = make_client(
        _ClientSettings(llm=ev.judge_llm, model=model, region=ev.judge_region, base_url=ev.judge_base_url,
                        api_key_env=ev.judge_api_key_env, replay_file=ev.judge_replay_file,
                        temperature=ev.judge_temperature, max_tokens=ev.judge_max_tokens,
                        max_retries=profile.extraction.max_retries,
                        gpu_memory_utilization=ev.vllm_gpu_memory_utilization),
        device=device)
    return GeneratingJudge(client, cache, ev.judge_temperature, ev.judge_max_tokens,
                           ev.judge_num_proc if ev.judge_llm != "local" else 1)


@dataclass
class _ClientSettings:
    """The fields ``make_client`` reads, taken from the evaluation block instead of the extraction one."""
    llm: str
    model: str
    region: str
    base_url: str | None
    api_key_env: str
    replay_file: str | None
    temperature: float
    max_tokens: int
    max_retries: int
    read_timeout_s: int = 900
    gpu_memory_utilization: float = 0.85  # a local judge on vLLM: its share (engines.vllm_kwargs)
