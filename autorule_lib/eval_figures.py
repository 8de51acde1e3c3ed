"""Figures of the evaluation chapters (matplotlib), kept out of notebook cells."""
from __future__ import annotations

import math

import pandas as pd


def _err(values, lows, highs):
    lo = [v - l if None not in (v, l) and not math.isnan(l) else 0 for v, l in zip(values, lows)]
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
