"""The rule verifier (book/method.md §3): one verdict per (conversation, rule).

A verdict is 1 (the response follows the rule), 0 (it does not) or *unscored* with a reason. An
unscored check is counted and reported, never turned into a silent 0.

Two modes, one judge prompt (an editable template in ``prompts/``):

* ``parity`` — the paper's judge: the prompt rendered with the verifier's chat template, greedy
  generation up to ``max_new_tokens``, verdict 1 if the output contains ``[[Yes]]``. An answer with
  neither ``[[Yes]]`` nor ``[[No]]`` is a 0 as in the original, with the reason ``no_verdict`` so it is
  counted (``unparseable_as_no: false`` makes it unscored instead). A backend failure (no answer at
  all) is always unscored, never a 0.
* ``fast`` — one forward pass per (response, rule): the common start of the two answers (``[[``) is
  appended to the prompt and the verdict read from the next-token probabilities of ``Yes`` vs ``No``.
  With the ``conversation_first`` layout all rules of one response share the conversation as a prompt
  prefix: it is encoded once and every rule's short suffix attends to it (``shared_prefix.py``).

Backends (transformers, vLLM, API clients) live in ``verifier_backends.py``; this module holds the
prompt, the verdict contract, the persistent cache and the bookkeeping.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .config import Profile, VerifierConfig

YES, NO = "[[Yes]]", "[[No]]"
CONCISE_CLAUSE = " and does so concisely"
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
TEMPLATE_FILES = {"rule_first": "verifier_rule_first.txt", "conversation_first": "verifier_conversation_first.txt"}
PLACEHOLDERS = ("rule", "conversation", "concise_clause")
OUTPUT_CLIP = 400  # characters of judge output kept with a verdict (enough to see why it failed to parse)


# ---------------------------------------------------------------- the judge prompt

@dataclass(frozen=True)
class JudgeTemplate:
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


def load_template(layout: str, concise_clause: bool = True, path: str | Path | None = None) -> JudgeTemplate:
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
    return JudgeTemplate(layout, body, version, concise_clause)


# ---------------------------------------------------------------- verdicts

@dataclass
class Verdict:
    value: int | None              # 1 follows the rule, 0 does not, None unscored
    reason: str | None = None      # why unscored (or why a 0 was imposed); None for a clean verdict
    p_yes: float | None = None     # P(Yes | the judge answers Yes or No), where the backend exposes it
    answer_mass: float | None = None  # P(the judge answers [[Yes]] or [[No]] at all), fast mode
    output: str | None = None      # the judge's text (generation modes), clipped
    cached: bool = False

    @property
    def scored(self) -> bool:
        return self.value is not None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("cached")
        return d

    @classmethod
    def from_json(cls, d: dict, cached: bool = False) -> "Verdict":
        return cls(**d, cached=cached)


def unscored(reason: str, **kw) -> Verdict:
    return Verdict(None, reason, **kw)


def reason_kind(reason: str | None) -> str:
    """'backend_error: Timeout ...' -> 'backend_error' (the counter key)."""
    return (reason or "").split(":")[0].split(" (")[0].strip()


NO_VERDICT = "no_verdict"  # reason of a 0 given to an answer holding neither verdict (the original's rule)


def parse_verdict(text: str | None, unparseable_as_no: bool = True) -> Verdict:
    """The paper's test: ``[[Yes]]`` anywhere in the output means 1; ``[[No]]`` means 0; anything else
    is 0 with the reason ``no_verdict`` (the original's substring test), or unscored when not
    ``unparseable_as_no`` (the stricter reading)."""
    text = text or ""
    clipped = text[:OUTPUT_CLIP]
    if YES in text:
        return Verdict(1, output=clipped)
    if NO in text:
        return Verdict(0, output=clipped)
    if unparseable_as_no:  # the original's substring test: anything without [[Yes]] is a 0 — still counted
        return Verdict(0, reason=f"{NO_VERDICT} (counted as 0)", output=clipped)
    return unscored("unparseable", output=clipped)


# ---------------------------------------------------------------- the verifier

class RuleVerifier:
    """Judges conversations under rules through one backend, with a persistent verdict cache and counters.

    ``stats`` counts every check: ``checks``, ``cache_hits``, ``model_checks`` (sent to the backend),
    ``yes``, ``no``, ``unscored`` and ``unscored:<kind>`` per reason.
    """

    def __init__(self, backend, template: JudgeTemplate, cfg: VerifierConfig, verifier_id: str,
                 mode: str | None = None, cache=None):
        self.backend, self.template, self.cfg, self.verifier_id = backend, template, cfg, verifier_id
        self.mode = mode or cfg.mode
        if self.mode == "fast" and not getattr(backend, "supports_fast", False):
            raise ValueError(f"verifier mode 'fast' needs next-token probabilities; backend {backend.name!r} "
                             "only generates (use mode: parity, or backend transformers/vllm)")
        self.cache = cache if cfg.use_cache else None
        self.reuse_prefix = True  # fast mode: encode shared prompt prefixes once (benchmarks turn it off)
        self.stats: Counter = Counter()

    def variant(self, mode: str | None = None, layout: str | None = None) -> "RuleVerifier":
        """The same judge (model, cache) in another mode or prompt layout; counters start at zero."""
        template = load_template(layout, self.template.concise_clause) if layout else self.template
        cfg = dataclasses.replace(self.cfg, mode=mode or self.mode, layout=template.layout)
        return RuleVerifier(self.backend, template, cfg, self.verifier_id, cfg.mode, self.cache)

    def describe(self) -> dict:
        return {"verifier_id": self.verifier_id, "backend": self.backend.name, "mode": self.mode,
                "layout": self.template.layout, "template_version": self.template.version,
                "concise_clause": self.template.concise_clause, "max_new_tokens": self.cfg.max_new_tokens,
                "truncate_prompt_tokens": self.cfg.truncate_prompt_tokens, "min_answer_mass": self.cfg.min_answer_mass,
                "unparseable_as_no": self.cfg.unparseable_as_no}

    def cache_parts(self, conversation: str, rule: str) -> dict:
        """Everything that fixes a verdict: judge, template, decoding settings, the rule and the exact text."""
        decode = ({"max_new_tokens": self.cfg.max_new_tokens} if self.mode == "parity"
                  else {"min_answer_mass": self.cfg.min_answer_mass})
        decode["unparseable_as_no"] = self.cfg.unparseable_as_no
        return {"kind": "rule_verdict", "verifier": self.verifier_id, "mode": self.mode,
                "template": self.template.version, "truncate": self.cfg.truncate_prompt_tokens,
                "decode": decode, "rule": rule, "text": conversation}

    def judge(self, conversations: Sequence[str], rules: Sequence[str]) -> list[list[Verdict]]:
        """``verdicts[i][k]``: conversation i under rule k."""
        flat = self.judge_items([(c, r) for c in conversations for r in rules])
        k = len(rules)
        return [flat[i * k:(i + 1) * k] for i in range(len(conversations))]

    def judge_items(self, items: Sequence[tuple[str, str]]) -> list[Verdict]:
        """One verdict per (conversation, rule) item, from the cache where possible."""
        out: list[Verdict | None] = [None] * len(items)
        todo: dict[tuple[str, str], list[int]] = {}
        for j, (conv, rule) in enumerate(items):
            hit = self.cache.get(self.cache_parts(conv, rule)) if self.cache is not None else None
            if hit is not None:
                out[j] = Verdict.from_json(hit, cached=True)
                self.stats["cache_hits"] += 1
            else:
                todo.setdefault((conv, rule), []).append(j)  # identical checks are made once
        if todo:
            unique = list(todo)
            for (conv, rule), verdict in zip(unique, self._call_backend(unique)):
                if self.cache is not None and reason_kind(verdict.reason) != "backend_error":
                    self.cache.put(self.cache_parts(conv, rule), verdict.to_json())  # failures are retried next time
                for j in todo[(conv, rule)]:
                    out[j] = verdict
            self.stats["model_checks"] += len(unique)
        for v in out:
            self._count(v)
        return out  # type: ignore[return-value]

    def _call_backend(self, items: list[tuple[str, str]]) -> list[Verdict]:
        try:
            if self.mode == "parity":
                verdicts = self.backend.generate(self.template, items, self.cfg)
            else:
                verdicts = self.backend.score(self.template, items, self.cfg, reuse_prefix=self.reuse_prefix)
        except Exception as e:  # the backends catch per batch; this is the last line of defence
            warnings.warn(f"verifier backend failed on {len(items)} checks: {type(e).__name__}: {e}")
            verdicts = [unscored(f"backend_error: {type(e).__name__}: {e}") for _ in items]
        if len(verdicts) != len(items):
            raise RuntimeError(f"backend {self.backend.name} returned {len(verdicts)} verdicts for {len(items)} checks")
        return verdicts

    def _count(self, v: Verdict) -> None:
        self.stats["checks"] += 1
        if v.value is None:
            self.stats["unscored"] += 1
        else:
            self.stats["yes" if v.value == 1 else "no"] += 1
        if v.reason:
            self.stats[f"{'unscored' if v.value is None else 'imposed'}:{reason_kind(v.reason)}"] += 1


def messages_conversation(messages: Sequence[dict], eos_token: str | None = None) -> str:
    """A multi-turn chat in the policy's text format, EOS stripped: <|user|>q1<|assistant|>a1<|user|>q2...

    ``verifier_conversation`` is the one-turn case; MT-Bench turn-2 judgments need both turns.
    """
    from .text_format import ASSISTANT, USER, verifier_conversation

    if len(messages) == 2:
        return verifier_conversation(messages[0]["content"], messages[1]["content"], eos_token)
    marks = {"user": USER, "assistant": ASSISTANT}
    return "".join(marks[m["role"]] + m["content"] for m in messages)


# ---------------------------------------------------------------- prompts as token ids (local backends)

def render_prompt(tokenizer, template: JudgeTemplate, conversation: str, rule: str) -> str:
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


def prompt_token_ids(tokenizer, template: JudgeTemplate, items: Sequence[tuple[str, str]],
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


def judge_prompt_ids(tokenizer, template: JudgeTemplate, items: Sequence[tuple[str, str]], cfg: VerifierConfig,
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


# ---------------------------------------------------------------- construction

def model_fingerprint(path_or_id: str) -> str:
    """A verifier id for the cache: the Hub id, or for a local folder its name plus a weights digest."""
    p = Path(path_or_id)
    meta = p / "tiny_verifier.json"
    if meta.exists():  # the tiny verifier is rebuilt per run directory: key on its weights, not its path
        return f"tiny-verifier@{json.loads(meta.read_text())['weights_sha256'][:16]}"
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.glob("*.json")) + sorted(p.glob("*.safetensors")):
            h.update(f.name.encode() + str(f.stat().st_size).encode())
        return f"{p.name}@{h.hexdigest()[:16]}"
    return path_or_id


def resolve_device(profile: Profile) -> str:
    import torch

    if profile.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return profile.device


def load_local_judge(model_path: str, profile: Profile):
    """(model, tokenizer) for the transformers backend, in the profile's precision and device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dtype = torch.bfloat16 if profile.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(resolve_device(profile))
    return model.eval(), tokenizer


def build_verifier(profile: Profile, models_dir: str | Path, cache_path: str | Path | None = None, *,
                   client=None, model=None, tokenizer=None, **overrides: Any) -> RuleVerifier:
    """The verifier a profile asks for. ``overrides`` replace ``profile.verifier`` fields (e.g. ``mode``).

    ``client`` (an ``llm.LLMClient``) serves the API backends; ``model``/``tokenizer`` reuse a loaded
    judge. vLLM is optional: when it is not importable the transformers backend is used, with a warning.
    """
    from . import verifier_backends as vb
    from .cache import ResponseCache
    from .tiny_models import resolve_model

    cfg = dataclasses.replace(profile.verifier, **overrides)
    template = load_template(cfg.layout, cfg.concise_clause)
    cache = ResponseCache(cache_path) if cache_path and cfg.use_cache else None
    if cfg.backend in ("openai", "bedrock"):
        client = client or vb.make_api_client(profile, cfg)
        backend = vb.APIJudge(client, cfg.num_workers)
        return RuleVerifier(backend, template, cfg, f"{cfg.backend}:{profile.models.verifier}", cfg.mode, cache)
    path = resolve_model(profile, "verifier", models_dir)
    if cfg.backend == "vllm_server":  # one server for every rank (autorule_lib.verifier_server)
        from .verifier_server import build_server_judge

        backend = build_server_judge(profile, cfg, path)
        return RuleVerifier(backend, template, cfg, f"vllm_server:{model_fingerprint(path)}", cfg.mode, cache)
    if cfg.backend == "vllm":
        from .engines import check_verifier_engine_layout, vllm_kwargs

        check_verifier_engine_layout(cfg.backend)
        try:
            backend = vb.VLLMJudge(path, dtype="bfloat16" if profile.precision == "bf16" else "float32",
                                   **vllm_kwargs(cfg.gpu_memory_utilization))
        except ImportError as e:
            warnings.warn(f"verifier backend 'vllm' is not available ({e}); using transformers instead")
            backend = None
        if backend is not None:
            return RuleVerifier(backend, template, cfg, model_fingerprint(path), cfg.mode, cache)
    if model is None or tokenizer is None:
        model, tokenizer = load_local_judge(path, profile)
    return RuleVerifier(vb.TransformersJudge(model, tokenizer), template, cfg, model_fingerprint(path), cfg.mode, cache)
