"""Before submitting: GPU-hours, verifier calls and LLM calls per job, from the profile and stated constants.

These are planning numbers, not measurements. Every figure below is an assumption, written where it is
used and printed with the estimate; change a constant here if your cluster or data differ. Counts that
the run already knows (prepared set sizes from stage 01, rule counts from stage 02) replace the defaults.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .. import layout
from ..artifacts import write_json
from ..config import Profile

# --- hardware (A100-80GB class; an L40S, as the paper used, is ~1.5-2x slower, an H100 ~2-3x faster)
GPU_BF16_TFLOPS = 312.0          # dense bf16 peak of one GPU
TRAIN_MFU = 0.35                 # fraction of peak a ZeRO-3 trainer reaches on 8B models
DECODE_TOKENS_PER_S_8B = 2500.0  # vLLM, one GPU, large batch, 8B model; scales ~1/params (memory bound)
PREFILL_TOKENS_PER_S_8B = 10000.0  # vLLM prompt processing, one GPU, 8B; prefix-cache hits make it cheaper
HF_GENERATE_SLOWDOWN = 5.0       # transformers' generate (no paged attention / continuous batching) vs vLLM
# --- data (UltraFeedback after the <512-token filter; the method, book/method.md §4, says ~33k train_prefs prompts)
FILTERED_ROWS = 33_000
MEAN_PROMPT_TOKENS = 150
MEAN_RESPONSE_TOKENS = 250
RL_COMPLETION_FRACTION = 0.5     # RL policies write longer than the data: mean rollout = half the budget
VERIFIER_TEMPLATE_TOKENS = 200   # judge instructions + rule around the conversation
VERIFIER_PARITY_OUTPUT_TOKENS = 64  # mean greedy answer before [[Yes]]/[[No]] (budget: max_new_tokens)
MT_QUESTIONS = {"intended": 40, "original": 8}   # extraction questions of each MT-Bench split
ALPACA_EVAL_PROMPTS = 805
PAPER_RULES = {"uf": 25, "mt": 20}
PAPER_GRPO_GPU_HOURS = "192-384 (24-48 h on 8 GPUs per run; book/method.md §4 and the paper)"

ASSUMPTIONS = [
    f"GPU: {GPU_BF16_TFLOPS:g} dense bf16 TFLOP/s, training at {TRAIN_MFU:.0%} MFU (6 x params FLOPs per token "
    "trained, 2 x params per token scored)",
    f"vLLM on one GPU for an 8B model: {DECODE_TOKENS_PER_S_8B:g} generated and {PREFILL_TOKENS_PER_S_8B:g} "
    f"prompt tokens/s, scaled by 8B / model size; generation without vLLM (GRPO use_vllm false, PPO, a "
    f"transformers verifier) {HF_GENERATE_SLOWDOWN:g}x slower",
    f"data: {FILTERED_ROWS} filtered UltraFeedback rows per split unless stage 01 has run; mean prompt "
    f"{MEAN_PROMPT_TOKENS} and response {MEAN_RESPONSE_TOKENS} tokens; RL rollouts use "
    f"{RL_COMPLETION_FRACTION:.0%} of max_completion_length on average",
    f"verifier call: {VERIFIER_TEMPLATE_TOKENS} template tokens + the conversation in, "
    f"{VERIFIER_PARITY_OUTPUT_TOKENS} tokens out in parity mode, none in fast mode",
    f"rules: the extracted sets when stage 02 has run, else the paper's {PAPER_RULES['uf']} (UF) and "
    f"{PAPER_RULES['mt']} (MT)",
    "wall hours = each phase's GPU-seconds over the GPUs that phase gets (servers or training GPUs); "
    "allocated GPU-hours = wall hours x the job's GPUs (what the cluster charges); queue time, model loading "
    "and API latency are not counted",
]


def model_params(model_id: str, profile: Profile) -> float:
    """Parameter count from the model id ('8B', '0.5B'), the tiny shape (a locally built model), or 8e9 when unknown."""
    if model_id == profile.models.build:
        t = profile.models.tiny
        return 12 * t.num_layers * t.hidden_size ** 2 + 2 * t.vocab_size * t.hidden_size
    m = re.search(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", model_id)
    return float(m.group(1)) * 1e9 if m else 8e9


def data_counts(run_dir: Path) -> dict:
    """Prepared set sizes if chapter 01 has run in this run dir, else {}."""
    out = {}
    for source in ("ultrafeedback", "mt_bench"):
        f = layout.RunLayout(run_dir).data(source) / "provenance.json"
        if f.exists():
            out.update(json.loads(f.read_text()).get("set_sizes", {}))
    return out


def rule_counts(run_dir: Path) -> dict:
    """K per rule set: extracted sets if chapter 02 has run, else the paper's counts."""
    out = {}
    for name in ("uf", "mt"):
        f = layout.RunLayout(run_dir).rules(name)
        out[name] = (len(json.loads(f.read_text())), "extracted") if f.exists() else (PAPER_RULES[name], "paper")
    return out


def _train_s(params: float, tokens: float, factor: float = 6.0) -> float:
    return factor * params * tokens / (GPU_BF16_TFLOPS * 1e12 * TRAIN_MFU)


def _decode_s(params: float, tokens: float, vllm: bool = True) -> float:
    return tokens / (DECODE_TOKENS_PER_S_8B * 8e9 / params) * (1.0 if vllm else HF_GENERATE_SLOWDOWN)


def _prefill_s(params: float, tokens: float) -> float:
    return tokens / (PREFILL_TOKENS_PER_S_8B * 8e9 / params)


def _verify_s(profile: Profile, calls: float, completion: float) -> float:
    p = model_params(profile.models.verifier, profile)
    out = min(VERIFIER_PARITY_OUTPUT_TOKENS, profile.verifier.max_new_tokens) if profile.verifier.mode == "parity" else 0
    return (_prefill_s(p, calls * (VERIFIER_TEMPLATE_TOKENS + MEAN_PROMPT_TOKENS + completion))
            + _decode_s(p, calls * out, profile.verifier.backend != "transformers"))


def _rl_run(profile: Profile, name: str | None, n_prompts: int, rules: dict) -> dict:
    """One GRPO run (or PPO when name is None): rollouts, generation, scoring, verification, updates."""
    policy = model_params(profile.models.policy, profile)
    if name is None:
        c = profile.ppo
        per_rollout, samples, max_completion, train_factor = c.prompts_per_rollout, c.samples_per_prompt, \
            c.max_completion_length, 12.0  # actor and critic trained
        rollouts = c.max_steps if c.max_steps > 0 else c.num_episodes * math.ceil(n_prompts / per_rollout)
        reward, rule_set, vllm = "rm", None, False
    else:
        v = profile.grpo_variant(name)
        per_rollout, samples, max_completion, train_factor = v.prompts_per_rollout, v.num_generations, \
            v.max_completion_length, 6.0
        updates = per_rollout * samples // v.train_batch_size
        rollouts = (math.ceil(v.max_steps / updates) if v.max_steps > 0
                    else v.num_episodes * math.ceil(n_prompts / per_rollout))
        reward, rule_set, vllm = v.reward, v.rule_set, v.use_vllm
    completion = max_completion * RL_COMPLETION_FRACTION
    responses = rollouts * per_rollout * samples
    seq = responses * (MEAN_PROMPT_TOKENS + completion)
    k = rules[rule_set][0] if reward == "autorule" and rule_set else 0
    calls = responses * k
    phases = {"generate": _decode_s(policy, responses * completion, vllm),
              "update": _train_s(policy, seq, train_factor) + _train_s(policy, seq, 4.0),  # + ref and RM forwards
              "verify": _verify_s(profile, calls, completion) if calls else 0.0}
    return {"rollouts": rollouts, "responses": responses, "rules": k, "verifier_calls": calls, "phases": phases}


def estimate(profile: Profile, run_dir: Path, jobs: list) -> dict:
    """Per job: GPU-hours, wall hours on its allocation, verifier and LLM calls; plus the critical path."""
    counts, rules = data_counts(run_dir), rule_counts(run_dir)
    rl_prompts = counts.get("rl_prompts", FILTERED_ROWS)
    policy = model_params(profile.models.policy, profile)
    rows, finish = [], {}
    parallel = any(j.key.startswith(layout.GRPO + ".") for j in jobs)
    for job in jobs:
        row = {"job": job.key, "nodes": job.nodes, "gpus_per_node": job.gpus, "gpu_hours": 0.0, "wall_hours": 0.0,
               "allocated_gpu_hours": 0.0,
               "verifier_calls": 0, "llm_calls": 0, "notes": ""}
        train_gpus = max(1, job.train_procs or 1)
        verifier_gpus = sum(s.gpus for s in job.services if s.name.startswith("verifier")) or train_gpus
        policy_gpus = sum(s.gpus for s in job.services if s.name == "policy-vllm") or train_gpus
        if job.chapter == layout.RULES:
            e = profile.extraction
            mt = MT_QUESTIONS[profile.data.mt_split] * e.mt_num_examples_per_question
            row["llm_calls"] = 2 * (e.uf_num_examples + mt) + 2  # explain + extract per example, one merge per set
            row["notes"] = f"{e.llm} {e.model}; calls, not GPU time, dominate"
        elif job.chapter in (layout.SFT, layout.RM):
            sft = job.chapter == layout.SFT
            c = profile.sft if sft else profile.reward_model
            n = counts.get("sft_train" if sft else "rm_train", FILTERED_ROWS)
            examples = c.max_steps * c.global_batch_size if c.max_steps > 0 else n * c.num_train_epochs
            tokens = examples * (MEAN_PROMPT_TOKENS + MEAN_RESPONSE_TOKENS) * (1 if sft else 2)
            s = _train_s(policy, tokens)
            row.update(gpu_hours=s / 3600, wall_hours=s / 3600 / train_gpus, notes=f"{examples:,.0f} examples")
        elif job.chapter == layout.GRPO and ("." in job.key or not parallel):  # parallel: the runs have own jobs
            names = [job.key.split(".", 1)[1]] if "." in job.key else profile.grpo_run_names() + ["ppo"]
            runs = [_rl_run(profile, None if n == "ppo" else n, rl_prompts, rules) for n in names]
            ph = {k: sum(r["phases"][k] for r in runs) for k in ("generate", "update", "verify")}
            row["gpu_hours"] = sum(ph.values()) / 3600
            row["wall_hours"] = (ph["generate"] / policy_gpus + ph["update"] / train_gpus
                                 + ph["verify"] / verifier_gpus) / 3600
            row["verifier_calls"] = sum(r["verifier_calls"] for r in runs)
            row["notes"] = "; ".join(f"{n}: {r['rollouts']} rollouts x {r['responses'] // max(1, r['rollouts'])} "
                                     f"responses" + (f" x {r['rules']} rules" if r["rules"] else "")
                                     for n, r in zip(names, runs))
        elif job.chapter == layout.AGREEMENT:
            uf, mt = profile.data.uf_test_size * 2 * rules["uf"][0], counts.get("mt_heldout")
            row["verifier_calls"] = uf + (mt * 2 * rules["mt"][0] if mt is not None else 0)
            s = _verify_s(profile, row["verifier_calls"], MEAN_RESPONSE_TOKENS)
            row.update(gpu_hours=s / 3600, wall_hours=s / 3600 / verifier_gpus,
                       notes="UF test pairs" + (" + held-out MT-Bench pairs" if mt is not None
                                                else "; MT-Bench pairs not counted until chapter 01 has run"))
        elif job.chapter == layout.EVALUATION:
            ev = profile.evaluation
            policies = len(profile.grpo_run_names()) + 2  # + PPO and the SFT reference
            prompts = ev.uf_num_prompts + (ALPACA_EVAL_PROMPTS if ev.alpaca_eval == "run" else 0) + 2 * 40
            s = _decode_s(policy, policies * prompts * min(ev.generation_max_new_tokens, 2 * MEAN_RESPONSE_TOKENS))
            row.update(gpu_hours=s / 3600, wall_hours=s / 3600, llm_calls=policies * (2 * ev.uf_num_prompts + 80),
                       notes=f"{policies} policies; judge calls by {ev.judge_llm} {ev.judge_model}")
        elif job.chapter == layout.HACKING:
            ev = profile.evaluation
            two = [n for n in profile.grpo_run_names() if profile.grpo_variant(n).num_episodes > 1]
            ckpts = sum(math.ceil(_rl_run(profile, n, rl_prompts, rules)["rollouts"]
                                  / profile.grpo_variant(n).save_every_rollouts / ev.hacking_every_n_checkpoints)
                        for n in two)
            row["verifier_calls"] = ckpts * ev.hacking_num_prompts * rules["uf"][0]
            s = (_decode_s(policy, ckpts * ev.hacking_num_prompts * MEAN_RESPONSE_TOKENS)
                 + _verify_s(profile, row["verifier_calls"], MEAN_RESPONSE_TOKENS))
            row.update(gpu_hours=s / 3600, wall_hours=s / 3600, notes=f"{ckpts} checkpoints of {', '.join(two) or '-'}")
        if profile.device == "cpu":
            row["notes"] = (row["notes"] + "; " if row["notes"] else "") + "CPU profile: hours are for GPUs, not this run"
        row["allocated_gpu_hours"] = row["wall_hours"] * job.nodes * job.gpus
        finish[job.key] = max((finish.get(a, 0.0) for a in job.after), default=0.0) + row["wall_hours"]
        rows.append(row)
    total = lambda k: sum(r[k] for r in rows)  # noqa: E731
    return {"profile": profile.name, "profile_hash": profile.hash(), "jobs": rows,
            "total_gpu_hours": total("gpu_hours"), "total_allocated_gpu_hours": total("allocated_gpu_hours"),
            "total_verifier_calls": total("verifier_calls"),
            "total_llm_calls": total("llm_calls"), "critical_path_hours": max(finish.values(), default=0.0),
            "rules": {k: {"count": v[0], "from": v[1]} for k, v in rules.items()},
            "data": "stage 01 set sizes" if counts else f"assumed {FILTERED_ROWS} rows",
            "paper_reference_grpo_gpu_hours": PAPER_GRPO_GPU_HOURS, "assumptions": ASSUMPTIONS}


def to_markdown(est: dict) -> str:
    lines = [f"# Estimates for profile {est['profile']} (hash {est['profile_hash']})", "",
             "| job | nodes x GPUs | compute GPU-h | wall h | allocated GPU-h | verifier calls | LLM calls | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in est["jobs"]:
        where = f"{r['nodes']} x {r['gpus_per_node']}" if r["gpus_per_node"] else "CPU"
        lines.append(f"| {r['job']} | {where} | {r['gpu_hours']:.1f} | "
                     f"{r['wall_hours']:.1f} | {r['allocated_gpu_hours']:.1f} | {r['verifier_calls']:,} | "
                     f"{r['llm_calls']:,} | {r['notes']} |")
    rules = ", ".join(f"{k.upper()} {v['count']} ({v['from']})" for k, v in est["rules"].items())
    lines += ["", f"Total: {est['total_gpu_hours']:.1f} compute and {est['total_allocated_gpu_hours']:.1f} allocated "
              f"GPU-hours, {est['total_verifier_calls']:,} verifier calls, "
              f"{est['total_llm_calls']:,} LLM calls; critical path ~{est['critical_path_hours']:.1f} h of running "
              f"jobs. Rules: {rules}. Data: {est['data']}.",
              f"For comparison, one GRPO run of the paper: {est['paper_reference_grpo_gpu_hours']} GPU-hours.",
              "", "Assumptions (constants in autorule_lib/cluster/estimates.py):"] + [f"- {a}" for a in est["assumptions"]]
    return "\n".join(lines) + "\n"


def write_estimates(est: dict, out_dir: Path) -> None:
    write_json(Path(out_dir) / "estimates.json", est)
    (Path(out_dir) / "estimates.md").write_text(to_markdown(est))
