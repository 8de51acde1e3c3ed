"""Reading a JSON array of rules out of a model's answer, without ever evaluating it as code.

The extraction and merge prompts ask for a bare JSON array of strings. Reasoning models often wrap it
in a code fence, put prose around it, stop mid-array (token limit), answer with an object, or mix
in non-string items. Each of these is repaired when only one reading is possible, and the repair is
named; anything else is a failure with a reason, never an empty list (an empty list is a legitimate
answer only when the model wrote ``[]``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[ \t]*\n?(.*?)```", re.S)
THINK = re.compile(r"<think>.*?</think>", re.S)
_DECODER = json.JSONDecoder()


@dataclass
class ParsedRules:
    rules: list[str] | None  # None when parsing failed
    repairs: list[str] = field(default_factory=list)  # what was fixed, e.g. "code_fence"
    error: str | None = None  # short reason when failed, e.g. "not_a_list"
    detail: str = ""  # a human-readable elaboration of the error

    @property
    def ok(self) -> bool:
        return self.rules is not None


def _fail(reason: str, detail: str = "", repairs=None) -> ParsedRules:
    return ParsedRules(None, list(repairs or []), reason, detail)


def _json_values(text: str) -> list[tuple[int, int, object]]:
    """Every complete top-level JSON array or object in ``text``: (start, end, value), left to right."""
    out, i = [], 0
    while True:
        starts = [p for p in (text.find("[", i), text.find("{", i)) if p >= 0]
        if not starts:
            return out
        start = min(starts)
        try:
            value, end = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            i = start + 1
            continue
        out.append((start, end, value))
        i = end


def _clean_items(items: list, repairs: list[str]) -> ParsedRules:
    """Strings pass; {"rule": "..."}-style single-string objects are unwrapped; others fail."""
    rules, unwrapped, blanks = [], 0, 0
    for i, item in enumerate(items):
        if isinstance(item, dict):
            strings = [v for v in item.values() if isinstance(v, str)]
            if len(item) == 1 and len(strings) == 1:
                item, unwrapped = strings[0], unwrapped + 1
        if not isinstance(item, str):
            return _fail("non_string_items", f"item {i} is {type(item).__name__}: {json.dumps(item)[:80]}", repairs)
        item = item.strip()
        if item:
            rules.append(item)
        else:
            blanks += 1
    if unwrapped:
        repairs.append(f"unwrapped_{unwrapped}_object_items")
    if blanks:
        repairs.append(f"dropped_{blanks}_blank_items")
    return ParsedRules(rules, repairs)


def _from_value(value: object, repairs: list[str]) -> ParsedRules:
    if isinstance(value, list):
        return _clean_items(value, repairs)
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) == 1 and len(value) == 1:  # {"rules": [...]}: only one reading
            return _clean_items(lists[0], repairs + ["unwrapped_object"])
        return _fail("not_a_list", f"a JSON object with keys {sorted(value)[:5]}", repairs)
    return _fail("not_a_list", f"a JSON {type(value).__name__}", repairs)


def _truncated_array(text: str) -> tuple[list[str], bool] | None:
    """Complete string items of an array that opens but never closes; (items, dropped a partial item)."""
    start = text.find("[")
    if start < 0 or _json_values(text[start:]):
        return None
    items, i = [], start + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            return items, False
        if text[i] != '"':
            return None  # something other than a string list: not a truncation we can read
        try:
            value, i = _DECODER.raw_decode(text, i)
        except json.JSONDecodeError:
            return items, True  # the answer stopped inside this string
        items.append(value)


def parse_rule_list(text: str | None) -> ParsedRules:
    """The rules in an answer that should be a bare JSON array of strings."""
    if text is None or not text.strip():
        return _fail("empty_answer", "the model returned no text")
    repairs: list[str] = []
    if "<think>" in text:
        text = THINK.sub("", text)
        repairs.append("removed_think_block")
    stripped = text.strip()
    try:
        return _from_value(json.loads(stripped), repairs)
    except json.JSONDecodeError:
        pass

    fenced = [m.group(2).strip() for m in FENCE.finditer(stripped)]
    fenced_values = []
    for body in fenced:
        try:
            fenced_values.append(json.loads(body))
        except json.JSONDecodeError:
            continue
    if fenced_values:
        distinct = {json.dumps(v, sort_keys=True) for v in fenced_values}
        if len(distinct) > 1:
            return _fail("ambiguous", f"{len(distinct)} different JSON values in code fences", repairs)
        outside = FENCE.sub("", stripped).strip()
        return _from_value(fenced_values[0], repairs + ["code_fence"] + (["prose_around_array"] if outside else []))

    candidates = [(s, e, v) for s, e, v in _json_values(stripped) if isinstance(v, list)]
    # prose may hold stray arrays such as "[1, 2]" in an example; an array of strings is the answer
    string_lists = [c for c in candidates if all(isinstance(x, str) for x in c[2])]
    candidates = string_lists or candidates
    if candidates:
        distinct = {json.dumps(v, sort_keys=True) for _, _, v in candidates}
        if len(distinct) > 1:
            return _fail("ambiguous", f"{len(distinct)} different JSON arrays in the answer", repairs)
        return _from_value(candidates[0][2], repairs + ["prose_around_array"])
    objects = [v for _, _, v in _json_values(stripped)]
    if len(objects) == 1:
        return _from_value(objects[0], repairs + ["prose_around_array"])

    body = fenced[0] if len(fenced) == 1 else (stripped.split("```", 1)[1] if stripped.count("```") == 1 else stripped)
    truncated = _truncated_array(body)
    if truncated is not None:
        items, partial = truncated
        if not items:
            return _fail("truncated", "the array was cut off before its first complete item", repairs)
        repairs.append("truncated_array" + ("_dropped_partial_item" if partial else ""))
        return _clean_items(items, repairs)
    if "[" in stripped:
        return _fail("not_json", "an array-like answer that is not valid JSON: " + stripped[:80], repairs)
    return _fail("no_array", "no JSON array in the answer: " + stripped[:80], repairs)
