"""Keeping secrets out of notebooks, logs, artifacts and the book.

Secrets come from the environment only. After a stage runs, everything it wrote is scanned for the
values of the secret variables present; any hit is replaced and reported, so a leak is both fixed
and visible.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_BEARER_TOKEN_BEDROCK",
                   "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY")
SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY)", re.I)
MIN_SECRET_LEN = 8  # shorter values would match ordinary text
REPLACEMENT = "[REDACTED]"
TEXT_SUFFIXES = {".ipynb", ".json", ".jsonl", ".tsv", ".csv", ".txt", ".md", ".yaml", ".yml", ".log", ".html", ".js"}


def secret_values(environ=None) -> dict[str, str]:
    """Values of the known secret variables and any variable whose name looks like one."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items()
            if (k in SECRET_ENV_VARS or SECRET_NAME.search(k)) and v and len(v) >= MIN_SECRET_LEN}


def redact(text: str, secrets: dict[str, str] | None = None) -> str:
    for value in (secrets if secrets is not None else secret_values()).values():
        text = text.replace(value, REPLACEMENT)
    return text


def scrub_tree(root: str | Path, secrets: dict[str, str] | None = None) -> list[str]:
    """Redact secret values in every text file under ``root``; returns 'path: VAR' per hit."""
    secrets = secret_values() if secrets is None else secrets
    hits = []
    if not secrets:
        return hits
    for path in Path(root).rglob("*"):
        if not path.is_file() or path.suffix not in TEXT_SUFFIXES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        found = [name for name, value in secrets.items() if value in text]
        if found:
            path.write_text(redact(text, secrets), encoding="utf-8")
            hits.extend(f"{path}: {name}" for name in found)
    return hits
