"""One run at a time per run directory.

Two ``autorule run`` on one directory both train, and each overwrites what the other's later chapters
read (one run's RM normalisation was computed from the other's RM). A lock file created with
``O_EXCL`` says who holds the directory. A lock left by a process that died (SIGKILL, a lost node) is
detected from its pid and taken over; on another host the pid cannot be checked, so the message says
how to remove the lock when that run is known to be gone.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..artifacts import now

LOCK_NAME = ".run.lock"


class RunLocked(RuntimeError):
    """Another live run holds the run directory."""


def _process_start(pid: int) -> str | None:
    """The kernel's start tick of ``pid`` (Linux), so a recycled pid is not taken for the lock owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return start is None or _process_start(pid) in (None, start)


class RunLock:
    """``with RunLock(run_dir):`` holds the directory for this process; leaving the block releases it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.taken_over: dict | None = None  # the stale lock this process replaced, if any

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as stale below only if it stays so

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
              "since": now(), "slurm_job": os.environ.get("SLURM_JOB_ID")}
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile: try again
                requeued = bool(me["slurm_job"]) and holder.get("slurm_job") == me["slurm_job"]
                if requeued:  # an earlier start of this same SLURM job, killed on requeue (maybe elsewhere)
                    pass
                elif holder.get("host") not in (None, me["host"]):
                    raise RunLocked(f"{self.path.parent} is in use by a run on host {holder['host']} (pid "
                                    f"{holder.get('pid')}, since {holder.get('since')}); if that run is gone, "
                                    f"delete {self.path} and re-run") from None
                pid = holder.get("pid")
                if not requeued and isinstance(pid, int) and _alive(pid, holder.get("start")):
                    raise RunLocked(f"{self.path.parent} is in use by another run (pid {pid}, since "
                                    f"{holder.get('since')}); wait for it to finish, or pass another "
                                    f"--output-dir") from None
                if not holder and time.time() - self._mtime() < 5:
                    time.sleep(0.2)  # just created, its owner is still writing it
                    continue
                # stale: remove it under a guard, only if it is still the same stale lock (two processes
                # that both saw it dead must not remove the lock the first of them has just taken)
                with open(self.path.with_name(LOCK_NAME + ".guard"), "a") as guard:
                    fcntl.flock(guard, fcntl.LOCK_EX)
                    if self._holder() == holder:
                        self.path.unlink(missing_ok=True)
                        self.taken_over = holder
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise RunLocked(f"could not take the lock {self.path}: it keeps changing hands; is another run starting?")

    def release(self) -> None:
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
