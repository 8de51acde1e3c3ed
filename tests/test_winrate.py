"""UF win rate: the seed's prompt, the safe parser (valid, swapped, malformed, hostile), both orders, scoring."""
import builtins
import re
from pathlib import Path

import pytest

from autorule_lib.evaluate.judge import JudgeReply, JudgeSpec
from autorule_lib.evaluate.winrate import ADMISSIBLE_RANKINGS, RANKING_PROMPT, bootstrap_ci, judge_pairs, parse_ranking, ranking_prompt, summarize_win_rate, uf_win_rate

SEED = Path(__file__).resolve().parents[1] / "fixtures" / "authors_readme" / "evaluation_texts.md"


def test_prompt_is_the_seed_text():
    text = ranking_prompt("Say hi", "Hi!", "Hello.")
    assert text.startswith("I want you to create a leaderboard of different large-language models.")
    # the seed's layout, not only its words: blank lines between sections, 4/8-space indentation
    assert 'python dictionaries.\n\nHere is the prompt:\n{\n    "instruction": """Say hi"""\n}\n\n' in text
    assert ('[\n    {\n        "model": "model_1",\n        "answer": """Hi!"""\n    },\n    {\n'
            '        "model": "model_2",\n        "answer": """Hello."""\n    }\n]\n\nNow please') in text
    assert "\n    {'model': <model-name>, 'rank': <model-rank>},\n" in text
    assert "]\n\nYour response must be" in text
    assert text.endswith("Please provide the ranking that the majority of humans would give.")
    if SEED.exists():  # the seed document, where this checkout has it
        block = re.search(r"## 1\..*?```text\n(.*?)\n```", SEED.read_text(), re.S).group(1)
        assert RANKING_PROMPT == block


def test_prompt_leaves_braces_in_responses_alone():
    text = ranking_prompt("fmt {x}", "use {} and {0}", "}}{{")
    assert '"""use {} and {0}"""' in text and '"""}}{{"""' in text


@pytest.mark.parametrize("answer, winner", [
    ("[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]", "model_1"),
    ("[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]", "model_2"),
    # listed in the other order: the rank decides, not the position in the list
    ("[{'model': 'model_2', 'rank': 2}, {'model': 'model_1', 'rank': 1}]", "model_1"),
    ('[{"model": "model_2", "rank": 1}, {"model": "model_1", "rank": 2}]', "model_2"),
    ("```python\n[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]\n```", "model_1"),
    ("Here is my ranking:\n[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]\nThanks", "model_2"),
    ("<think>model_1 is verbose</think>[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]", "model_2"),
    ("({'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2})", None),  # a tuple has no brackets
])
def test_valid_and_swapped_answers(answer, winner):
    assert parse_ranking(answer).winner == winner


def test_admissible_rankings_parse_to_their_winner():
    for model, text in ADMISSIBLE_RANKINGS.items():
        assert parse_ranking(text).winner == model and parse_ranking(text).repair is None


@pytest.mark.parametrize("answer, error", [
    ("", "empty"),
    ("   ", "empty"),
    ("model_1 is better", "no_list"),
    ("[{'model': 'model_1', 'rank': 1}]", "not_two_entries"),
    ("[{'model': 'model_1', 'rank': 1}, {'model'", "no_list"),  # cut off mid-answer: never closed
    ("[{'model': 'model_1', 'rank': 1}, {'model': ]", "not_a_literal"),
    ("[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 1}]", "ranks_not_1_2"),
    ("[{'model': 'model_1', 'rank': 1}, {'model': 'model_1', 'rank': 2}]", "bad_entry"),
    ("[{'model': 'model_1', 'rank': 1}, {'model': 'model_3', 'rank': 2}]", "bad_entry"),
    ("[{'model': 'model_1', 'rank': '1'}, {'model': 'model_2', 'rank': '2'}]", "bad_entry"),
    ("[{'model': 'model_1', 'rank': True}, {'model': 'model_2', 'rank': 2}]", "bad_entry"),
    ("[{'model': 'model_1', 'rank': 1, 'why': 'x'}, {'model': 'model_2', 'rank': 2}]", "bad_entry"),
    ("[1, 2]", "bad_entry"),
    ("[" + "{'model': 'model_1', 'rank': 1}, " * 400 + "]", "too_long"),
])
def test_malformed_answers_are_counted_not_guessed(answer, error):
    parsed = parse_ranking(answer)
    assert parsed.winner is None and parsed.error == error


HOSTILE = [
    "__import__('os').system('touch {p}')",
    "[__import__('os').system('touch {p}'), 1]",
    "[{{'model': open('{p}', 'w').write('x'), 'rank': 1}}, {{'model': 'model_2', 'rank': 2}}]",
    "[{{'model': (lambda: __import__('pathlib').Path('{p}').touch())(), 'rank': 1}}, {{'model': 'model_2', 'rank': 2}}]",
    "[exec(\"open('{p}', 'w')\"), eval('1')]",
    "[{{'model': 'model_1', 'rank': 10**10**10}}, {{'model': 'model_2', 'rank': 2}}]",
    "[" * 300 + "]" * 300,
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_answers_never_run(template, tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    answer = template.format(p=sentinel) if "{p}" in template else template

    def forbidden(*a, **k):
        raise AssertionError("the judge's answer reached eval/exec")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    parsed = parse_ranking(answer)
    assert parsed.winner is None and parsed.error
    assert not sentinel.exists()


# ---------------------------------------------------------------- judging in both orders

class FakeJudge:
    """A generating judge whose answer is a function of the two outputs it was shown."""

    mode = "generate"
    spec = JudgeSpec("generate", "fake", "fake")

    def __init__(self, decide):
        self.decide, self.seen = decide, []

    def ask_many(self, conversations):
        out = []
        for messages in conversations:
            text = messages[0]["content"]
            o1 = re.search(r'"model_1",\s*"answer": """(.*?)"""', text, re.S).group(1)
            o2 = re.search(r'"model_2",\s*"answer": """(.*?)"""', text, re.S).group(1)
            self.seen.append((o1, o2))
            out.append(self.decide(o1, o2))
        return out


def reply(winner):
    return JudgeReply(ADMISSIBLE_RANKINGS[winner])


PROMPTS = ["p1", "p2", "p3", "p4"]


def test_each_pair_is_judged_in_both_orders():
    judge = FakeJudge(lambda a, b: reply("model_1"))
    uf_win_rate(PROMPTS, ["c1", "c2", "c3", "c4"], ["r1", "r2", "r3", "r4"], judge)
    assert judge.seen == [("c1", "r1"), ("r1", "c1"), ("c2", "r2"), ("r2", "c2"), ("c3", "r3"), ("r3", "c3"),
                          ("c4", "r4"), ("r4", "c4")]


def test_position_bias_cancels_to_ties():
    wr, records = uf_win_rate(PROMPTS, ["a"] * 4, ["b"] * 4, FakeJudge(lambda a, b: reply("model_1")))
    assert (wr.win_rate, wr.ties, wr.wins, wr.losses) == (50.0, 4, 0, 0)
    assert wr.win_rate_candidate_first == 100.0 and wr.win_rate_reference_first == 0.0


def test_consistent_judge_prefers_longer_answers():
    longer = lambda a, b: reply("model_1" if len(a) > len(b) else "model_2")  # noqa: E731
    wr, _ = uf_win_rate(PROMPTS, ["long answer", "x", "long answer", "long answer"], ["short"] * 4, FakeJudge(longer))
    assert (wr.wins, wr.losses, wr.ties, wr.n_complete) == (3, 1, 0, 4) and wr.win_rate == 75.0
    assert wr.ci_low <= 75.0 <= wr.ci_high


def test_failed_calls_are_failed_and_unparseable_counted_never_scored():
    answers = iter([JudgeReply(None, "http_500"), reply("model_1"),        # pair 0: a failed call
                    JudgeReply("I like both"), reply("model_2"),           # pair 1: unparseable
                    reply("model_1"), reply("model_2"),                    # pair 2: won both orders
                    reply("model_2"), reply("model_1")])                   # pair 3: lost both orders
    wr, records = uf_win_rate(PROMPTS, ["c"] * 4, ["r"] * 4, FakeJudge(lambda a, b: next(answers)))
    assert [r["status"] for r in records[:4]] == ["failed", "ok", "unparseable", "ok"]
    assert records[0]["reason"] == "http_500" and records[0]["winner"] is None
    assert (wr.n_failed, wr.n_unparseable, wr.n_complete) == (1, 1, 2)
    assert (wr.wins, wr.losses) == (1, 1) and wr.win_rate == 50.0  # not 25%: no verdict is not a loss


def test_no_complete_pair_gives_no_number():
    wr, _ = uf_win_rate(PROMPTS[:1], ["c"], ["r"], FakeJudge(lambda a, b: JudgeReply(None, "timeout")))
    assert wr.n_complete == 0 and wr.win_rate != wr.win_rate  # nan


def test_likelihood_judge_chooses_between_the_two_rankings():
    class Likelihood:
        mode = "likelihood"
        spec = JudgeSpec("likelihood", "local", "fake")

        def choose(self, messages, candidates):
            assert candidates == [ADMISSIBLE_RANKINGS["model_1"], ADMISSIBLE_RANKINGS["model_2"]]
            return JudgeReply(candidates[1], None, False, [-2.0, -1.0])

    records = judge_pairs([{"prompt": "p", "candidate": "c", "reference": "r"}], Likelihood())
    assert [r["winner"] for r in records] == ["reference", "candidate"] and records[0]["loglik"] == [-2.0, -1.0]


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [1.0, 0.5, 0.0, 1.0, 1.0, 0.5]
    assert bootstrap_ci(values, seed=1) == bootstrap_ci(values, seed=1)
    lo, hi = bootstrap_ci(values, n=500, seed=1)
    assert lo <= sum(values) / len(values) <= hi
    s = summarize_win_rate([], 0)
    assert s.n_pairs == 0 and s.win_rate != s.win_rate
