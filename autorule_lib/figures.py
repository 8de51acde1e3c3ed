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


def log_frame(log_history: list[dict]) -> pd.DataFrame:
    """A trainer's log history (one row per logged step; the final summary row dropped)."""
    rows = [r for r in log_history if "step" in r and "train_runtime" not in r]
    if not rows:
        return pd.DataFrame()
    # TRL's PPO logs its metrics as formatted strings
    return pd.DataFrame(rows).set_index("step").apply(pd.to_numeric, errors="coerce")


def plot_curves(curves: dict[str, pd.DataFrame], keys: list[str], title: str = ""):
    """One panel per logged key, one line per run (runs lacking a key are skipped)."""
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in df.columns for df in curves.values())]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, df in curves.items():
            if key in df.columns:
                ax.plot(df.index, df[key], marker="o", label=name)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_score_distributions(chosen: list[float], rejected: list[float], mean: float, std: float):
    """Normalised RM scores of chosen vs rejected responses."""
    import matplotlib.pyplot as plt

    z = lambda xs: [(x - mean) / std for x in xs]
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.hist(z(chosen), bins=20, alpha=0.6, label="chosen")
    ax.hist(z(rejected), bins=20, alpha=0.6, label="rejected")
    ax.set_xlabel("(RM score - mu) / sigma")
    ax.legend()
    fig.tight_layout()
    return fig


def deviations_table(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["setting", "paper / original", "this implementation"]).set_index("setting")
