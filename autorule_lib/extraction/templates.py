"""The three extraction prompts (explain, extract, merge): editable files in ``prompts/`` with checked
placeholders and a content version recorded with every rule set.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from .sampling import Example, serialize_conversation
from ..config import PROMPTS_DIR

STEPS = ("explain", "extract", "merge")
PLACEHOLDERS = {"explain": {"conversation_a", "conversation_b", "winner"},
                "extract": {"source_text", "winner_letter"}, "merge": {"rules"}}
PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


# ---------------------------------------------------------------- prompt templates

@dataclass
class PromptTemplate:
    name: str
    version: str
    body: str
    path: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body.encode()).hexdigest()

    @property
    def prefix(self) -> str:
        """The fixed text before the first placeholder: tells which step a prompt belongs to."""
        return self.body[: PLACEHOLDER.search(self.body).start()]

    def render(self, **fields: str) -> str:
        return PLACEHOLDER.sub(lambda m: fields[m.group(1)] if m.group(1) in fields else m.group(0), self.body)


def load_templates(prompts_dir: str | Path | None = None) -> dict[str, PromptTemplate]:
    """``explain.txt``, ``extract.txt``, ``merge.txt``: a ``version:`` header, ``---``, then the text."""
    out = {}
    for name in STEPS:
        path = Path(prompts_dir or PROMPTS_DIR) / f"{name}.txt"
        header, sep, body = path.read_text(encoding="utf-8").partition("\n---\n")
        version = next((line.split(":", 1)[1].strip() for line in header.splitlines()
                        if line.startswith("version:")), None)
        if not sep or not version:
            raise ValueError(f"{path}: expected a 'version: ...' header line, then a line '---', then the prompt")
        body = body.strip("\n")
        found = set(PLACEHOLDER.findall(body))
        if found != PLACEHOLDERS[name]:
            raise ValueError(f"{path}: placeholders {sorted(found)}, expected exactly {sorted(PLACEHOLDERS[name])}")
        out[name] = PromptTemplate(name, version, body, str(path))
    return out


def template_versions(templates: dict[str, PromptTemplate]) -> dict[str, dict]:
    return {t.name: {"version": t.version, "sha256": t.sha256} for t in templates.values()}


def step_of(messages: list[dict], templates: dict[str, PromptTemplate]) -> str | None:
    """Which step rendered this prompt (used by loopback test servers and the replay recorder)."""
    text = messages[-1]["content"]
    return next((name for name, t in templates.items() if text.startswith(t.prefix)), None)


def explain_messages(ex: Example, templates: dict[str, PromptTemplate]) -> list[dict]:
    text = templates["explain"].render(conversation_a=serialize_conversation(ex.conversation_a),
                                       conversation_b=serialize_conversation(ex.conversation_b), winner=ex.winner)
    return [{"role": "user", "content": text}]  # no system prompt (book/method.md §2)


def extract_messages(source_text: str, winner_letter: str, templates: dict[str, PromptTemplate]) -> list[dict]:
    return [{"role": "user", "content": templates["extract"].render(source_text=source_text,
                                                                    winner_letter=winner_letter)}]


def merge_messages(rules: list[str], templates: dict[str, PromptTemplate]) -> list[dict]:
    return [{"role": "user", "content": templates["merge"].render(rules="\n".join(f"- {r}" for r in rules))}]
