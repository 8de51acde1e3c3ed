"""How a rule set's verdicts line up with held-out human preferences (chapter 03).

The paper reports that extracted rules "agree well" with dataset preferences without defining the
measure. Ours, for a rule r and a preference pair (chosen c, rejected j), both judged under r:

* r **separates** the pair when both verdicts are scored and differ;
* **coverage**(r) = separated pairs / pairs where both verdicts are scored;
* **agreement**(r) = pairs separated in the preferred direction (c follows r, j does not) / separated
  pairs; undefined when r separates no pair;
* **rule-score accuracy** (the whole set): each response's rule score is the fraction of the rules it
  follows (over its scored verdicts); a pair counts 1 if score(c) > score(j), ½ on a tie, 0 otherwise.

Unscored verdicts are never counted as 0: they are left out and reported per rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

from ..data.preparation import is_tie
from .prompt import messages_conversation
from .verdict import Verdict
from .verifier import RuleVerifier


@dataclass
class Pair:
    dataset: str
    pair_id: str
    chosen: str      # the preferred conversation, in the verifier's text format
    rejected: str
    meta: dict = field(default_factory=dict)


def uf_pairs(rows: Sequence[dict]) -> list[Pair]:
    """UltraFeedback test pairs (columns prompt, chosen_content, rejected_content)."""
    return [Pair("uf", str(r.get("prompt_id", i)),
                 messages_conversation([{"role": "user", "content": r["prompt"]},
                                        {"role": "assistant", "content": r["chosen_content"]}]),
                 messages_conversation([{"role": "user", "content": r["prompt"]},
                                        {"role": "assistant", "content": r["rejected_content"]}]))
            for i, r in enumerate(rows)]


def mt_pairs(rows: Sequence[dict]) -> list[Pair]:
    """Held-out MT-Bench judgments: the winner's conversation is chosen; a turn-t judgment sees turns 1..t."""
    out = []
    for r in rows:
        if is_tie(r["winner"]):
            continue
        turns = 2 * int(r["turn"])
        a, b = (messages_conversation(r[k][:turns]) for k in ("conversation_a", "conversation_b"))
        chosen, rejected = (a, b) if r["winner"] == "model_a" else (b, a)
        out.append(Pair("mt", f"{r['question_id']}:{r['model_a']}:{r['model_b']}:{r.get('judge', '')}:{r['turn']}",
                        chosen, rejected, {"question_id": r["question_id"], "turn": r["turn"]}))
    return out


@dataclass
class PairVerdicts:
    rules: list[str]
    pairs: list[Pair]
    chosen: list[list[Verdict]]    # [pair][rule]
    rejected: list[list[Verdict]]


def verify_pairs(verifier: RuleVerifier, pairs: Sequence[Pair], rules: Sequence[str]) -> PairVerdicts:
    """Both sides of every pair under every rule, in one verifier call (shared responses are judged once)."""
    convs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    verdicts = verifier.verify(convs, list(rules))
    return PairVerdicts(list(rules), list(pairs), verdicts[:len(pairs)], verdicts[len(pairs):])


def rule_table(pv: PairVerdicts) -> pd.DataFrame:
    """One row per rule: agreement, coverage and the counts behind them."""
    rows = []
    for k, rule in enumerate(pv.rules):
        both = [(c[k].value, j[k].value) for c, j in zip(pv.chosen, pv.rejected)
                if c[k].value is not None and j[k].value is not None]
        agree = sum(1 for c, j in both if c == 1 and j == 0)
        separated = sum(1 for c, j in both if c != j)
        chosen_ok = [c[k].value for c in pv.chosen if c[k].value is not None]
        rejected_ok = [j[k].value for j in pv.rejected if j[k].value is not None]
        rows.append({
            "rule": k, "text": rule, "pairs_scored": len(both), "separated": separated, "agree": agree,
            "coverage": separated / len(both) if both else float("nan"),
            "agreement": agree / separated if separated else float("nan"),
            "chosen_follows": sum(chosen_ok) / len(chosen_ok) if chosen_ok else float("nan"),
            "rejected_follows": sum(rejected_ok) / len(rejected_ok) if rejected_ok else float("nan"),
            "unscored_verdicts": 2 * len(pv.pairs) - len(chosen_ok) - len(rejected_ok),
        })
    return pd.DataFrame(rows).set_index("rule")


def rule_score(verdicts: Sequence[Verdict]) -> float | None:
    scored = [v.value for v in verdicts if v.value is not None]
    return sum(scored) / len(scored) if scored else None


def rule_score_accuracy(pv: PairVerdicts) -> dict:
    """Pairs where the rule score prefers the chosen response (ties ½); pairs with a side unscored are left out."""
    wins = ties = losses = unscored = 0
    for c, j in zip(pv.chosen, pv.rejected):
        sc, sj = rule_score(c), rule_score(j)
        if sc is None or sj is None:
            unscored += 1
        elif sc > sj:
            wins += 1
        elif sc == sj:
            ties += 1
        else:
            losses += 1
    n = wins + ties + losses
    return {"pairs": len(pv.pairs), "pairs_scored": n, "wins": wins, "ties": ties, "losses": losses,
            "pairs_unscored": unscored, "accuracy": (wins + 0.5 * ties) / n if n else float("nan"),
            "accuracy_without_ties": wins / (wins + losses) if wins + losses else float("nan")}


def mode_agreement(a: PairVerdicts, b: PairVerdicts) -> dict:
    """How often two verifier settings give the same verdict on the same checks."""
    va = [v for rows in (a.chosen, a.rejected) for row in rows for v in row]
    vb = [v for rows in (b.chosen, b.rejected) for row in rows for v in row]
    both = [(x.value, y.value) for x, y in zip(va, vb) if x.value is not None and y.value is not None]
    return {"checks": len(va), "both_scored": len(both), "same_verdict": sum(x == y for x, y in both),
            "agreement": sum(x == y for x, y in both) / len(both) if both else float("nan"),
            "scored_by_one_only": sum((x.value is None) != (y.value is None) for x, y in zip(va, vb))}


def verdict_records(pv: PairVerdicts) -> list[dict]:
    """Flat rows (pair, side, rule, verdict...) for the chapter's artifact."""
    out = []
    for p, c, j in zip(pv.pairs, pv.chosen, pv.rejected):
        for side, row in (("chosen", c), ("rejected", j)):
            for k, v in enumerate(row):
                out.append({"dataset": p.dataset, "pair_id": p.pair_id, "side": side, "rule": k, "value": v.value,
                            "reason": v.reason, "p_yes": v.p_yes})
    return out
