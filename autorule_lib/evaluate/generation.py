"""Evaluation responses of any checkpoint, with the authors' AlpacaEval settings (book/method.md §5).

The seed generates with vLLM (bf16, temperature 0.9, top-p 1.0, up to 4096 new tokens, batch 16) on
the prompt ``<|user|>{instruction}<|assistant|>``. vLLM is used when it is importable and the model
runs on a GPU; otherwise transformers' ``generate`` with the same sampling settings. Prompts are
encoded without a BOS (the policy's format has none), except where ``add_special_tokens`` asks for the
tokenizer's defaults (MT-Bench, as FastChat does). Every response is cached per (checkpoint,
prompt, settings), so re-running a chapter, or a later chapter asking for the same responses,
costs nothing.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .. import models
from ..cache import ResponseCache
from .. import engines
from ..engines import eval_vllm_kwargs
from ..artifacts import atomic_write_text


@dataclass(frozen=True)
class GenerationSettings:
    temperature: float = 0.9
    top_p: float = 1.0
    max_new_tokens: int = 4096
    batch_size: int = 16
    seed: int = 42
    # True: tokenise prompts with the tokenizer's defaults (Llama-3: a BOS first), as FastChat's MT-Bench
    # answer generation does; False: no special tokens, the policy's own format.
    add_special_tokens: bool = False

    @classmethod
    def from_profile(cls, profile, **overrides) -> "GenerationSettings":
        ev = profile.evaluation
        base = dict(temperature=ev.generation_temperature, top_p=ev.generation_top_p,
                    max_new_tokens=ev.generation_max_new_tokens, batch_size=ev.generation_batch_size,
                    seed=profile.seed)
        return cls(**{**base, **overrides})

    def cache_fields(self) -> dict:
        # the batch size changes speed, not what a response is allowed to be: left out of the key
        d = dataclasses.asdict(self)
        d.pop("batch_size")
        if not d["add_special_tokens"]:  # keys of responses cached before the switch existed stay valid
            d.pop("add_special_tokens")
        return d


def generate(checkpoint: str | Path, prompts: list[str], settings: GenerationSettings, cache: ResponseCache | None,
             *, device: str = "cpu", dtype: str = "fp32", engine: str = "auto",
             tokenizer: str | Path | None = None) -> list[dict]:
    """One response per already-formatted prompt: {"text", "n_tokens", "finished", "cached"}.

    ``finished`` is False when the budget ran out before the model's EOS (the answer may be cut off).
    ``tokenizer`` defaults to the checkpoint's own folder.
    """
    ckpt = models.model_id(checkpoint)
    parts = [{"kind": "eval_generation", "checkpoint": ckpt, "prompt": p, "settings": settings.cache_fields()}
             for p in prompts]
    out: list[dict | None] = [None] * len(prompts)
    todo = []
    for i, key in enumerate(parts):
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            out[i] = {**hit, "cached": True}
        else:
            todo.append(i)
    if todo:
        kind = models.pick_engine(engine, device)
        run = _generate_vllm if kind == "vllm" else _generate_transformers
        fresh = run(str(checkpoint), [prompts[i] for i in todo], settings, device=device, dtype=dtype,
                    tokenizer=str(tokenizer or checkpoint))
        for i, resp in zip(todo, fresh):
            if cache is not None:
                cache.put(parts[i], resp)
            out[i] = {**resp, "cached": False}
    return out  # type: ignore[return-value]


# One model in memory at a time, kept between calls: MT-Bench asks the same checkpoint several times
# (two turns, one call per sampling temperature), and reloading an 8B model each time would dominate.
_LOADED: dict[tuple, object] = {}


def _loaded(kind: str, path: str, tokenizer: str, device: str, dtype: str, seed: int):
    key = (kind, str(Path(path).resolve()), str(tokenizer), device, dtype, models.model_id(path))
    if key not in _LOADED:
        release()  # free the previous model before the next one loads
        engines.make_room("generation")  # and every other model of the process (judge, RM, verifier, alpaca_eval)
        _LOADED[key] = (_load_vllm(path, tokenizer, dtype, seed) if kind == "vllm"
                        else _load_transformers(path, device, dtype, tokenizer))
        engines.register("generation", release)
    return _LOADED[key]


def release() -> None:
    """Drop the model kept in memory (the chapters call this when they are done generating)."""
    for kind, model in [(k[0], v[1]) for k, v in _LOADED.items()]:
        if kind == "vllm":  # its engine core is a child process holding the GPU share: stop it now
            engines.shutdown_vllm(model)
    _LOADED.clear()
    engines.forget("generation")
    engines.free_accelerator_memory()


def _load_transformers(path: str, device: str, dtype: str, tokenizer: str | None = None):
    """Tokenizer (left padding, pad = EOS when unset) and model in eval mode."""
    # left padding: generation appends to the right end of every row
    tok = models.load_tokenizer(tokenizer or path, padding_side="left", pad_with_eos=True)
    return tok, models.load_causal_lm(path, device, dtype)


def _generate_transformers(path: str, prompts: list[str], settings: GenerationSettings, *, device: str,
                           dtype: str, tokenizer: str) -> list[dict]:
    import torch

    tok, model = _loaded("transformers", path, tokenizer, device, dtype, settings.seed)
    eos = tok.eos_token_id
    limit = getattr(model.config, "max_position_embeddings", None)
    torch.manual_seed(settings.seed)
    results = []
    for start in range(0, len(prompts), settings.batch_size):
        batch = prompts[start: start + settings.batch_size]
        enc = tok(batch, add_special_tokens=settings.add_special_tokens, padding=True, return_tensors="pt").to(device)
        width = enc["input_ids"].shape[1]
        budget = settings.max_new_tokens if limit is None else max(1, min(settings.max_new_tokens, limit - width))
        sampling = settings.temperature > 1e-4  # FastChat's rule: below that, greedy
        gen = dict(max_new_tokens=budget, do_sample=sampling, pad_token_id=tok.pad_token_id, eos_token_id=eos)
        if sampling:
            gen.update(temperature=settings.temperature, top_p=settings.top_p)
        with torch.no_grad():
            out = model.generate(**enc, **gen)
        for row in out[:, width:].tolist():
            finished = eos in row
            row = row[: row.index(eos)] if finished else row
            results.append({"text": tok.decode(row, skip_special_tokens=True).strip(), "n_tokens": len(row),
                            "finished": finished})
    return results


def _load_vllm(path: str, tokenizer: str, dtype: str, seed: int):
    from transformers import AutoTokenizer
    from vllm import LLM

    return (AutoTokenizer.from_pretrained(tokenizer),
            LLM(model=path, tokenizer=tokenizer, dtype="bfloat16" if dtype == "bf16" else "float32", seed=seed,
                **eval_vllm_kwargs()))


def _generate_vllm(path: str, prompts: list[str], settings: GenerationSettings, *, device: str,
                   dtype: str, tokenizer: str) -> list[dict]:
    """The seed's engine. Prompts go in as token ids so vLLM adds no BOS of its own."""
    from vllm import SamplingParams

    tok, llm = _loaded("vllm", path, tokenizer, device, dtype, settings.seed)
    params = SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                            max_tokens=settings.max_new_tokens, seed=settings.seed)
    inputs = [{"prompt_token_ids": tok(p, add_special_tokens=settings.add_special_tokens)["input_ids"]}
              for p in prompts]
    outs = llm.generate(inputs, params, use_tqdm=False)
    return [{"text": o.outputs[0].text.strip(), "n_tokens": len(o.outputs[0].token_ids),
             "finished": o.outputs[0].finish_reason == "stop"} for o in outs]


def save_responses(path: str | Path, rows: list[dict]) -> Path:
    """JSONL of generated responses (one object per prompt) for the chapters and for re-judging."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
