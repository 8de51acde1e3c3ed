"""UltraFeedback win rate (book/method.md §5) with the authors' ranking prompt, judged in both orders.

Each test prompt gives a pair: the evaluated model's response and a reference (the SFT model's
response, or the dataset's chosen response; the authors do not say which, so it is configurable).
The judge sees the pair twice, once with each response as ``model_1``, which cancels its position
bias. Its answer is meant to be a Python list of two dicts; it is read with ``ast.literal_eval`` on a
size-bounded string (never ``eval``: the prompt itself tells the judge we will "directly execute" its
answer, so a hostile or confused answer must not be able to run). An answer that does not name
exactly one rank-1 model among ``model_1``/``model_2`` is counted as unparseable, never guessed.

Scoring: a pair counts only when both orders gave a verdict; the evaluated model scores 1 if it won
both, 0.5 if the orders disagree (position decided), 0 if it lost both. The win rate is the mean
pair score with a percentile-bootstrap interval.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from dataclasses import asdict, dataclass

import numpy as np
from ..config import PROMPTS_DIR

PROMPT_FILE = PROMPTS_DIR / "uf_winrate_ranking.txt"


def load_ranking_prompt(path: Path = PROMPT_FILE) -> str:
    """The seed's ranking prompt (fixtures/authors_readme/evaluation_texts.md §1), its words *and* its layout — blank lines and the
    4/8-space indentation of the dictionaries are part of what the judge sees. Leading ``#`` lines are
    comments; the one trailing newline of the file is not part of the prompt."""
    lines = path.read_text(encoding="utf-8").split("\n")
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "\n".join(lines).removesuffix("\n")


RANKING_PROMPT = load_ranking_prompt()

MODELS = ("model_1", "model_2")
# The two admissible answers a likelihood judge chooses between (rank-1 model listed first).
ADMISSIBLE_RANKINGS = {
    "model_1": "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]",
    "model_2": "[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]",
}
ORDERS = ("candidate_first", "reference_first")
FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```$", re.S)
THINK = re.compile(r"<think>.*?</think>", re.S)


def ranking_prompt(instruction: str, output_1: str, output_2: str) -> str:
    return RANKING_PROMPT.format(instruction=instruction, output_1=output_1, output_2=output_2)


@dataclass
class ParsedRanking:
    winner: str | None  # "model_1" / "model_2", or None when unparseable
    error: str | None = None  # why it could not be read
    repair: str | None = None  # what was stripped around the literal, if anything


def parse_ranking(text: str, max_chars: int = 4000) -> ParsedRanking:
    """The rank-1 model of a judge answer, read as a Python literal only (never executed)."""
    if not isinstance(text, str) or not text.strip():
        return ParsedRanking(None, "empty")
    body, repair = THINK.sub("", text).strip(), None
    fenced = FENCE.match(body)
    if fenced:
        body, repair = fenced.group(1).strip(), "code_fence"
    if not (body.startswith("[") and body.endswith("]")):
        start, end = body.find("["), body.rfind("]")
        if start < 0 or end <= start:
            return ParsedRanking(None, "no_list")
        body, repair = body[start: end + 1], "prose_around"
    if len(body) > max_chars:  # bound the work literal_eval may do on an adversarial answer
        return ParsedRanking(None, "too_long")
    try:
        value = ast.literal_eval(body)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return ParsedRanking(None, "not_a_literal", repair)
    return _winner_of(value, repair)


def _winner_of(value, repair: str | None) -> ParsedRanking:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return ParsedRanking(None, "not_two_entries", repair)
    ranks = {}
    for entry in value:
        if not isinstance(entry, dict) or set(entry) != {"model", "rank"}:
            return ParsedRanking(None, "bad_entry", repair)
        model, rank = entry["model"], entry["rank"]
        if model not in MODELS or model in ranks or isinstance(rank, bool) or not isinstance(rank, int):
            return ParsedRanking(None, "bad_entry", repair)
        ranks[model] = rank
    if sorted(ranks.values()) != [1, 2]:
        return ParsedRanking(None, "ranks_not_1_2", repair)
    return ParsedRanking(min(ranks, key=ranks.get), None, repair)


# ---------------------------------------------------------------- judging pairs

def judge_conversations(pairs: list[dict]) -> list[tuple[int, str, list[dict]]]:
    """(pair index, order, messages) for both orders of every pair {"prompt", "candidate", "reference"}."""
    out = []
    for i, p in enumerate(pairs):
        out.append((i, "candidate_first", [{"role": "user", "content": ranking_prompt(
            p["prompt"], p["candidate"], p["reference"])}]))
        out.append((i, "reference_first", [{"role": "user", "content": ranking_prompt(
            p["prompt"], p["reference"], p["candidate"])}]))
    return out


def judge_pairs(pairs: list[dict], judge, max_chars: int = 4000) -> list[dict]:
    """One record per (pair, order): who won, or why there is no verdict ("failed"/"unparseable")."""
    convs = judge_conversations(pairs)
    if judge.mode == "likelihood":
        replies = [judge.choose(m, [ADMISSIBLE_RANKINGS["model_1"], ADMISSIBLE_RANKINGS["model_2"]])
                   for _, _, m in convs]
    else:
        replies = judge.ask_many([m for _, _, m in convs])
    records = []
    for (i, order, _), reply in zip(convs, replies):
        rec = {"pair": i, "order": order, "winner": None, "status": "ok", "reason": None,
               "answer": None if reply.text is None else reply.text[:500]}
        if reply.text is None:
            rec.update(status="failed", reason=reply.error)
        else:
            parsed = parse_ranking(reply.text, max_chars)
            if parsed.winner is None:
                rec.update(status="unparseable", reason=parsed.error)
            else:
                candidate_slot = "model_1" if order == "candidate_first" else "model_2"
                rec["winner"] = "candidate" if parsed.winner == candidate_slot else "reference"
                rec["reason"] = parsed.repair
        if reply.scores is not None:
            rec["loglik"] = reply.scores
        records.append(rec)
    return records


def pair_scores(records: list[dict], n_pairs: int) -> list[float | None]:
    """Per pair: 1 / 0.5 / 0 for the evaluated model, None unless both orders gave a verdict."""
    by_pair: dict[int, dict[str, str | None]] = {i: {} for i in range(n_pairs)}
    for r in records:
        by_pair[r["pair"]][r["order"]] = r["winner"]
    out = []
    for i in range(n_pairs):
        verdicts = [by_pair[i].get(o) for o in ORDERS]
        out.append(None if None in verdicts else sum(v == "candidate" for v in verdicts) / 2)
    return out


def bootstrap_ci(values: list[float], level: float = 0.95, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (nan, nan when there are no values)."""
    if not values:
        return float("nan"), float("nan")
    arr = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, len(arr), size=(n, len(arr)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@dataclass
class WinRate:
    win_rate: float  # percent, nan when no pair is complete
    ci_low: float
    ci_high: float
    n_pairs: int
    n_complete: int  # pairs with a verdict in both orders
    wins: int
    ties: int  # the two orders disagreed
    losses: int
    n_unparseable: int  # judgments (not pairs)
    n_failed: int
    win_rate_candidate_first: float  # per-order rates expose the judge's position bias
    win_rate_reference_first: float

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_win_rate(records: list[dict], n_pairs: int, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> WinRate:
    scores = [s for s in pair_scores(records, n_pairs) if s is not None]
    lo, hi = bootstrap_ci(scores, level, n_boot, seed)

    def order_rate(order):
        ws = [r["winner"] == "candidate" for r in records if r["order"] == order and r["winner"]]
        return 100 * float(np.mean(ws)) if ws else float("nan")

    return WinRate(
        win_rate=100 * float(np.mean(scores)) if scores else float("nan"), ci_low=100 * lo, ci_high=100 * hi,
        n_pairs=n_pairs, n_complete=len(scores), wins=scores.count(1.0), ties=scores.count(0.5),
        losses=scores.count(0.0), n_unparseable=sum(r["status"] == "unparseable" for r in records),
        n_failed=sum(r["status"] == "failed" for r in records),
        win_rate_candidate_first=order_rate("candidate_first"), win_rate_reference_first=order_rate("reference_first"))


def uf_win_rate(prompts: list[str], candidates: list[str], references: list[str], judge, *, max_chars: int = 4000,
                level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[WinRate, list[dict]]:
    """Win rate of ``candidates`` against ``references`` on the same prompts, and every judgment."""
    pairs = [{"prompt": p, "candidate": c, "reference": r} for p, c, r in zip(prompts, candidates, references)]
    records = judge_pairs(pairs, judge, max_chars)
    return summarize_win_rate(records, len(pairs), level, n_boot, seed), records
