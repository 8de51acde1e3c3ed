"""A persistent, content-addressed cache of model answers (LLM responses, verifier verdicts).

Keys are the SHA-256 of the canonical JSON of everything that determines an answer (provider, model,
messages, inference parameters, a sample index, template versions...).

Why append-only shards and not one database: on a cluster the run directory sits on a shared (network)
filesystem and ranks on several nodes write verdicts at once; SQLite documents its WAL mode (and its locking
in general) as unreliable there. So every writing process owns one file, ``<name>.shards/<host>-<pid>.jsonl``,
that only it appends to (one JSON line per answer, written with a single ``write``), and readers merge all
shards. No file is ever written by two processes, so no lock is needed; a kill mid-write leaves at most a
torn last line, which readers ignore: an answer is either fully stored or absent, and a re-run makes calls
only for what was not finished. A cache written by an older version (``<name>.sqlite``) is still read.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

REFRESH_S = 1.0  # how often a miss looks for answers other processes appended since (at most)


def cache_key(parts: dict) -> str:
    """Full-length hash of the canonical JSON of ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


class CacheCorruptError(ValueError):
    """A cache shard holds a line that is not a cache record (not merely a torn last line)."""


def _drop_torn_tail(fd: int) -> None:
    """Cut an unfinished last line left by a killed writer (this process is now the shard's only writer)."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    chunk, end = 1 << 16, size
    while end > 0:
        start = max(0, end - chunk)
        i = os.pread(fd, end - start, start).rfind(b"\n")
        if i >= 0:
            os.ftruncate(fd, start + i + 1)
            return
        end = start
    os.ftruncate(fd, 0)


class ResponseCache:
    """``get``/``put``/``in``/``len`` over every process's shard; ``path`` names the cache (``x.sqlite`` keeps
    its old name: the shards live in ``x.shards/`` beside it)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.dir = self.path.with_suffix(".shards")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._answers: dict[str, str] = {}  # key -> the answer's JSON text
        self._offsets: dict[Path, int] = {}  # bytes of each shard already merged
        self._fd: int | None = None
        self._fd_pid: int | None = None
        self._last_refresh = 0.0
        self._read_legacy()
        self._refresh()

    # ---------------------------------------------------------------- reading

    def _read_legacy(self) -> None:
        """Answers of a pre-shard SQLite cache, opened read-only and immutable (no WAL, no locks, no writes)."""
        if not self.path.is_file():
            return
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True)
            try:
                self._answers.update(conn.execute("SELECT key, value FROM answers").fetchall())
            finally:
                conn.close()
        except sqlite3.DatabaseError as e:
            raise CacheCorruptError(f"{self.path}: not a readable cache ({e}); move it aside to start a fresh "
                                    "cache") from None

    def _refresh(self) -> None:
        """Merge what every shard gained since the last look; a torn last line is left for the next look."""
        with self._lock:
            self._last_refresh = time.monotonic()
            for shard in sorted(self.dir.glob("*.jsonl")):
                start = self._offsets.get(shard, 0)
                try:
                    with open(shard, "rb") as f:
                        f.seek(start)
                        data = f.read()
                except FileNotFoundError:
                    continue
                end = data.rfind(b"\n") + 1  # only whole lines
                for n, line in enumerate(data[:end].splitlines()):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        self._answers[rec["k"]] = rec["v"]
                    except (ValueError, KeyError, TypeError):
                        raise CacheCorruptError(f"{shard}: line after byte {start} is not a cache record; move "
                                                "the file aside (its answers are then asked again)") from None
                self._offsets[shard] = start + end

    def _lookup(self, parts: dict) -> str | None:
        key = cache_key(parts)
        hit = self._answers.get(key)
        if hit is None and time.monotonic() - self._last_refresh >= REFRESH_S:
            self._refresh()  # another process may have answered it meanwhile
            hit = self._answers.get(key)
        return hit

    def get(self, parts: dict) -> Any | None:
        hit = self._lookup(parts)
        return None if hit is None else json.loads(hit)

    def __contains__(self, parts: dict) -> bool:
        return self._lookup(parts) is not None

    def __len__(self) -> int:
        self._refresh()
        return len(self._answers)

    # ---------------------------------------------------------------- writing

    def _shard_fd(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._fd_pid != pid:  # a forked child gets its own shard
            shard = self.dir / f"{socket.gethostname()}-{pid}.jsonl"
            self._fd = os.open(shard, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            self._fd_pid = pid
            _drop_torn_tail(self._fd)  # a reused pid: the dead owner's torn line must not prefix ours
        return self._fd

    def put(self, parts: dict, value: Any) -> None:
        key, text = cache_key(parts), json.dumps(value, ensure_ascii=False)
        line = (json.dumps({"k": key, "v": text}, ensure_ascii=False) + "\n").encode()
        with self._lock:
            fd = self._shard_fd()
            written = os.write(fd, line)
            while written < len(line):  # a short write (signal, full quota): finish the line
                written += os.write(fd, line[written:])
            self._answers[key] = text

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self._fd_pid == os.getpid():
                os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
