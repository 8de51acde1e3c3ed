"""What a chapter's result depends on, by content: the local data files and the earlier chapters' outputs.

A fingerprint built only from code and settings misses two kinds of change: a retrained reward model
(06-09 would keep results computed from the old one) and an edited data file (01 would say
"unchanged"). So the runner records which files each chapter wrote and folds their *contents* into
every later fingerprint. Identity is by content, never by path or modification time, so a copied or
moved run directory resumes; a small cache (size and mtime -> sha256) keeps large files from being
read again when nothing changed.

Not part of any identity: the runner's own files, checkpoints (the final model is what later chapters
read) and response caches (several chapters append to them; their answers show in the outputs).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..artifacts import write_json
from ..config import Profile
from ..profiles import _source_fields, is_local_source

HASH_CACHE = ".file_hashes.json"
RUNNER_TOP = {"manifest.json", "profile.yaml", "notebooks", "book", "book_src", "slurm", HASH_CACHE}
CACHE_SUFFIXES = (".sqlite", ".sqlite-wal", ".sqlite-shm", ".sqlite-journal", ".db", ".lock", ".guard")


def _excluded(rel: Path) -> bool:
    parts = rel.parts
    return (parts[0] in RUNNER_TOP or any(p.startswith(".") for p in parts)  # dot files: locks, temp writes
            or any(p.startswith("checkpoint-") for p in parts[:-1]) or rel.name.endswith(CACHE_SUFFIXES))


def snapshot(run_dir: str | Path) -> dict[str, tuple[int, int]]:
    """Every identity-bearing file under the run directory: relative path -> (size, mtime_ns)."""
    root = Path(run_dir)
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if not _excluded(rel) and p.is_file():
            st = p.stat()
            out[rel.as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def written_since(before: dict, after: dict) -> list[str]:
    """Files created or changed between two snapshots."""
    return sorted(k for k, v in after.items() if before.get(k) != v)


class FileHashes:
    """sha256 of files, remembered by (path, size, mtime) in ``<run_dir>/.file_hashes.json``.

    The cache only saves reading; a missing or unreadable cache file is rebuilt, never trusted."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / HASH_CACHE
        try:
            self.known = json.loads(self.path.read_text())
            assert isinstance(self.known, dict)
        except (OSError, ValueError, AssertionError):
            self.known = {}
        self.changed = False

    def sha(self, path: Path) -> str | None:
        try:
            st = path.stat()
        except OSError:
            return None
        key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
        hit = self.known.get(key)
        if hit and hit[:2] == stamp:
            return hit[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        self.known[key] = stamp + [h.hexdigest()]
        self.changed = True
        return h.hexdigest()

    def digest(self, root: Path, rels: list[str]) -> str:
        """One hash over the named files' relative paths and contents (absent files count as absent)."""
        h = hashlib.sha256()
        for rel in sorted(rels):
            h.update(f"{rel}:{self.sha(root / rel) or 'absent'}\n".encode())
        return h.hexdigest()[:16]

    def tree_digest(self, path: Path) -> str:
        """A local file or folder by content (relative names inside it, not where it lies)."""
        if path.is_file():
            return self.digest(path.parent, [path.name])
        return self.digest(path, sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()))

    def save(self) -> None:
        if self.changed:
            try:
                write_json(self.path, self.known)
            except OSError:
                pass  # a cache: losing it costs re-reading, nothing else
            self.changed = False


def local_data_digest(profile, hashes: FileHashes) -> str:
    """Content of every local file or folder the profile names (data sources, replay file, prompts...)."""
    parts = []
    for keys in _source_fields(Profile):
        value = profile
        for k in keys:
            value = getattr(value, k)
        if isinstance(value, str) and is_local_source(value) and Path(value).exists():
            parts.append(f"{'.'.join(keys)}={hashes.tree_digest(Path(value))}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
