"""Several training processes (``accelerate launch``): which rank this is, its device, and waiting for rank 0.

Rank 0 writes every shared file (checkpoints, ``done.json``); the other ranks wait for it with a timeout
and a clear error, so a crash on one rank never leaves the others waiting forever.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..config import Profile
from ..models import default_device, pick_device


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


DONE_TIMEOUT_S = float(os.environ.get("AUTORULE_RANK_WAIT_S", 4 * 3600))  # a 70B save on slow storage fits


def wait_for_file(path: Path, ready: Callable[[], bool], what: str, timeout_s: float | None = None) -> None:
    """Wait until ``ready()`` (rank 0 writes ``path``), polling the filesystem, not a collective: a long save
    on rank 0 must not trip NCCL's barrier timeout, and a rank 0 that died gives a clear error, not a hang."""
    import time

    timeout_s = DONE_TIMEOUT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {os.environ.get('RANK', '0')}: {path} did not appear within {timeout_s:.0f} s "
                               f"({what}); see rank 0's log for its error (AUTORULE_RANK_WAIT_S sets the wait)")
        time.sleep(0.5)


def dist_state():
    """accelerate's process state, created as the Trainer will create it: a CPU run's ranks (ACCELERATE_USE_CPU,
    set by ``training_stages.run_stage``) form a gloo group. Whoever creates it first fixes it for the process,
    so every call here must agree with TrainingArguments(use_cpu=...)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def rank_device(profile: Profile | None = None) -> str:
    """This process's device as accelerate set it (creating its state first when needed): under several
    processes rank k's models go to cuda:k, never all to cuda:0. One process: the profile's device."""
    if world_size() > 1:
        return str(dist_state().device)
    return pick_device(profile) if profile is not None else default_device()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
