"""A persistent, content-addressed cache of model answers (LLM responses, verifier verdicts).

Keys are the SHA-256 of the canonical JSON of everything that determines an answer (provider, model,
messages, inference parameters, a sample index, template versions...). SQLite in WAL mode makes it
safe under concurrent writers (threads and processes) and durable across crashes: an answer is either
fully stored or absent, so a re-run makes calls only for what was not finished.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any


def cache_key(parts: dict) -> str:
    """Full-length hash of the canonical JSON of ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as c:
            c.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                      "created REAL DEFAULT (julianday('now')))")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:  # one connection per thread; sqlite3 connections are not shareable
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def get(self, parts: dict) -> Any | None:
        row = self._conn().execute("SELECT value FROM answers WHERE key = ?", (cache_key(parts),)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, parts: dict, value: Any) -> None:
        self._conn().execute("INSERT OR REPLACE INTO answers (key, value) VALUES (?, ?)",
                             (cache_key(parts), json.dumps(value, ensure_ascii=False)))

    def __contains__(self, parts: dict) -> bool:
        return self._conn().execute("SELECT 1 FROM answers WHERE key = ?", (cache_key(parts),)).fetchone() is not None

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM answers").fetchone()[0]
