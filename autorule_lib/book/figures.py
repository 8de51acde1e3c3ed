"""Tables and figures the chapters show (pandas + matplotlib), kept out of notebook cells."""
from __future__ import annotations

import math

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

    z = lambda xs: [(x - mean) / std for x in xs]  # noqa: E731
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.hist(z(chosen), bins=20, alpha=0.6, label="chosen")
    ax.hist(z(rejected), bins=20, alpha=0.6, label="rejected")
    ax.set_xlabel("(RM score - mu) / sigma")
    ax.legend()
    fig.tight_layout()
    return fig


def deviations_table(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["setting", "paper / original", "this implementation"]).set_index("setting")


def plot_rule_agreement(table: pd.DataFrame, title: str):
    """Agreement (bars) and coverage (dots) per rule; rules that separate no pair show no bar."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(table) + 2), 3.4))
    x = range(len(table))
    ax.bar(x, table["agreement"].fillna(0), color="tab:blue", alpha=0.75, label="agreement (among separated pairs)")
    ax.plot(x, table["coverage"], "o", color="tab:orange", label="coverage (pairs separated)")
    for i, value in enumerate(table["agreement"]):
        if value != value:  # NaN: the rule separates no pair, so agreement is undefined (not 0)
            ax.text(i, 0.02, "n/a", ha="center", fontsize=7, color="grey")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(x), [str(i) for i in table.index])
    ax.set_xlabel("rule")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return ax


# ---------------------------------------------------------------- evaluation chapters (07-09)

def _err(values, lows, highs):
    lo = [v - low if None not in (v, low) and not math.isnan(low) else 0 for v, low in zip(values, lows)]
    hi = [h - v if None not in (v, h) and not math.isnan(h) else 0 for v, h in zip(values, highs)]
    return [lo, hi]


def plot_win_rates(table: pd.DataFrame, title: str):
    """Bars of win rate with their intervals; the 50% line is a tie with the reference."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    v = table["win_rate"].tolist()
    ax.bar(table.index, v, yerr=_err(v, table["ci_low"].tolist(), table["ci_high"].tolist()), capsize=4,
           color="tab:blue")
    ax.axhline(50, color="grey", lw=1, ls="--")
    ax.set_ylim(0, 100)
    ax.set_ylabel("win rate (%)")
    ax.set_title(title)
    plt.xticks(rotation=20, ha="right")
    plt.tight_layout()
    return ax


def plot_mt_bench(results: dict[str, dict], title: str):
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for k, turn in enumerate(("turn_1", "turn_2")):
        v = [results[n][turn]["score"] for n in names]
        err = _err(v, [results[n][turn]["ci_low"] for n in names], [results[n][turn]["ci_high"] for n in names])
        ax.bar(x + (k - 0.5) * 0.38, v, 0.38, yerr=err, capsize=3, label=turn.replace("_", " "))
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylim(0, 10.5)
    ax.set_ylabel("score (1-10)")
    ax.set_title(title)
    ax.legend()
    plt.tight_layout()
    return ax


def plot_hacking(df: pd.DataFrame, title: str):
    """Per two-episode run: RM reward, rule reward and judged win rate against the training step."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("rm_reward", "RM reward (z)"), ("rule_reward", "rule reward"), ("uf_win_rate", "win rate vs SFT (%)")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, (col, label) in zip(axes, panels):
        for run, g in df.groupby("run"):
            g = g.sort_values("step")
            ax.plot(g["step"], g[col], marker="o", label=run)
            if col == "uf_win_rate":
                ax.fill_between(g["step"], g["ci_low"], g["ci_high"], alpha=0.15)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label)
    axes[2].axhline(50, color="grey", lw=1, ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    plt.tight_layout()
    return axes


def plot_probes(table: pd.DataFrame, title: str):
    """Mean RM reward and rule-satisfaction fraction of each degenerate probe beside the real responses."""
    import matplotlib.pyplot as plt

    cols = [c for c in ("rm_reward", "rule_fraction") if c in table.columns]
    fig, axes = plt.subplots(1, len(cols), figsize=(5 * len(cols), 3.2), squeeze=False)
    for ax, col in zip(axes[0], cols):
        ax.barh(table.index, table[col], color=["tab:green" if i in ("chosen", "rejected") else "tab:red"
                                                 for i in table.index])
        ax.axvline(0, color="grey", lw=1)
        ax.set_title(col)
    fig.suptitle(title)
    plt.tight_layout()
    return axes


def plot_relative_gains(gains: pd.DataFrame, title: str):
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(gains))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    missing = [g is None or (isinstance(g, float) and math.isnan(g)) for g in gains["our gain (%)"]]
    ours = [0 if m else g for m, g in zip(missing, gains["our gain (%)"])]
    ax.bar(x - 0.2, ours, 0.4, label="this run")
    for xi, m in zip(x, missing):
        if m:  # a blank bar would read as "no gain"
            ax.text(xi - 0.2, 0.5, "not\nmeasured", ha="center", va="bottom", fontsize=7, color="grey")
    ax.bar(x + 0.2, gains["paper gain (%)"], 0.4, label="paper (Llama-3-8B)")
    ax.set_xticks(x, [f"{m}\n{c}" for m, c in zip(gains["metric"], gains["comparison"])], fontsize=8)
    ax.axhline(0, color="grey", lw=1)
    ax.set_ylabel("relative gain (%)")
    ax.set_title(title)
    ax.legend()
    plt.tight_layout()
    return ax
