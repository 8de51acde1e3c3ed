"""Sanity checks of a run: did every reward move what it rewards?

Why: a pipeline whose rewards have the wrong sign, or whose training does nothing, still produces a
full results table. These checks say, from the run's own metrics files, whether training moved each
model the way its reward asks — on held-out prompts, not on the training log:

* the length penalty gives shorter completions than RM-only;
* the AutoRule reward raises the verifier's rule-satisfaction rate above RM-only's and SFT's;
* RM-only GRPO and PPO raise the mean RM score above SFT's;
* the two-episode runs' reward-hacking measurements differ between episode 1 and 2;
* every trained model answers differently from the SFT model.

A check is never tuned to pass: each one states its expected direction, prints the measured numbers
and says ``yes``, ``no`` or ``not measured``. On the smoke profile these checks are the only claim the
numbers support (the pipeline works and its rewards point the right way), and the tests assert them
on the seeded smoke run.

The held-out measurements (``measure_heldout``) score chapter 7's responses to the UltraFeedback test
prompts with the trained RM (z-normalised, as the GRPO reward) and with the verifier under each rule
set; they are written by the results chapter as ``09_results/metrics.json`` rows like any other number.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..layout import EVALUATION, HACKING, RESULTS, Run, RunLayout
from .results import metric_row
from .reward_hacking import mean_of_scored


# ---------------------------------------------------------------- held-out measurements

def load_responses(run: Run, methods: list[str]) -> dict[str, list[dict]]:
    """Chapter 7's responses per method (``responses/<method>.jsonl``); missing methods are left out."""
    out = {}
    for m in methods:
        path = run.layout.responses(m)
        if path.exists():
            out[m] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def measure_heldout(ctx, responses: dict[str, list[dict]], rm, rule_scorers: dict, checkpoints: dict) -> list[dict]:
    """Metric rows per method: mean completion tokens, mean RM reward (z), rule satisfaction per rule set,
    and the share of prompts answered exactly as the SFT model did.

    ``rm`` and each of ``rule_scorers`` are the reward-hacking chapter's scorers (``RMScores``,
    ``RuleScores``): the same RM and verifier the GRPO rewards used.
    """
    rows = []
    sft = {r["prompt_id"]: r["text"] for r in responses.get("sft", [])}
    for method, rs in responses.items():
        prompts, texts = [r["prompt"] for r in rs], [r["text"] for r in rs]
        ckpt = checkpoints.get(method)
        rows.append(metric_row(ctx, method, "mean_tokens", np.mean([r["n_tokens"] for r in rs]), checkpoint=ckpt,
                               n=len(rs), unit="tokens", note="completion tokens, chapter 7 responses"))
        rows.append(metric_row(ctx, method, "rm_score", mean_of_scored(rm(prompts, texts)), checkpoint=ckpt, n=len(rs),
                               note="RM reward (z-normalised with the frozen mu/sigma)"))
        for name, scorer in rule_scorers.items():
            scored = scorer(prompts, texts)
            checks = sum(len(scorer.rules) - s["unscored"] for s in scored)
            satisfied = sum(s["fraction"] * (len(scorer.rules) - s["unscored"]) for s in scored)
            rows.append(metric_row(ctx, method, f"rule_satisfaction_{name}", satisfied / checks if checks else None,
                                   checkpoint=ckpt, n=checks, judge=scorer.verifier.describe().get("verifier_id"),
                                   note=f"share of scored (response, rule) checks answered [[Yes]], {name} rules; "
                                        f"{sum(s['unscored'] for s in scored)} unscored"))
        if sft and method != "sft":
            same = [sft.get(r["prompt_id"]) == r["text"] for r in rs]
            rows.append(metric_row(ctx, method, "identical_to_sft", float(np.mean(same)), checkpoint=ckpt, n=len(rs),
                                   note="share of prompts answered exactly as the SFT model did"))
    return rows


# ---------------------------------------------------------------- the checks

@dataclass
class Compare:
    """``a`` op ``b`` on one final-checkpoint metric (``op``: '<' or '>')."""
    check: str
    metric: str
    a: str
    op: str
    b: str

    def evaluate(self, rows: list[dict], **_) -> dict:
        va, vb = _final(rows, self.a, self.metric), _final(rows, self.b, self.metric)
        holds = None if va is None or vb is None else (va < vb if self.op == "<" else va > vb)
        return {"check": self.check, "expected": f"{self.metric}: {self.a} {self.op} {self.b}",
                "measured": f"{self.a} {_fmt(va)}, {self.b} {_fmt(vb)}", "holds": _verdict(holds)}


@dataclass
class EpisodesDiffer:
    """The reward-hacking chapter's measurement at the end of episode 1 differs from the one at the end."""
    run: str
    metrics: tuple = ("rm_reward", "rule_reward")

    def evaluate(self, rows: list[dict], episodes: dict | None = None, **_) -> dict:
        check = f"{self.run}: the reward-hacking probes differ between episode 1 and 2"
        mine = [r for r in rows if r["stage"] == HACKING and r["method"] == self.run and r["step"]]
        steps = sorted({r["step"] for r in mine})
        n_ep = (episodes or {}).get(self.run, 2)
        last = steps[-1] if steps else None
        first_end = max((s for s in steps if s * n_ep <= last), default=None) if steps else None
        if last is None or first_end is None or first_end == last:
            return {"check": check, "expected": "episode 1 != episode 2",
                    "measured": f"checkpoints measured at steps {steps or 'none'}", "holds": _verdict(None)}
        val = lambda metric, step: next((r["value"] for r in mine if r["metric"] == metric and r["step"] == step), None)  # noqa: E731
        parts, differs = [], []
        for metric in self.metrics:
            v1, v2 = val(metric, first_end), val(metric, last)
            parts.append(f"{metric} step {first_end}: {_fmt(v1)}, step {last}: {_fmt(v2)}")
            if v1 is not None and v2 is not None:
                differs.append(abs(v1 - v2) > 1e-9)
        return {"check": check, "expected": f"{self.metrics[0]} (or {self.metrics[1]}) at the end of episode 1 "
                                            f"!= at the end of episode 2",
                "measured": "; ".join(parts), "holds": _verdict(any(differs) if differs else None)}


@dataclass
class TrainingChangedResponses:
    methods: tuple

    def evaluate(self, rows: list[dict], **_) -> dict:
        vals = {m: _final(rows, m, "identical_to_sft") for m in self.methods}
        measured = {m: v for m, v in vals.items() if v is not None}
        holds = all(v < 1.0 for v in measured.values()) if measured else None
        return {"check": "every trained model answers differently from the SFT model",
                "expected": "identical_to_sft < 1 for each",
                "measured": ", ".join(f"{m} {_fmt(v)}" for m, v in vals.items()), "holds": _verdict(holds)}


def default_checks(methods: list[str], two_episode_runs: list[str]) -> list:
    """The issue's checks, for the methods this run trained."""
    checks = [Compare("length penalty gives shorter completions than RM-only", "mean_tokens",
                      "length_penalty", "<", "rm_only")]
    for rule_set in ("uf", "mt"):
        run = f"autorule_{rule_set}"
        if run in methods:
            checks += [Compare(f"AutoRule ({rule_set.upper()} rules) raises rule satisfaction above RM-only",
                               f"rule_satisfaction_{rule_set}", run, ">", "rm_only"),
                       Compare(f"AutoRule ({rule_set.upper()} rules) raises rule satisfaction above SFT",
                               f"rule_satisfaction_{rule_set}", run, ">", "sft")]
    checks += [Compare("RM-only GRPO raises the mean RM score above SFT", "rm_score", "rm_only", ">", "sft"),
               Compare("PPO raises the mean RM score above SFT", "rm_score", "ppo", ">", "sft")]
    checks += [EpisodesDiffer(run) for run in two_episode_runs]
    checks.append(TrainingChangedResponses(tuple(m for m in methods if m != "sft")))
    return checks


def sanity_table(rows: list[dict], checks: list, episodes: dict | None = None) -> pd.DataFrame:
    """check | expected | measured | holds (yes / no / not measured), from the run's metric rows."""
    table = pd.DataFrame([c.evaluate(rows, episodes=episodes) for c in checks],
                         columns=["check", "expected", "measured", "holds"])
    return table.set_index("check")


def load_rows(layout: RunLayout, chapters=(EVALUATION, HACKING, RESULTS)) -> list[dict]:
    """Every metric row the given chapters of a run wrote (a chapter without a metrics file adds none)."""
    rows = []
    for chapter in chapters:
        path = layout.metrics(chapter)
        if path.exists():
            rows += json.loads(path.read_text())
    return rows


def _final(rows: list[dict], method: str, metric: str):
    return next((r["value"] for r in rows if r["method"] == method and r["metric"] == metric and r["step"] is None),
                None)


def _fmt(v) -> str:
    return "not measured" if v is None else f"{v:.3f}"


def _verdict(holds) -> str:
    return "not measured" if holds is None else ("yes" if holds else "no")


def heldout_table(rows: list[dict]) -> pd.DataFrame:
    """Methods x held-out measurements, for the results chapter."""
    df = pd.DataFrame([r for r in rows if r["step"] is None])
    if df.empty:
        return df
    table = df.pivot_table(index="method", columns="metric", values="value", sort=False)
    return table.reindex(index=list(dict.fromkeys(df["method"]))).round(3)
