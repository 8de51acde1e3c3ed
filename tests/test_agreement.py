import math

import pytest

from autorule_lib.book.figures import plot_rule_agreement
from autorule_lib.verify import agreement as ag
from autorule_lib.verify.verdict import Verdict, unscored
from conftest import mt_row, uf_row


def verdicts(*values):
    return [Verdict(v) if v is not None else unscored("backend_error: timeout") for v in values]


def pair_verdicts(chosen, rejected, rules=("r0", "r1", "r2")):
    pairs = [ag.Pair("uf", str(i), f"c{i}", f"j{i}") for i in range(len(chosen))]
    return ag.PairVerdicts(list(rules), pairs, [verdicts(*c) for c in chosen], [verdicts(*j) for j in rejected])


# rule 0 separates 3 of 4 pairs, 2 the preferred way; rule 1 has one unscored verdict and separates
# 1 of the 3 scored pairs, the preferred way; rule 2 never separates.
CHOSEN = [(1, 1, 1), (1, 0, 1), (0, None, 0), (1, 1, 0)]
REJECTED = [(0, 1, 1), (0, 0, 1), (1, 1, 0), (1, 0, 0)]


def test_rule_table_by_hand():
    t = ag.rule_table(pair_verdicts(CHOSEN, REJECTED))
    r0, r1, r2 = (t.loc[k] for k in range(3))
    assert (r0.pairs_scored, r0.separated, r0.agree) == (4, 3, 2)
    assert r0.coverage == pytest.approx(3 / 4) and r0.agreement == pytest.approx(2 / 3)
    assert (r1.pairs_scored, r1.separated, r1.agree, r1.unscored_verdicts) == (3, 1, 1, 1)
    assert r1.coverage == pytest.approx(1 / 3) and r1.agreement == 1.0
    assert r1.chosen_follows == pytest.approx(2 / 3)  # unscored is left out, not counted as "No"
    assert r2.separated == 0 and r2.coverage == 0.0 and math.isnan(r2.agreement)


def test_rule_score_accuracy_by_hand():
    # scores chosen: 1, 2/3, 0 (one unscored rule left out), 2/3; rejected: 2/3, 1/3, 2/3, 1/3
    acc = ag.rule_score_accuracy(pair_verdicts(CHOSEN, REJECTED))
    assert (acc["wins"], acc["ties"], acc["losses"], acc["pairs_unscored"]) == (3, 0, 1, 0)
    assert acc["accuracy"] == pytest.approx(3 / 4)
    tie = ag.rule_score_accuracy(pair_verdicts([(1, 0, None)], [(0, 1, 1)]))
    assert (tie["losses"], tie["accuracy"]) == (1, 0.0)  # 1/2 (the unscored rule left out) vs 2/3: a loss
    both = ag.rule_score_accuracy(pair_verdicts([(1, 0, 0), (None, None, None)], [(0, 1, 0), (1, 1, 1)]))
    assert (both["ties"], both["pairs_unscored"], both["accuracy"]) == (1, 1, 0.5)
    assert math.isnan(both["accuracy_without_ties"])


def test_mt_pairs_pick_the_winner_and_the_judged_turns():
    rows = [mt_row(question_id=86, winner="model_b", turn=1), mt_row(question_id=87, winner="model_a", turn=2),
            mt_row(question_id=88, winner="tie", turn=1)]
    p1, p2 = ag.mt_pairs(rows)  # the tie is dropped
    assert p1.chosen == "<|user|>Q86 turn 1<|assistant|>llama-13b answer 1"
    assert p1.rejected == "<|user|>Q86 turn 1<|assistant|>gpt-4 answer 1"
    assert p2.chosen == ("<|user|>Q87 turn 1<|assistant|>gpt-4 answer 1"
                         "<|user|>Q87 turn 2<|assistant|>gpt-4 answer 2")
    assert p2.meta == {"question_id": 87, "turn": 2}


def test_uf_pairs_use_the_prepared_columns():
    row = {**uf_row(), "chosen_content": "It is 4.", "rejected_content": "It is 5."}
    (p,) = ag.uf_pairs([row])
    assert (p.chosen, p.rejected) == ("<|user|>What is 2+2?<|assistant|>It is 4.",
                                      "<|user|>What is 2+2?<|assistant|>It is 5.")


class WordVerifier:
    """Follows rule k iff the response contains the rule's word."""

    def verify(self, conversations, rules):
        return [[Verdict(int(r in c.split("<|assistant|>")[-1])) for r in rules] for c in conversations]


def test_verify_pairs_and_mode_agreement():
    pairs = [ag.Pair("uf", "0", "<|user|>q<|assistant|>red blue", "<|user|>q<|assistant|>red"),
             ag.Pair("uf", "1", "<|user|>q<|assistant|>blue", "<|user|>q<|assistant|>red blue")]
    pv = ag.verify_pairs(WordVerifier(), pairs, ["red", "blue"])
    assert [[v.value for v in row] for row in pv.chosen] == [[1, 1], [0, 1]]
    assert [[v.value for v in row] for row in pv.rejected] == [[1, 0], [1, 1]]
    t = ag.rule_table(pv)
    assert t.loc[0, "agreement"] == 0.0 and t.loc[1, "agreement"] == 1.0
    other = ag.PairVerdicts(pv.rules, pairs, [verdicts(1, 1), verdicts(None, 1)], [verdicts(1, 1), verdicts(1, 1)])
    m = ag.mode_agreement(pv, other)
    assert (m["checks"], m["both_scored"], m["same_verdict"], m["scored_by_one_only"]) == (8, 7, 6, 1)
    records = ag.verdict_records(pv)
    assert len(records) == 8 and {r["side"] for r in records} == {"chosen", "rejected"}


def test_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    ax = plot_rule_agreement(ag.rule_table(pair_verdicts(CHOSEN, REJECTED)), "t")
    assert len(ax.patches) == 3 and ax.get_title() == "t"
