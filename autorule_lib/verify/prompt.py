"""The judge prompt: the editable templates in ``prompts/``, rendered with the verifier's chat template,
and their token ids with the conversation as a shared prefix of every rule's prompt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..config import PROMPTS_DIR, VerifierConfig
from ..text_format import ASSISTANT, USER, verifier_conversation
from .verdict import NO, YES

CONCISE_CLAUSE = " and does so concisely"
TEMPLATE_FILES = {"rule_first": "verifier_rule_first.txt", "conversation_first": "verifier_conversation_first.txt"}
PLACEHOLDERS = ("rule", "conversation", "concise_clause")


# ---------------------------------------------------------------- the judge prompt

@dataclass(frozen=True)
class VerifierTemplate:
    """The judge's user message with ``{rule}``, ``{conversation}`` and ``{concise_clause}`` slots."""

    layout: str
    body: str
    declared_version: str
    concise_clause: bool

    @property
    def version(self) -> str:
        # The text's own hash is part of the version, so editing the file can never reuse stale verdicts.
        digest = hashlib.sha256(self.body.encode()).hexdigest()[:8]
        return f"{self.declared_version}+{digest}+{'concise' if self.concise_clause else 'plain'}"

    def user_message(self, rule: str, conversation: str) -> str:
        values = {"rule": rule.strip(), "conversation": conversation,
                  "concise_clause": CONCISE_CLAUSE if self.concise_clause else ""}
        # One pass, so a rule or response that happens to contain "{conversation}" is left as text.
        return re.sub(r"\{(rule|conversation|concise_clause)\}", lambda m: values[m.group(1)], self.body)


def load_template(layout: str, concise_clause: bool = True, path: str | Path | None = None) -> VerifierTemplate:
    """Read a template file: leading ``#`` lines are comments (``# version: x`` names it), the rest is the body.

    Body lines marked ``?concise `` belong to the conciseness criterion and are kept only with it on;
    lines marked ``?plain `` only with it off (the older variant), so both variants live in one file.
    """
    path = Path(path) if path else PROMPTS_DIR / TEMPLATE_FILES[layout]
    lines = path.read_text(encoding="utf-8").splitlines()
    version = None
    while lines and lines[0].startswith("#"):
        m = re.match(r"#\s*version:\s*(\S+)", lines.pop(0))
        version = m.group(1) if m else version
    keep, drop = ("?concise ", "?plain ") if concise_clause else ("?plain ", "?concise ")
    lines = [x[len(keep):] if x.startswith(keep) else x for x in lines if not x.startswith(drop)]
    body = "\n".join(lines).strip("\n")
    missing = [p for p in PLACEHOLDERS if "{" + p + "}" not in body]
    if missing or not version:
        raise ValueError(f"{path}: judge template needs a '# version:' line and the slots {missing or PLACEHOLDERS}")
    return VerifierTemplate(layout, body, version, concise_clause)


def messages_conversation(messages: Sequence[dict], eos_token: str | None = None) -> str:
    """A multi-turn chat in the policy's text format, EOS stripped: <|user|>q1<|assistant|>a1<|user|>q2...

    ``verifier_conversation`` is the one-turn case; MT-Bench turn-2 judgments need both turns.
    """
    if len(messages) == 2:
        return verifier_conversation(messages[0]["content"], messages[1]["content"], eos_token)
    marks = {"user": USER, "assistant": ASSISTANT}
    return "".join(marks[m["role"]] + m["content"] for m in messages)


# ---------------------------------------------------------------- prompts as token ids (local backends)

def render_prompt(tokenizer, template: VerifierTemplate, conversation: str, rule: str) -> str:
    """The judge prompt as the verifier model sees it: its own chat template, ready for the answer."""
    messages = [{"role": "user", "content": template.user_message(rule, conversation)}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


RULE_SLOT = "\ue000rule\ue000"  # private-use characters: never part of a real rule or conversation


@dataclass
class PieceMemo:
    """Rule pieces tokenized and checked once per judge, not once per call: a GRPO run asks about the
    same rules at every step. A rule's check is keyed on the rule piece and the head's last line
    (template text in both layouts), so it serves every conversation."""

    encoded: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    checked: dict[tuple[str, str], bool] = dataclasses.field(default_factory=dict)
    max_entries: int = 4096

    def trim(self) -> None:
        if len(self.encoded) + len(self.checked) > self.max_entries:
            self.encoded.clear()
            self.checked.clear()


def prompt_token_ids(tokenizer, template: VerifierTemplate, items: Sequence[tuple[str, str]],
                     truncate: int | None = None, memo: PieceMemo | None = None) -> list[list[int]]:
    """Token ids of each judge prompt; the chat template brings its own BOS, so none is added here.

    Each prompt is two pieces, the text before the rule (the head) and the rule onwards, cut where the
    tokenizer's pre-tokenizer splits anyway (before the space that starts the rule). Every conversation
    is tokenized whole once, with its first rule: its head ids are the tokens before that rule's piece,
    and the conversation is tokenized whole for every rule if they do not end with it. Every rule piece
    is tokenized once (once per ``memo``: a GRPO run judges the same rules at every step) and checked
    with one conversation against whole-prompt tokenization; a rule that fails is tokenized whole. With
    the ``rule_first`` layout nothing is shared (each rule piece holds the conversation): all whole.
    ``truncate`` keeps the first N tokens (the original's right truncation: a long response loses its
    end and the answer instructions).
    """
    memo = memo if memo is not None else PieceMemo()
    memo.trim()
    cuts: dict[str, tuple[str, str] | None] = {}
    for conv, _ in items:
        if conv not in cuts:
            text = render_prompt(tokenizer, template, conv, RULE_SLOT)
            i = text.find(RULE_SLOT)
            ok = i >= 2 and text.count(RULE_SLOT) == 1 and text[i - 1] == " " and not text[i - 2].isspace()
            cuts[conv] = (text[:i - 1], text[i + len(RULE_SLOT):]) if ok else None
    piece = lambda conv, rule: " " + rule.strip() + cuts[conv][1]  # noqa: E731
    # A rule's check holds wherever the head ends in the same line (the template's, e.g. "\nRule:").
    rule_key = lambda conv, rule: (cuts[conv][0][cuts[conv][0].rfind("\n") + 1:], piece(conv, rule))  # noqa: E731
    if len({piece(c, r) for c, r in items if cuts[c]}) + len(cuts) >= len(items):
        cuts = dict.fromkeys(cuts)  # nothing shared (rule_first)
    first_rule: dict[str, str] = {}  # conversation -> the rule it is tokenized whole with
    first_conv: dict[str, str] = {}  # rule not checked before -> the conversation it is checked with
    bad_rules = set()
    for conv, rule in items:
        if cuts[conv]:
            known = memo.checked.get(rule_key(conv, rule))
            if known is False:
                bad_rules.add(rule)
                continue
            first_rule.setdefault(conv, rule)
            if known is None:
                first_conv.setdefault(rule, conv)
    checks = set(first_rule.items()) | {(c, r) for r, c in first_conv.items()}
    whole_texts = {check: render_prompt(tokenizer, template, *check) for check in checks}
    pieces = {piece(c, r) for c, r in items if cuts[c]}
    texts = sorted((pieces - memo.encoded.keys()) | set(whole_texts.values()))
    encoded = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else {}
    encoded.update({x: memo.encoded[x] for x in pieces & memo.encoded.keys()})
    heads: dict[str, list[int]] = {}
    for conv, rule in first_rule.items():
        whole, tail = encoded[whole_texts[(conv, rule)]], encoded[piece(conv, rule)]
        if len(whole) > len(tail) and whole[len(whole) - len(tail):] == tail:
            heads[conv] = whole[:len(whole) - len(tail)]
    for rule, conv in first_conv.items():
        if conv in heads:
            ok = encoded[whole_texts[(conv, rule)]] == heads[conv] + encoded[piece(conv, rule)]
            memo.checked[rule_key(conv, rule)] = ok
            if not ok:
                bad_rules.add(rule)
        else:  # unchecked here: this call tokenizes it whole
            bad_rules.add(rule)
    memo.encoded.update({x: encoded[x] for x in pieces})
    ids = [heads[conv] + encoded[piece(conv, rule)] if conv in heads and rule not in bad_rules else None
           for conv, rule in items]
    whole = [j for j, x in enumerate(ids) if x is None]
    if whole:
        texts = [render_prompt(tokenizer, template, *items[j]) for j in whole]
        for j, x in zip(whole, tokenizer(texts, add_special_tokens=False)["input_ids"]):
            ids[j] = x
    return [x[:truncate] for x in ids] if truncate else ids


def verifier_prompt_ids(tokenizer, template: VerifierTemplate, items: Sequence[tuple[str, str]], cfg: VerifierConfig,
                     memo: PieceMemo | None = None) -> tuple[list[list[int]], list[bool]]:
    """Each item's prompt ids, truncated as ``cfg`` asks, and whether an answer with no verdict is a 0.

    It is with ``unparseable_as_no``, and always for a prompt the truncation cut: the original's
    truncation quirk drops the answer instructions, and the original scored what followed as 0 — a
    truncated prompt left unscored would reproduce half of the quirk.
    """
    ids = prompt_token_ids(tokenizer, template, items, None, memo)
    n = cfg.truncate_prompt_tokens
    zero = [cfg.unparseable_as_no or bool(n and len(x) > n) for x in ids]
    return ([x[:n] for x in ids] if n else ids), zero


@dataclass(frozen=True)
class AnswerTokens:
    """How the two answers tokenize: their common start (forced in fast mode) and the first differing token."""

    prefix: tuple[int, ...]
    yes: int
    no: int


def answer_tokens(tokenizer) -> AnswerTokens:
    yes = tokenizer(YES, add_special_tokens=False)["input_ids"]
    no = tokenizer(NO, add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(yes), len(no)) and yes[n] == no[n]:
        n += 1
    if n >= min(len(yes), len(no)):
        raise ValueError(f"the tokenizer does not tell {YES} from {NO} at any token")
    return AnswerTokens(tuple(yes[:n]), yes[n], no[n])
