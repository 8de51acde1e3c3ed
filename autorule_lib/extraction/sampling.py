"""Which preference pairs the reasoning model explains (book/method.md §2): the UltraFeedback and
MT-Bench samples, drawn with the profile's seeds so a re-run explains the same pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ExtractionConfig, Profile
from ..data.preparation import MT_SPLIT, is_tie, sample_per_question, split_questions

# ---------------------------------------------------------------- examples and samples


@dataclass
class Example:
    example_id: str
    conversation_a: list[dict]
    conversation_b: list[dict]
    winner: str  # "model_a" or "model_b"
    source: dict = field(default_factory=dict)  # dataset, split, row, ids, swapped

    @property
    def winner_letter(self) -> str:
        return "A" if self.winner == "model_a" else "B"


def sample_uf(rows: list[dict], n: int, seed: int, split: str = "train_prefs") -> list[Example]:
    """``n`` random preference pairs without replacement; the chosen response is always Assistant A."""
    picks = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
    return [Example(f"uf/{split}/{int(i)}", rows[i]["chosen"], rows[i]["rejected"], "model_a",
                    {"dataset": "ultrafeedback", "split": split, "row": int(i), "prompt_id": rows[i].get("prompt_id")})
            for i in picks]


def sample_mt(rows: list[dict], k: int, sample_seed: int, swap_seed: int, split: str = MT_SPLIT,
              question_ids: list[int] | None = None) -> list[Example]:
    """Ties dropped, up to ``k`` judgments per question (fresh generator per question), then A/B
    swapped with probability 0.5 so the winner is not always in the same position."""
    position = {id(r): i for i, r in enumerate(rows)}
    keep = set(question_ids) if question_ids is not None else None
    decided = [r for r in rows if not is_tie(r["winner"]) and (keep is None or r["question_id"] in keep)]
    swap_rng = np.random.default_rng(swap_seed)
    out = []
    for r in sample_per_question(decided, k, sample_seed):
        swapped = bool(swap_rng.random() < 0.5)
        a, b = (r["conversation_b"], r["conversation_a"]) if swapped else (r["conversation_a"], r["conversation_b"])
        winner = {"model_a": "model_b", "model_b": "model_a"}[r["winner"]] if swapped else r["winner"]
        source = {"dataset": "mt_bench", "split": split, "row": position[id(r)], "swapped": swapped,
                  **{k_: r[k_] for k_ in ("question_id", "model_a", "model_b", "judge", "turn", "winner")}}
        out.append(Example(f"mt/{split}/{position[id(r)]}", a, b, winner, source))
    return out


# ---------------------------------------------------------------- the three prompts

def serialize_conversation(messages: list[dict]) -> str:
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


# ---------------------------------------------------------------- entry points

def build_examples(profile: Profile, dataset: str, rows: list[dict], *, cfg: ExtractionConfig | None = None,
                   split: str = "", train_questions_only: bool = False) -> tuple[list[Example], dict]:
    """The sample of one dataset and a description of it (for provenance)."""
    cfg = cfg or profile.extraction
    if dataset == "uf":
        examples = sample_uf(rows, cfg.uf_num_examples, cfg.uf_sample_seed, split or "train_prefs")
        info = {"requested": cfg.uf_num_examples, "seed": cfg.uf_sample_seed}
    elif dataset == "mt":
        qids = split_questions((r["question_id"] for r in rows), profile.data.mt_split)[0] if train_questions_only else None
        examples = sample_mt(rows, cfg.mt_num_examples_per_question, profile.data.mt_sample_seed, cfg.mt_swap_seed,
                             split or MT_SPLIT, qids)
        info = {"per_question": cfg.mt_num_examples_per_question, "sample_seed": profile.data.mt_sample_seed,
                "swap_seed": cfg.mt_swap_seed, "question_split": profile.data.mt_split if qids else "given",
                "questions": sorted({e.source["question_id"] for e in examples})}
    else:
        raise ValueError(f"dataset_type must be 'uf' or 'mt', got {dataset!r}")
    info.update(split=split, rows_available=len(rows), drawn=len(examples))
    return examples, info


def uf_sample_pool(profile: Profile, data_dir: str | Path) -> tuple[str, str]:
    """(source, split) of the UF extraction pool in the data chapter's output folder ``data_dir``
    (``.../01_data_preparation/ultrafeedback``): the processed, *unfiltered* ``train_prefs`` as the
    original (so filtered-out pairs, e.g. "Confidence: 90%" ones, can be drawn), or with
    ``extraction.uf_sample_pool: filtered`` the filtered RM training set ``rm_train``."""
    if profile.extraction.uf_sample_pool == "filtered":
        return str(Path(data_dir) / "sets"), "rm_train"
    return str(Path(data_dir) / "processed"), "train_prefs"
