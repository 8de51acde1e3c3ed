"""One device and engine policy for the chapters that load several models into one process.

Why: the evaluation chapters load, one after the other, the checkpoint being sampled (a vLLM engine
or a transformers model), a local judge, the reward model, the verifier and alpaca_eval's own vLLM
engine. A vLLM engine reserves a fixed share of the GPU when it starts (vLLM 0.27.1's default: 0.92) and keeps
it until it is shut down, so an engine that is still held when the next one starts makes that one fail
with "not enough free memory" — on a GPU only; on CPU nothing shows. The policy, in code so that a
test can check it without a GPU:

* every holder of a large model registers a release function here; ``make_room(owner)`` releases every
  other holder before ``owner`` loads (one large model at a time; a released holder reloads lazily the
  next time it is used);
* alpaca_eval keeps its engine in a module global (``alpaca_eval.decoders.vllm_local.llm``): it is
  dropped here too;
* a vLLM engine gets ``gpu_memory_utilization`` from the profile (``vllm_kwargs``), never vLLM's default;
* a verifier engine inside training processes is refused when there are several of them (one engine per
  rank, each asking for its share of the same GPUs): that layout is a server (``vllm_server``).

The README's "What runs where" table states the resulting placement per profile and chapter.
"""
from __future__ import annotations

import gc
import os
import sys
import threading
from typing import Callable

from .config import ConfigError

_HOLDERS: dict[str, Callable[[], None]] = {}
_LOCK = threading.RLock()
# What happened, in order ("release <owner>", "load <owner>"): the chapters print nothing from it; the
# tests read it to check the order on machines where memory cannot show it.
EVENTS: list[str] = []


def register(owner: str, release_fn: Callable[[], None]) -> None:
    """``owner`` now holds a large model; ``release_fn`` frees it (and must leave the owner able to reload)."""
    with _LOCK:
        _HOLDERS[owner] = release_fn
        EVENTS.append(f"load {owner}")


def forget(owner: str) -> None:
    """``owner`` released its model by itself."""
    with _LOCK:
        _HOLDERS.pop(owner, None)


def holders() -> list[str]:
    with _LOCK:
        return list(_HOLDERS)


def make_room(owner: str | None = None) -> None:
    """Release every registered holder except ``owner``, then alpaca_eval's engine, then free the memory."""
    with _LOCK:
        for name in [n for n in _HOLDERS if n != owner]:
            release_fn = _HOLDERS.pop(name)
            EVENTS.append(f"release {name}")
            release_fn()
    release_alpaca_eval_engine()
    free_accelerator_memory()


def release_all() -> None:
    make_room(None)


def release_alpaca_eval_engine() -> bool:
    """Drop the vLLM engine alpaca_eval keeps between calls; True when there was one."""
    mod = sys.modules.get("alpaca_eval.decoders.vllm_local")  # never imported here: it imports vllm
    if mod is None or getattr(mod, "llm", None) is None:
        return False
    engine = mod.llm
    mod.llm, mod.llmModelName, mod.tokenizer = None, None, None
    shutdown_vllm(engine)
    EVENTS.append("release alpaca_eval")
    return True


def shutdown_vllm(engine) -> None:
    """Stop a ``vllm.LLM``'s engine core now rather than whenever the garbage collector gets to it.

    vLLM 0.27's ``LLM`` runs its engine core in a child process; ``llm_engine.engine_core.shutdown()``
    ends it (what vLLM itself calls at exit). A missing attribute means another vLLM layout: the
    reference is dropped and the collector does the rest.
    """
    core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception:  # a dying engine must not take the chapter with it
            pass
    del engine
    gc.collect()


def free_accelerator_memory() -> None:
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vllm_kwargs(share: float) -> dict:
    """Engine arguments every vLLM engine of the book gets: an explicit memory share, checked."""
    if not 0.0 < share <= 0.95:
        raise ConfigError(f"gpu_memory_utilization {share}: must be in (0, 0.95] (a share of one GPU's memory)")
    return {"gpu_memory_utilization": share}


_EVAL_SHARE = {"gpu_memory_utilization": 0.85}


def configure(profile) -> None:
    """The evaluation chapters' vLLM share, from the profile (``evaluation.vllm_gpu_memory_utilization``)."""
    _EVAL_SHARE["gpu_memory_utilization"] = vllm_kwargs(profile.evaluation.vllm_gpu_memory_utilization)[
        "gpu_memory_utilization"]


def eval_vllm_kwargs() -> dict:
    """Engine arguments of an evaluation-chapter vLLM engine (generation, a local judge)."""
    return vllm_kwargs(_EVAL_SHARE["gpu_memory_utilization"])


def training_world_size() -> int:
    """Processes of the current training launch (accelerate/torchrun set WORLD_SIZE); 1 outside one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def check_verifier_engine_layout(backend: str, world_size: int | None = None) -> None:
    """Refuse an in-process vLLM verifier in a multi-process launch: every rank would start its own engine
    on its GPU, each reserving its share beside a ZeRO-3 shard of the policy."""
    world = training_world_size() if world_size is None else world_size
    if backend == "vllm" and world > 1:
        raise ConfigError(
            f"verifier.backend 'vllm' in a launch of {world} processes would start one vLLM engine per rank; "
            "serve the verifier once instead (verifier.backend: vllm_server with api_base_url, started by "
            "`autorule slurm` on its own GPUs; README: What runs where)")
