"""Run artifacts: atomic writes, reading back with errors that name the chapter to run, and the provenance
every artifact carries. Where each artifact lives is ``layout.RunLayout``'s business."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import PROJECT_ROOT, Profile

TRACKED_PACKAGES = ("autorule-book", "torch", "transformers", "trl", "datasets", "accelerate", "tokenizers",
                    "papermill", "jupyter-book", "boto3", "vllm", "deepspeed", "alpaca-eval")


class MissingArtifactError(FileNotFoundError):
    """An input from an earlier chapter is absent; the message says which chapter makes it."""


class CorruptFileError(ValueError):
    """A file the project wrote cannot be read back; the message names it and says what to do."""


class WriteError(OSError):
    """A write failed (disk full, permissions); the message names the file. Nothing half-written is left."""


def package_versions(names=TRACKED_PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str:
    """HEAD of the project checkout, '+dirty' if tracked files changed; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def provenance(profile: Profile, stage: str, **extra: Any) -> dict:
    """What is needed to trace a number back: profile and its hash, models, seeds, code and packages."""
    return {
        "stage": stage,
        "profile": profile.name,
        "profile_hash": profile.hash(),
        "seed": profile.seed,
        "models": {"policy": profile.models.policy, "verifier": profile.models.verifier,
                   "tokenizer": profile.models.tokenizer or profile.models.policy},
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "created_at": now(),
        **extra,
    }


def files_stamp(path: str | Path, suffixes: tuple[str, ...] | None = None) -> str:
    """Identity of a file or folder without reading its contents: its path and each file's name, size
    and modification time (only files ending in ``suffixes``, when given). Rewriting a file changes it."""
    path = Path(path).resolve()
    root, files = (path.parent, [path]) if path.is_file() else (path, sorted(path.rglob("*")))
    entries = [str(path)]
    for f in files:
        if f.is_file() and (suffixes is None or f.suffix in suffixes):
            st = f.stat()
            entries.append(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:20]


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write via a temporary file and rename, so a crash never leaves a half-written artifact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | Path, made_by: str | None = None) -> Any:
    path = Path(path)
    if not path.exists():
        hint = f"; run chapter {made_by} first (autorule run --only {made_by})" if made_by else ""
        raise MissingArtifactError(f"{path} not found{hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fix = (f"re-run chapter {made_by} with --force (autorule run --only {made_by} --force)" if made_by
               else "move it aside and re-run the chapter that writes it")
        raise CorruptFileError(f"{path} is corrupt ({e}); {fix}") from None


def require(path: str | Path, made_by: str) -> Path:
    """An input from an earlier chapter, or an error naming the chapter that makes it."""
    path = Path(path)
    if not path.exists():
        raise MissingArtifactError(f"{path} not found; run chapter {made_by} first (autorule run --only {made_by})")
    return path
