import dataclasses
import json
import warnings

import pytest

from autorule_lib.config import VerifierConfig
from autorule_lib.profiles import load_profile
from autorule_lib.llm.base import LLMCallError, LLMResponse
from autorule_lib.verify.prompt import CONCISE_CLAUSE, verifier_prompt_ids, load_template, messages_conversation, prompt_token_ids
from autorule_lib.verify.verifier import RuleVerifier
from autorule_lib.verify.verdict import Verdict, parse_verdict, unscored
from autorule_lib.verify.backends import APIBackend

CONV = "<|user|>What is 2+2?<|assistant|>It is 4."
RULE = "The assistant's responses should state the final answer clearly."


# ---------------------------------------------------------------- the judge prompt

def test_templates_keep_the_paper_contract_in_both_layouts():
    rf, cf = load_template("rule_first"), load_template("conversation_first")
    for t in (rf, cf):
        msg = t.user_message(RULE, CONV)
        assert RULE in msg and CONV in msg and "[[Yes]]" in msg and "[[No]]" in msg
        assert CONCISE_CLAUSE in msg and "impartial" in msg and "does not apply" in msg
    assert rf.user_message(RULE, CONV).index(RULE) < rf.user_message(RULE, CONV).index(CONV)
    assert cf.user_message(RULE, CONV).index(CONV) < cf.user_message(RULE, CONV).index(RULE)
    plain = load_template("rule_first", concise_clause=False)
    assert CONCISE_CLAUSE not in plain.user_message(RULE, CONV) and "concise" not in plain.user_message(RULE, CONV)
    assert len({rf.version, cf.version, plain.version}) == 3


@pytest.mark.parametrize("layout", ["rule_first", "conversation_first"])
def test_judge_prompt_names_both_criteria_and_requires_both(layout):
    """The original's analysis rubric (METHOD.md §3): (1) the rule is satisfied, (2) concisely; [[Yes]]
    only if both hold, [[No]] if either fails; n/a counts as satisfied; then the bare-answer demand."""
    msg = load_template(layout).user_message(RULE, CONV)
    assert "1. Rule:" in msg and "2. Conciseness:" in msg
    assert "[[Yes]] only if both criteria are fully met" in msg and "[[No]] if either" in msg
    assert "does not apply to this kind of task counts as satisfied" in msg
    assert msg.rstrip().endswith(RULE) if layout == "conversation_first" else msg.rstrip().endswith("nothing else.")
    if layout == "rule_first":  # the original's order: instructions, rule, conversation, criteria, demand
        order = [msg.index(x) for x in ("impartial", RULE, CONV, "1. Rule:", "2. Conciseness:", "nothing else")]
        assert order == sorted(order)
    plain = load_template(layout, concise_clause=False).user_message(RULE, CONV)
    assert "2. Conciseness" not in plain and "?plain" not in plain and "only if this criterion" in plain


def test_template_version_follows_the_text(tmp_path):
    src = load_template("rule_first")
    edited = tmp_path / "t.txt"
    edited.write_text("# version: rule-first-v1\n" + src.body.replace("impartial", "fair"))
    assert load_template("rule_first", path=edited).version != src.version  # same declared version, new text
    (tmp_path / "bad.txt").write_text("# version: x\nJudge {rule} only.")
    with pytest.raises(ValueError, match="conversation"):
        load_template("rule_first", path=tmp_path / "bad.txt")


def test_rule_or_response_text_is_not_reinterpreted():
    msg = load_template("rule_first").user_message("Mention {conversation} literally.", "<|user|>{rule}<|assistant|>ok")
    assert "Mention {conversation} literally." in msg and "<|user|>{rule}<|assistant|>ok" in msg


def test_multi_turn_conversation_format():
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    assert messages_conversation(msgs[:2]) == "<|user|>q1<|assistant|>a1"
    assert messages_conversation(msgs) == "<|user|>q1<|assistant|>a1<|user|>q2<|assistant|>a2"


@pytest.mark.parametrize("text,value,reason", [
    ("[[Yes]]", 1, None), ("The response follows it. [[No]]", 0, None),
    ("[[Yes]] wait, [[No]]", 1, None),  # the paper's test: [[Yes]] anywhere
    ("Yes", None, "unparseable"), ("", None, "unparseable"), ("[Yes]", None, "unparseable"),
])
def test_parse_verdict_strict(text, value, reason):
    v = parse_verdict(text, unparseable_as_no=False)
    assert (v.value, v.reason) == (value, reason)


def test_no_verdict_is_a_zero_by_default_and_still_counted():
    """The original scores any output without [[Yes]] as 0; ours does too, with a reason that is counted."""
    assert VerifierConfig().unparseable_as_no is True
    v = parse_verdict("I cannot tell.")
    assert v.value == 0 and v.reason.startswith("no_verdict")
    verifier = make_verifier(FakeBackend(answer=lambda c, r: parse_verdict("maybe")))
    (row,) = verifier.verify([CONV], [RULE])
    assert row[0].value == 0 and verifier.stats["imposed:no_verdict"] == 1 and verifier.stats["unscored"] == 0


def test_fast_mode_low_answer_mass_follows_the_same_rule():
    from autorule_lib.verify.backends import _zero_truncated, verdict_from_probs

    assert verdict_from_probs(0.01, 0.01, 1.0, 0.1).value == 0
    assert verdict_from_probs(0.01, 0.01, 1.0, 0.1, no_verdict_as_zero=False).value is None
    strict = [verdict_from_probs(0.01, 0.01, 1.0, 0.1, False), unscored("backend_error: x")]
    fixed = _zero_truncated(list(strict), [True, True])  # truncated prompts: the original's 0; failures stay
    assert fixed[0].value == 0 and fixed[0].reason.startswith("no_verdict") and fixed[1].value is None


# ---------------------------------------------------------------- the verifier's bookkeeping

class FakeBackend:
    name, supports_fast = "fake", True

    def __init__(self, answer=lambda conv, rule: parse_verdict("[[Yes]]" if "4" in conv else "[[No]]"), fail=False):
        self.answer, self.fail, self.calls = answer, fail, []

    def generate(self, template, items, cfg):
        self.calls.append(list(items))
        if self.fail:
            raise RuntimeError("CUDA out of memory")
        return [self.answer(c, r) for c, r in items]

    def score(self, template, items, cfg, reuse_prefix=True):
        return self.generate(template, items, cfg)


def make_verifier(backend, cache=None, **cfg):
    return RuleVerifier(backend, load_template("rule_first"), VerifierConfig(**cfg), "fake-judge", cache=cache)


def test_backend_error_is_unscored_counted_and_not_cached(tmp_path):
    from autorule_lib.cache import ResponseCache

    cache = ResponseCache(tmp_path / "v.sqlite")
    v = make_verifier(FakeBackend(fail=True), cache)
    with pytest.warns(UserWarning, match="backend failed"):
        out = v.verify([CONV, "<|user|>x<|assistant|>y"], [RULE])
    assert all(row[0].value is None and row[0].reason.startswith("backend_error") for row in out)
    assert v.stats["unscored"] == 2 and v.stats["unscored:backend_error"] == 2 and v.stats["no"] == 0
    assert len(cache) == 0  # a failure is retried next time, never replayed


def test_unparseable_output_is_unscored_and_counted_in_strict_mode():
    v = make_verifier(FakeBackend(answer=lambda c, r: parse_verdict("maybe", False)), unparseable_as_no=False)
    (row,) = v.verify([CONV], [RULE, "Another rule."])
    assert [x.value for x in row] == [None, None]
    assert v.stats["unscored:unparseable"] == 2 and v.stats["checks"] == 2


def test_cache_hit_makes_no_model_call(tmp_path):
    from autorule_lib.cache import ResponseCache

    first = FakeBackend()
    v1 = make_verifier(first, ResponseCache(tmp_path / "v.sqlite"))
    before = v1.verify([CONV, "<|user|>Q<|assistant|>five"], [RULE])
    second = FakeBackend(answer=lambda c, r: parse_verdict("[[Yes]]"))  # would answer differently if asked
    v2 = make_verifier(second, ResponseCache(tmp_path / "v.sqlite"))  # a new process, same cache file
    after = v2.verify([CONV, "<|user|>Q<|assistant|>five"], [RULE])
    assert second.calls == [] and v2.stats["cache_hits"] == 2 and v2.stats["model_checks"] == 0
    assert [r[0].value for r in after] == [r[0].value for r in before] == [1, 0]
    assert all(r[0].cached for r in after)
    other = v2.variant(layout="conversation_first")  # another template version: not the same verdict
    other.verify([CONV], [RULE])
    assert len(second.calls) == 1


def test_identical_checks_are_judged_once():
    backend = FakeBackend()
    v = make_verifier(backend)
    v.verify([CONV, CONV, CONV], [RULE])
    assert len(backend.calls[0]) == 1 and v.stats["checks"] == 3


def test_fast_mode_needs_probabilities():
    with pytest.raises(ValueError, match="fast"):
        RuleVerifier(APIBackend(client=None), load_template("rule_first"), VerifierConfig(mode="fast"), "api")


# ---------------------------------------------------------------- API judge

class FakeClient:
    provider, model = "fake", "judge"

    def __init__(self, reply):
        self.reply, self.seen = reply, []

    def complete(self, messages, **params):
        self.seen.append((messages, params))
        if isinstance(self.reply, Exception):
            raise self.reply
        return LLMResponse(text=self.reply)


@pytest.mark.parametrize("reply,value,reason", [
    ("[[Yes]]", 1, None), ("The response is fine.", 0, "no_verdict (counted as 0)"),
    (LLMCallError("throttled", "gave up after 6 retries"), None, "backend_error: throttled"),
    (ConnectionError("reset"), None, "backend_error: ConnectionError: reset"),
])
def test_api_judge_verdicts_and_failures(reply, value, reason):
    client = FakeClient(reply)
    v = RuleVerifier(APIBackend(client, num_workers=2), load_template("rule_first"), VerifierConfig(), "api")
    (row,) = v.verify([CONV], [RULE])
    assert (row[0].value, row[0].reason) == (value, reason)
    messages, params = client.seen[0]
    assert RULE in messages[0]["content"] and CONV in messages[0]["content"]
    assert params["temperature"] == 0.0 and params["max_tokens"] == VerifierConfig().max_new_tokens
    assert v.stats["checks"] == 1 and v.stats["unscored"] == (value is None)  # a failure is never a 0


# ---------------------------------------------------------------- the trained tiny verifier

@pytest.fixture(scope="module")
def smoke():
    return load_profile("smoke")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def judge(smoke, models_dir):
    from autorule_lib.verify.verifier import build_verifier

    return build_verifier(smoke, models_dir, use_cache=False)


@pytest.fixture(scope="module")
def checks(smoke):
    from autorule_lib.data.preparation import load_source

    rows = load_source(smoke.data.ultrafeedback_source, ["test_prefs"])["test_prefs"]
    convs = [messages_conversation(r[s][:2]) for r in rows for s in ("chosen", "rejected")]
    convs = [c for c in convs if len(c) < 1500][:10]
    rules = [RULE, "The assistant's responses should avoid repeating themselves.",
             "The assistant's responses should give code that runs, with a short usage example and its output.",
             "The assistant's responses should be polite."]
    return convs, rules


def test_smoke_verifier_is_the_trained_tiny_judge(judge, models_dir):
    assert judge.verifier_id.startswith("tiny-verifier-trained@") and judge.backend.name == "transformers"
    from autorule_lib.smoke.verifier import CRITERION

    meta = json.loads((models_dir / "tiny-verifier-trained" / "tiny_verifier.json").read_text())
    assert meta["held_out_exact_answer_rate"] >= 0.9 and meta["criterion"] == CRITERION


def test_tiny_criterion_reads_only_the_last_response():
    from autorule_lib.smoke.verifier import follows_criterion

    assert follows_criterion("<|user|>Use **bold** and `code`<|assistant|>Plain text.")
    assert not follows_criterion("<|user|>Hi<|assistant|>Some **bold** text")
    assert not follows_criterion("<|user|>Hi<|assistant|># A heading")
    assert follows_criterion("<|user|>a<|assistant|>`b`<|user|>c<|assistant|>d")  # two turns: the last one counts


@pytest.mark.parametrize("layout", ["rule_first", "conversation_first"])
def test_trained_tiny_judge_follows_its_criterion_on_the_response(judge, layout):
    """The smoke judge's verdict is a function of the judged response, so two samples of one GRPO prompt
    can get different rule rewards: responses to the same prompts, with and without markdown characters,
    under several rules (the v1 judge, which answered by the prompt's length, agreed about half the time)."""
    from autorule_lib.smoke.verifier import follows_criterion

    prompts = ["What causes the seasons on Earth?", "Write a haiku about autumn leaves.",
               "How do I reverse a list in Python?", "Give me three tips for better sleep."]
    responses = ["The tilt of the axis", "**Tilt** of the axis", "Leaves fall slowly down", "- **Leaves** fall",
                 "Use the reverse method", "Use `reversed(xs)` here", "Sleep at regular hours", "# Tips\n1. Sleep"]
    convs = [f"<|user|>{q}<|assistant|>{r}" for q in prompts for r in responses]
    rules = ["The assistant's responses should be polite.",
             "The assistant's responses should give code that runs, with a short usage example and its output."]
    verdicts = judge.variant(layout=layout).verify(convs, rules)
    right = sum((v.value == 1) == follows_criterion(c) for c, row in zip(convs, verdicts) for v in row)
    assert right >= 0.9 * len(convs) * len(rules), f"{right} of {len(convs) * len(rules)} verdicts follow the criterion"


@pytest.mark.parametrize("layout", ["rule_first", "conversation_first"])
def test_fast_and_parity_agree_on_the_trained_judge(judge, checks, layout):
    convs, rules = checks
    parity = judge.variant(mode="parity", layout=layout).verify(convs, rules)
    fast_verifier = judge.variant(mode="fast", layout=layout)
    fast = fast_verifier.verify(convs, rules)
    fast_verifier.reuse_prefix = False
    reencoded = fast_verifier.verify(convs, rules)
    outputs = {x.output for row in parity for x in row}
    assert outputs <= {"[[Yes]]", "[[No]]"}  # generation stopped right after the verdict and its end token
    pv = [x.value for row in parity for x in row]
    fv = [x.value for row in fast for x in row]
    assert pv == fv and 0 < sum(pv) < len(pv)  # same verdicts, and both answers occur
    for a, b in zip([x for row in fast for x in row], [x for row in reencoded for x in row]):
        assert a.value == b.value and abs(a.p_yes - b.p_yes) < 1e-4  # prefix KV reuse changes nothing


def test_right_truncation_switch(judge, checks):
    convs, rules = checks
    tok, tpl = judge.backend.tok, judge.template
    full = prompt_token_ids(tok, tpl, [(convs[0], rules[0])])[0]
    assert prompt_token_ids(tok, tpl, [(convs[0], rules[0])], truncate=40)[0] == full[:40]
    short = judge.variant()
    short.cfg = dataclasses.replace(short.cfg, truncate_prompt_tokens=40)
    assert short.cache_parts(convs[0], rules[0]) != judge.cache_parts(convs[0], rules[0])
    (row,) = short.verify(convs[:1], rules[:1])  # the answer instructions are cut off: whatever it says is counted
    assert short.stats["checks"] == 1
    # self-consistent with the original: a truncated prompt's no-verdict answer is 0 even in strict mode
    strict = dataclasses.replace(judge.cfg, truncate_prompt_tokens=40, unparseable_as_no=False)
    ids, zero = verifier_prompt_ids(tok, tpl, [(convs[0], rules[0]), ("<|user|>a<|assistant|>b", rules[0])], strict)
    assert ids[0] == full[:40] and zero[0] is True
    assert verifier_prompt_ids(tok, tpl, [(convs[0], rules[0])], dataclasses.replace(strict, truncate_prompt_tokens=None))[1] == [False]
    short.cfg = strict
    (row,) = short.verify(convs[:1], rules[:1])
    assert row[0].value is not None


def test_vllm_is_optional(smoke, models_dir, judge):
    from autorule_lib.verify.verifier import build_verifier

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v = build_verifier(smoke, models_dir, backend="vllm", model=judge.backend.model, tokenizer=judge.backend.tok)
    assert v.backend.name == "transformers" and any("vllm" in str(w.message) for w in caught)


def test_tiny_verifier_build_is_deterministic(smoke, models_dir, tmp_path):
    from autorule_lib.smoke.verifier import TinyVerifierSpec, train_tiny_verifier

    spec = TinyVerifierSpec(steps=2, examples=16, held_out=2)
    a = train_tiny_verifier(smoke, models_dir / "tiny-tokenizer", tmp_path / "a", spec)
    b = train_tiny_verifier(smoke, models_dir / "tiny-tokenizer", tmp_path / "b", spec)
    assert a["weights_sha256"] == b["weights_sha256"] and a["held_out_yes_share"] == b["held_out_yes_share"]


def test_verdict_json_round_trip():
    v = Verdict(1, p_yes=0.9, answer_mass=0.8)
    assert Verdict.from_json(v.to_json()) == v
    assert unscored("backend_error: x").scored is False


@pytest.mark.parametrize("layout", ["rule_first", "conversation_first"])
def test_prompt_pieces_tokenize_like_whole_prompts(judge, checks, layout):
    from autorule_lib.verify.prompt import render_prompt

    convs, rules = checks
    rules = rules + ["5-7-5 syllables.", "'Quoted' rule", "- a dash first", "ends with a space "]
    tok, tpl = judge.backend.tok, load_template(layout)
    items = [(c, r) for c in convs[:4] for r in rules]
    whole = tok([render_prompt(tok, tpl, c, r) for c, r in items], add_special_tokens=False)["input_ids"]
    assert prompt_token_ids(tok, tpl, items) == whole


class _CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.texts = tok, 0

    def __call__(self, texts, **kw):
        self.texts += len(texts)
        return self.tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_rule_pieces_are_checked_once_per_judge_and_stay_exact(judge, checks):
    """A GRPO step re-judges the same rules: the memo skips their re-checks, never changing the ids."""
    from autorule_lib.verify.prompt import PieceMemo, render_prompt

    convs, rules = checks
    rules = rules + ["5-7-5 syllables.", "'Quoted' rule", "- a dash first", "ends with a space "]
    tok, tpl, memo = _CountingTokenizer(judge.backend.tok), load_template("conversation_first"), PieceMemo()
    counts = []
    for step_convs in (convs[:3], convs[3:6]):
        items = [(c, r) for c in step_convs for r in rules]
        before = tok.texts
        got = prompt_token_ids(tok, tpl, items, memo=memo)
        counts.append(tok.texts - before)
        assert got == tok.tok([render_prompt(tok, tpl, c, r) for c, r in items], add_special_tokens=False)["input_ids"]
    # Second step: each conversation once (whole, with its first rule); rules whose check failed, whole.
    failed = sum(not ok for ok in memo.checked.values())
    assert len(memo.checked) == len(rules) and counts[1] == 3 * (1 + failed) < counts[0]


def test_api_backends_are_built_from_the_profile(tmp_path):
    from autorule_lib.verify.verifier import build_verifier
    from autorule_lib.verify.backends import make_api_client

    profile = load_profile("smoke")
    v = build_verifier(profile, tmp_path, backend="openai", client=FakeClient("[[No]]"))
    assert v.verifier_id == "openai:tiny" and v.verify([CONV], [RULE])[0][0].value == 0
    client = make_api_client(profile, dataclasses.replace(profile.verifier, backend="openai",
                                                          api_base_url="http://127.0.0.1:9/v1"))
    assert (client.provider, client.temperature, client.max_tokens) == ("openai", 0.0, profile.verifier.max_new_tokens)
    with pytest.raises(ValueError, match="fast"):
        build_verifier(profile, tmp_path, backend="bedrock", mode="fast", client=FakeClient("[[No]]"))
