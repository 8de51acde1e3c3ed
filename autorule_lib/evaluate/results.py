"""The results table: every method x metric of a run, each number with its provenance, and the paper's
relative gains beside ours (book/method.md §6).

Absolute numbers from the paper are not available to us; the only published numbers we compare
with are two relative gains of AutoRule over RM-only GRPO (same RM, Llama-3-8B). Nothing else is
quoted, and nothing is invented. A smoke run's numbers come from tiny random models and fixture data
and are labelled as such.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..artifacts import read_json
from ..layout import METRIC_CHAPTERS, Run
from ..models import model_id

# book/method.md §6. The rule set behind the headline is not stated there, so both AutoRule runs are compared.
PAPER_RELATIVE_GAINS = [
    {"metric": "alpaca_lc_win_rate", "baseline": "rm_only", "paper_gain_pct": 28.6,
     "paper_note": "AlpacaEval 2.0 LC win rate, AutoRule vs RM-only GRPO (a later version: +25.6% vs GPT-4)"},
    {"metric": "mt_bench_turn_2", "baseline": "rm_only", "paper_gain_pct": 6.1,
     "paper_note": "MT-Bench turn-2 score on the held-out questions, AutoRule vs RM-only GRPO"},
]
AUTORULE_METHODS = ("autorule_uf", "autorule_mt")
METRIC_LABELS = {
    "uf_win_rate": "UF win rate (%)", "alpaca_lc_win_rate": "AlpacaEval 2.0 LC (%)",
    "alpaca_win_rate": "AlpacaEval 2.0 WR (%)", "mt_bench_turn_1": "MT-Bench turn 1", "mt_bench_turn_2": "MT-Bench turn 2",
}
REFERENCE_NOTE = "reference side (50% by construction)"


def is_smoke(profile) -> bool:
    """A demonstration run (the profile says so): its numbers test the code, not the method."""
    return profile.demonstration


def metric_row(ctx, method: str, metric: str, value, *, checkpoint=None, judge: str | None = None, ci_low=None,
               ci_high=None, n=None, unit: str = "", note: str = "", step: int | None = None) -> dict:
    """One number and where it came from: run, profile, checkpoint (path and identity), judge."""
    ckpt = Path(checkpoint) if checkpoint else None
    return {
        "method": method, "metric": metric, "value": _num(value), "ci_low": _num(ci_low), "ci_high": _num(ci_high),
        "n": n, "unit": unit, "step": step, "stage": ctx.name, "run": str(ctx.run_dir),
        "profile": ctx.profile.name, "profile_hash": ctx.profile.hash(), "smoke": is_smoke(ctx.profile),
        "checkpoint": str(ckpt) if ckpt else None,
        "checkpoint_id": model_id(ckpt) if ckpt and ckpt.exists() else None,
        "judge": judge, "note": note,
    }


def _num(v):
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def load_metric_rows(run: Run, chapters=METRIC_CHAPTERS) -> tuple[list[dict], list[str]]:
    """All metric rows the evaluation chapters wrote, and the chapters that have not written theirs yet."""
    rows, missing = [], []
    for chapter in chapters:
        path = run.layout.metrics(chapter)
        if path.exists():
            rows += read_json(path)
        else:
            missing.append(chapter)
    return rows, missing


def results_table(rows: list[dict], methods: list[str] | None = None) -> pd.DataFrame:
    """Methods x metrics of the final checkpoints: 'value [ci_low, ci_high]' (blank where not measured)."""
    finals = [r for r in rows if r["step"] is None and r["metric"] in METRIC_LABELS]
    table = {}
    for r in finals:
        if r["value"] is None:
            cell = r["note"] if r["note"] == REFERENCE_NOTE else "no verdicts"
        else:
            cell = f"{r['value']:.1f}" if r["unit"] == "%" else f"{r['value']:.2f}"
        if r["value"] is not None and r["ci_low"] is not None and r["ci_high"] is not None:
            digits = 1 if r["unit"] == "%" else 2
            cell += f" [{r['ci_low']:.{digits}f}, {r['ci_high']:.{digits}f}]"
        table.setdefault(r["method"], {})[METRIC_LABELS[r["metric"]]] = cell
    order = methods or list(table)
    df = pd.DataFrame.from_dict({m: table.get(m, {}) for m in order}, orient="index")
    df = df.reindex(columns=list(METRIC_LABELS.values())).fillna("not measured")
    df.index.name = "method"
    return df


def provenance_table(rows: list[dict]) -> pd.DataFrame:
    """Where each number in the results table came from."""
    cols = ["method", "metric", "value", "n", "run", "checkpoint", "checkpoint_id", "judge", "profile_hash", "note"]
    finals = [r for r in rows if r["step"] is None]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in finals], columns=cols)


def value_of(rows: list[dict], method: str, metric: str) -> float | None:
    for r in rows:
        if r["method"] == method and r["metric"] == metric and r["step"] is None:
            return r["value"]
    return None


def relative_gains(rows: list[dict]) -> pd.DataFrame:
    """Our relative gain of each AutoRule run over RM-only GRPO beside the paper's, per headline metric."""
    out = []
    for g in PAPER_RELATIVE_GAINS:
        base = value_of(rows, g["baseline"], g["metric"])
        for method in AUTORULE_METHODS:
            ours = value_of(rows, method, g["metric"])
            if ours is None or base is None:
                gain, why = None, f"not measured (no {method if ours is None else g['baseline']} number)"
            elif base <= 0:
                gain, why = None, "baseline value is not positive: a relative gain is undefined"
            else:
                gain, why = 100 * (ours - base) / base, ""
            out.append({"metric": METRIC_LABELS[g["metric"]], "comparison": f"{method} vs {g['baseline']}",
                        "ours": None if ours is None else round(ours, 2),
                        "baseline": None if base is None else round(base, 2), "our gain (%)": None if gain is None else round(gain, 1),
                        "paper gain (%)": g["paper_gain_pct"], "note": why or g["paper_note"]})
    return pd.DataFrame(out)


def unmeasured(rows: list[dict], methods: list[str]) -> dict[str, list[str]]:
    """Per method, the headline metrics with no number (the reference side's own win rate is not missing)."""
    finals = {(r["method"], r["metric"]): r for r in rows if r["step"] is None}
    out = {}
    for m in methods:
        out[m] = [label for key, label in METRIC_LABELS.items()
                  if (m, key) not in finals or (finals[(m, key)]["value"] is None
                                                 and finals[(m, key)]["note"] != REFERENCE_NOTE)]
    return out
