"""Data preparation (book/method.md §1): UltraFeedback sets with the length/quality filter, MT-Bench splits.

Sources are a Hub id, a ``save_to_disk`` folder, or a folder of ``<split>.jsonl`` / ``<split>.parquet``.
Every row is checked against the Hub schema first; a malformed row stops preparation with its split,
index and field named, unless the caller asks to skip and count it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..config import DataConfig
from ..profiles import is_local_source
from ..artifacts import provenance, write_json
from .. import models

UF_SPLITS = ("train_prefs", "test_prefs", "train_sft", "test_sft")
UF_COLUMNS = ("prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected")
UF_DROP_REASONS = ("malformed", "too_long", "score_not_higher", "contains_confidence")
MT_SPLIT = "human"
MT_COLUMNS = ("question_id", "model_a", "model_b", "winner", "judge", "conversation_a", "conversation_b", "turn")
MT_DROP_REASONS = ("tie", "malformed")
MT_FIRST_QUESTION, MT_BLOCK = 81, 10
PROCESSED_REPO = "processed_ultrafeedback_binarized_prefs_sft"


class SchemaError(ValueError):
    """A source row does not match the Hub schema."""

    def __init__(self, split: str, index: int, field: str, problem: str):
        self.split, self.index, self.field, self.problem = split, index, field, problem
        super().__init__(f"split {split!r}, row {index}, field {field!r}: {problem}")


# ---------------------------------------------------------------- reading sources

def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def load_source(source: str, splits: Iterable[str] | None = None) -> dict[str, list[dict]]:
    """Rows per split from a Hub id, a ``save_to_disk`` folder, or per-split JSONL/parquet files."""
    wanted = list(splits) if splits is not None else None
    path = Path(source).expanduser()
    if is_local_source(source) or path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"data source {source!r}: no such directory")
        if (path / "dataset_dict.json").exists():
            import datasets

            dsd = datasets.load_from_disk(str(path))
            found = {name: dsd[name] for name in dsd}
        else:
            found = {}
            for f in sorted(path.iterdir()):
                if f.suffix in (".jsonl", ".parquet"):
                    found[f.stem] = f
        missing = [s for s in (wanted or []) if s not in found]
        if missing or not found:
            raise FileNotFoundError(
                f"data source {source!r}: missing split(s) {missing or 'all'}; found {sorted(found) or 'nothing'}"
                " (expected <split>.jsonl, <split>.parquet or a save_to_disk folder)")
        out = {}
        for name in wanted or sorted(found):
            item = found[name]
            if isinstance(item, Path) and item.suffix == ".jsonl":
                out[name] = _read_jsonl(item)
            elif isinstance(item, Path):
                import pyarrow.parquet as pq

                out[name] = pq.read_table(item).to_pylist()
            else:
                out[name] = item.to_list()
        return out
    import datasets  # a Hub id: the real loader, cached by datasets

    if wanted is None:
        return {name: ds.to_list() for name, ds in datasets.load_dataset(source).items()}
    return {name: datasets.load_dataset(source, split=name).to_list() for name in wanted}


def iter_texts(source: str) -> Iterator[str]:
    """Every prompt and message text in a source (tokenizer training corpus)."""
    for rows in load_source(source).values():
        for row in rows:
            for key, value in row.items():
                if key == "prompt" and isinstance(value, str):
                    yield value
                elif isinstance(value, list):
                    yield from (m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str))


# ---------------------------------------------------------------- schema checks

def _check_messages(value: Any, name: str, min_len: int) -> tuple[str, str] | None:
    """Alternating user/assistant turns, starting with the user, string contents. An empty content is
    data, not a schema error: the original's filter passes such rows (so do we)."""
    if not isinstance(value, list) or len(value) < min_len:
        return name, f"expected a list of at least {min_len} messages, got {value!r:.80}"
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or "role" not in msg:
            return f"{name}[{i}]", f"expected {{'role', 'content'}}, got {msg!r:.80}"
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            return f"{name}[{i}].role", f"expected {expected!r} at this position, got {msg['role']!r}"
    return None


def check_uf_row(row: dict) -> tuple[str, str] | None:
    """(field, problem) for the first schema violation of an UltraFeedback row, else None."""
    for col in UF_COLUMNS:
        if col not in row or row[col] is None:
            return col, "missing"
    if not isinstance(row["prompt"], str):  # an empty prompt is data (the original keeps it), not malformed
        return "prompt", "not a string"
    for col in ("chosen", "rejected", "messages"):
        problem = _check_messages(row[col], col, 2)
        if problem:
            return problem
    for col in ("score_chosen", "score_rejected"):
        if isinstance(row[col], bool) or not isinstance(row[col], (int, float)):
            return col, f"expected a number, got {row[col]!r}"
    return None


def check_mt_row(row: dict) -> tuple[str, str] | None:
    """(field, problem) for the first schema violation of an MT-Bench judgment row, else None."""
    for col in MT_COLUMNS:
        if col not in row or row[col] is None:
            return col, "missing"
    if isinstance(row["question_id"], bool) or not isinstance(row["question_id"], int):
        return "question_id", f"expected an int, got {row['question_id']!r}"
    if row["turn"] not in (1, 2):
        return "turn", f"expected 1 or 2, got {row['turn']!r}"
    winner = row["winner"]
    if not isinstance(winner, str) or not (winner in ("model_a", "model_b") or winner.startswith("tie")):
        return "winner", f"expected 'model_a', 'model_b' or a tie value, got {winner!r}"
    for col in ("conversation_a", "conversation_b"):
        problem = _check_messages(row[col], col, 2 * row["turn"])
        if problem:
            return problem
    return None


@dataclass
class SplitReport:
    rows_in: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    malformed_examples: list[str] = field(default_factory=list)


def _validated(split: str, rows: list[dict], check, skip_bad_rows: bool, report: SplitReport) -> list[dict]:
    good = []
    for i, row in enumerate(rows):
        problem = check(row)
        if problem is None:
            good.append(row)
            continue
        if not skip_bad_rows:
            raise SchemaError(split, i, *problem)
        report.dropped["malformed"] += 1
        if len(report.malformed_examples) < 5:
            report.malformed_examples.append(str(SchemaError(split, i, *problem)))
    return good


# ---------------------------------------------------------------- UltraFeedback

def add_content_columns(row: dict) -> dict:
    """The original's preprocessing: keep every column, add response / chosen_content / rejected_content."""
    out = dict(row)
    out["response"] = row["messages"][1]["content"] if len(row["messages"]) > 1 else None
    out["chosen_content"] = row["chosen"][1]["content"]
    out["rejected_content"] = row["rejected"][1]["content"]
    return out


def token_counts(tokenizer, texts: list[str], batch_size: int = 1000) -> list[int]:
    """Lengths as ``tokenizer.encode`` gives them, BOS included (the filter's definition)."""
    counts = []
    for i in range(0, len(texts), batch_size):
        counts.extend(len(ids) for ids in tokenizer(texts[i: i + batch_size])["input_ids"])
    return counts


def filter_reasons(rows: list[dict], tokenizer, max_tokens: int = 512) -> list[str | None]:
    """Per row, the first failing reason of the length/quality filter (None = kept).

    Order: too_long (prompt, chosen or rejected >= max_tokens tokens), score_not_higher
    (score_chosen <= score_rejected), contains_confidence (the word in either response, any case).
    """
    lengths = [token_counts(tokenizer, [r[k] for r in rows]) for k in ("prompt", "chosen_content", "rejected_content")]
    reasons = []
    for i, r in enumerate(rows):
        if max(col[i] for col in lengths) >= max_tokens:
            reasons.append("too_long")
        elif not r["score_chosen"] > r["score_rejected"]:
            reasons.append("score_not_higher")
        elif "confidence" in r["chosen_content"].lower() or "confidence" in r["rejected_content"].lower():
            reasons.append("contains_confidence")
        else:
            reasons.append(None)
    return reasons


@dataclass
class PreparedUltraFeedback:
    processed: dict[str, list[dict]]  # every valid row with the added columns (what the original pushes)
    sets: dict[str, list[dict]]  # sft_train, sft_eval, rm_train, rm_eval, rl_prompts, uf_test
    report: dict[str, SplitReport]


def prepare_ultrafeedback(source_rows: dict[str, list[dict]], tokenizer, cfg: DataConfig) -> PreparedUltraFeedback:
    """SFT, RM, RL-prompt and UF test sets from the four UltraFeedback splits."""
    processed, kept, report = {}, {}, {}
    for split in UF_SPLITS:
        if split not in source_rows:
            raise KeyError(f"UltraFeedback source lacks split {split!r}")
        rep = report[split] = SplitReport(rows_in=len(source_rows[split]), dropped=dict.fromkeys(UF_DROP_REASONS, 0))
        rows = [add_content_columns(r) for r in _validated(split, source_rows[split], check_uf_row,
                                                           cfg.skip_bad_rows, rep)]
        processed[split] = rows
        reasons = filter_reasons(rows, tokenizer, cfg.max_tokens)
        apply = cfg.filter_training_data or split == "test_prefs"
        kept[split] = [r for r, why in zip(rows, reasons) if why is None or not apply]
        if apply:
            for why in reasons:
                if why:
                    rep.dropped[why] += 1
        rep.rows_kept = len(kept[split])
    sets = {
        "sft_train": kept["train_sft"],
        "sft_eval": kept["test_sft"],
        "rm_train": kept["train_prefs"],
        "rm_eval": kept["test_prefs"],
        "rl_prompts": [{"prompt": r["prompt"], "prompt_id": r["prompt_id"]} for r in kept["train_prefs"]],
        "uf_test": kept["test_prefs"][: cfg.uf_test_size],
    }
    return PreparedUltraFeedback(processed, sets, report)


# ---------------------------------------------------------------- MT-Bench

def is_tie(winner: str) -> bool:
    return winner not in ("model_a", "model_b")


def split_questions(question_ids: Iterable[int], mode: str = "intended") -> tuple[list[int], list[int]]:
    """(extraction ids, held-out ids). Blocks of 10 per category from id 81.

    intended: first 5 of each block for extraction, last 5 held out (40/40 on the full set).
    original: the released helper's off-by-range bug keeps only the first id of each half (8/8).
    """
    if mode not in ("intended", "original"):
        raise ValueError(f"mt_split: {mode!r} is not 'intended' or 'original'")
    train, held = [], []
    for q in sorted(set(question_ids)):
        offset = (q - MT_FIRST_QUESTION) % MT_BLOCK
        if mode == "intended":
            (train if offset < 5 else held).append(q)
        elif offset == 0:
            train.append(q)
        elif offset == 5:
            held.append(q)
    return train, held


def sample_per_question(rows: list[dict], k: int, seed: int = 42) -> list[dict]:
    """Up to k rows per question, drawn without replacement by a fresh generator per question."""
    by_q: dict[int, list[dict]] = {}
    for r in rows:
        by_q.setdefault(r["question_id"], []).append(r)
    out = []
    for q in sorted(by_q):
        group = by_q[q]
        if len(group) <= k:
            out.extend(group)
        else:
            picks = np.random.default_rng(seed).choice(len(group), size=k, replace=False)
            out.extend(group[i] for i in picks)
    return out


@dataclass
class PreparedMTBench:
    sets: dict[str, list[dict]]  # mt_train (all), mt_train_sample (k per question), mt_heldout
    split: dict[str, list[int]]
    report: dict[str, SplitReport]


def prepare_mt_bench(source_rows: dict[str, list[dict]], cfg: DataConfig) -> PreparedMTBench:
    if MT_SPLIT not in source_rows:
        raise KeyError(f"MT-Bench source lacks split {MT_SPLIT!r}")
    rows_in = source_rows[MT_SPLIT]
    rep = SplitReport(rows_in=len(rows_in), dropped=dict.fromkeys(MT_DROP_REASONS, 0))
    rows = _validated(MT_SPLIT, rows_in, check_mt_row, cfg.skip_bad_rows, rep)
    decided = [r for r in rows if not is_tie(r["winner"])]
    rep.dropped["tie"] = len(rows) - len(decided)
    rep.rows_kept = len(decided)
    train_ids, held_ids = split_questions((r["question_id"] for r in rows), cfg.mt_split)
    train = [r for r in decided if r["question_id"] in set(train_ids)]
    sets = {
        "mt_train": train,
        "mt_train_sample": sample_per_question(train, cfg.mt_samples_per_question, cfg.mt_sample_seed),
        "mt_heldout": [r for r in decided if r["question_id"] in set(held_ids)],
    }
    return PreparedMTBench(sets, {"train_question_ids": train_ids, "heldout_question_ids": held_ids}, {MT_SPLIT: rep})


# ---------------------------------------------------------------- writing

def report_dict(report: dict[str, SplitReport]) -> dict:
    return {s: {"rows_in": r.rows_in, "rows_kept": r.rows_kept, "dropped": r.dropped,
                **({"malformed_examples": r.malformed_examples} if r.malformed_examples else {})}
            for s, r in report.items()}


def save_sets(sets: dict[str, list[dict]], out_dir: str | Path) -> Path:
    """Each set as a split of one ``save_to_disk`` DatasetDict (readable by ``load_source``)."""
    import datasets

    out_dir = Path(out_dir)
    dsd = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({})
                                for name, rows in sets.items()})
    dsd.save_to_disk(str(out_dir))
    return out_dir


def push_processed(processed: dict[str, list[dict]], hf_username: str) -> str:
    """Push the processed splits as the original did; the token comes from the environment only."""
    import datasets

    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        raise RuntimeError("--hf-username given but neither HF_TOKEN nor HUGGING_FACE_HUB_TOKEN is set")
    repo = f"{hf_username}/{PROCESSED_REPO}"
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in processed.items()}).push_to_hub(repo, token=token)
    return repo


def prepare_data(profile, dataset: str, source: str, output_dir: str | Path, tokenizer: str | None = None,
                 hf_username: str | None = None, skip_bad_rows: bool | None = None,
                 models_dir: str | Path | None = None) -> dict:
    """The data-preparation stage: read ``source``, write the prepared sets, report.json and provenance.json.

    Returns the report (per input split: rows_in, rows_kept, dropped reason -> count).
    """
    import dataclasses

    cfg = profile.data if skip_bad_rows is None else dataclasses.replace(profile.data, skip_bad_rows=skip_bad_rows)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {"dataset": dataset, "source": source, "data_config": dataclasses.asdict(cfg)}
    if dataset == "ultrafeedback":
        tok_id = tokenizer or models.resolve(profile, "tokenizer", models_dir or out.parent / "models")
        prepared = prepare_ultrafeedback(load_source(source, UF_SPLITS), models.load_tokenizer(tok_id), cfg)
        save_sets(prepared.processed, out / "processed")
        save_sets(prepared.sets, out / "sets")
        extra.update(tokenizer=tok_id, set_sizes={k: len(v) for k, v in prepared.sets.items()})
        if hf_username or cfg.hf_username:
            extra["pushed_to"] = push_processed(prepared.processed, hf_username or cfg.hf_username)
    elif dataset == "mt_bench":
        prepared = prepare_mt_bench(load_source(source, [MT_SPLIT]), cfg)
        save_sets(prepared.sets, out / "sets")
        extra.update(question_split=prepared.split, set_sizes={k: len(v) for k, v in prepared.sets.items()})
    else:
        raise ValueError(f"dataset must be 'ultrafeedback' or 'mt_bench', got {dataset!r}")
    report = report_dict(prepared.report)
    write_json(out / "report.json", report)
    write_json(out / "provenance.json", provenance(profile, "data_preparation", **extra))
    return report
