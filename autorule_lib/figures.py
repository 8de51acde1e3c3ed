"""Tables and figures the chapters show (pandas + matplotlib), kept out of notebook cells."""
from __future__ import annotations

import pandas as pd


def drop_report_table(report: dict) -> pd.DataFrame:
    """report.json -> one row per input split: rows in, kept, and each drop reason."""
    rows = []
    for split, r in report.items():
        rows.append({"split": split, "rows_in": r["rows_in"], **r["dropped"], "rows_kept": r["rows_kept"]})
    return pd.DataFrame(rows).set_index("split")


def plot_drop_reasons(report: dict, title: str = "Rows dropped by the length/quality filter"):
    import matplotlib.pyplot as plt

    table = drop_report_table(report).drop(columns=["rows_in", "rows_kept"])
    ax = table.plot.bar(stacked=True, figsize=(7, 3.2), rot=0)
    ax.set_ylabel("rows")
    ax.set_title(title)
    plt.tight_layout()
    return ax


def profile_summary(profile) -> pd.DataFrame:
    """The settings a reader needs first: models, data, clients, reward."""
    p = profile
    rows = [
        ("profile", f"{p.name} (hash {p.hash()})"), ("device / precision", f"{p.device} / {p.precision}"),
        ("policy (base)", p.models.policy), ("verifier", p.models.verifier),
        ("UltraFeedback source", p.data.ultrafeedback_source), ("MT-Bench source", p.data.mt_bench_source),
        ("rule-extraction client / model", f"{p.extraction.llm} / {p.extraction.model}"),
        ("UF examples explained", p.extraction.uf_num_examples),
        ("verifier mode / backend", f"{p.verifier.mode} / {p.verifier.backend}"),
        ("reward", f"RM x {p.reward.rm_weight} + rule ({p.reward.rule_reward}) x {p.reward.rule_weight}"),
        ("GRPO runs", ", ".join(p.grpo_variants) or "-"),
    ]
    return pd.DataFrame(rows, columns=["setting", "value"]).set_index("setting")
