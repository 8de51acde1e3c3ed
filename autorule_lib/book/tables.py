"""Tables the evaluation and results chapters show: responses, win rates and MT-Bench scores.
"""
from __future__ import annotations

import pandas as pd

from ..evaluate import winrate

# ---------------------------------------------------------------- tables for the chapter


def response_table(responses: dict[str, list[dict]]) -> pd.DataFrame:
    rows = []
    for name, rs in responses.items():
        rows.append({"method": name, "responses": len(rs), "mean tokens": sum(r["n_tokens"] for r in rs) / len(rs),
                     "stopped at EOS": sum(r["finished"] for r in rs) / len(rs),
                     "from cache": sum(r["cached"] for r in rs)})
    return pd.DataFrame(rows).set_index("method")


def winrate_table(results: dict[str, winrate.WinRate]) -> pd.DataFrame:
    cols = ["win_rate", "ci_low", "ci_high", "n_complete", "wins", "ties", "losses", "n_unparseable", "n_failed",
            "win_rate_candidate_first", "win_rate_reference_first"]
    return pd.DataFrame([{"method": k, **{c: v.to_dict()[c] for c in cols}} for k, v in results.items()],
                        columns=["method"] + cols).set_index("method").round(1)


def mt_table(results: dict[str, dict]) -> pd.DataFrame:
    rows = [{"method": k, "turn 1": v["turn_1"]["score"], "turn 1 CI": _ci(v["turn_1"]),
             "turn 2": v["turn_2"]["score"], "turn 2 CI": _ci(v["turn_2"]), "unparseable": v["n_unparseable"],
             "failed": v["n_failed"]} for k, v in results.items()]
    return pd.DataFrame(rows).set_index("method").round(2)


def _ci(s: dict) -> str:
    return f"[{s['ci_low']:.2f}, {s['ci_high']:.2f}]"
