"""The training chapters' stages: inputs from earlier stages' artifacts, one process or `accelerate launch`.

The same functions run in the notebook's kernel on the CPU smoke profile and, when the profile asks for
several processes, in every process started by ``accelerate launch -m autorule_lib.training_stages``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from .artifacts import provenance, read_json, require, write_json
from .config import Profile, dump_profile, load_profile
from .data import load_source
from .tiny_models import resolve_model
from .training import (RewardModelScorer, rm_normalization, train_grpo, train_ppo, train_reward_model,
                       train_sft)

DATA, RULES, SFT, RM, GRPO = "01_data_preparation", "02_rule_extraction", "04_sft", "05_reward_model", "06_grpo"
STAGES = ("sft", "reward_model", "grpo", "ppo")


def artifacts(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "artifacts" / stage


def uf_sets(run_dir: Path) -> dict[str, list[dict]]:
    return load_source(str(require(artifacts(run_dir, DATA) / "ultrafeedback" / "sets", DATA)))


def sft_model(run_dir: Path) -> str:
    return str(require(artifacts(run_dir, SFT) / "model", SFT))


def rm_model(run_dir: Path) -> str:
    return str(require(artifacts(run_dir, RM) / "model", RM))


def sft_stage(profile: Profile, run_dir: Path, force: bool = False) -> Path:
    sets = uf_sets(run_dir)
    base = resolve_model(profile, "policy", Path(run_dir) / "models")
    return train_sft(profile, sets["sft_train"], sets["sft_eval"], base, artifacts(run_dir, SFT), force=force)


def reward_model_stage(profile: Profile, run_dir: Path, force: bool = False) -> Path:
    """Bradley-Terry RM from the SFT model, then mu/sigma frozen on the filtered test pairs."""
    sets = uf_sets(run_dir)
    out = artifacts(run_dir, RM)
    path = train_reward_model(profile, sets["rm_train"], sets["rm_eval"], sft_model(run_dir), out, force=force)
    norm_file = out / "rm_normalization.json"
    done = read_json(out / "done.json")
    if not norm_file.exists() or read_json(norm_file).get("settings_hash") != done["settings_hash"]:
        if int(os.environ.get("RANK", "0")) == 0:
            scorer = RewardModelScorer(path, profile.reward_model.pad_token)
            stats = rm_normalization(scorer, sets["rm_eval"])
            write_json(norm_file, {**stats, "settings_hash": done["settings_hash"],
                                   "computed_on": "rm_eval (filtered test_prefs), chosen and rejected",
                                   **provenance(profile, "reward_model/normalization", rm_model=str(path))})
    return path


def grpo_stage(profile: Profile, run_dir: Path, variant: str, force: bool = False) -> Path:
    from .rewards import build_reward_funcs  # the rule verifier is only needed here

    sets = uf_sets(run_dir)
    funcs, weights = build_reward_funcs(profile, profile.grpo_variant(variant), run_dir)
    return train_grpo(profile, variant, sets["rl_prompts"], sft_model(run_dir), artifacts(run_dir, GRPO) / variant,
                      funcs, weights, force=force)


def ppo_stage(profile: Profile, run_dir: Path, force: bool = False) -> Path:
    sets = uf_sets(run_dir)
    return train_ppo(profile, sets["rl_prompts"], sft_model(run_dir), rm_model(run_dir),
                     artifacts(run_dir, GRPO) / "ppo", force=force)


def _call(stage: str, profile: Profile, run_dir: Path, variant: str | None, force: bool) -> Path:
    if stage == "grpo":
        if not variant:
            raise ValueError("stage 'grpo' needs a variant (a name in the profile's grpo_variants)")
        return grpo_stage(profile, run_dir, variant, force)
    return {"sft": sft_stage, "reward_model": reward_model_stage, "ppo": ppo_stage}[stage](profile, run_dir, force)


def num_processes(profile: Profile, environ=None) -> int:
    """The profile's process count, unless a cluster job says how many its allocation has (autorule slurm)."""
    env = os.environ if environ is None else environ
    return int(env.get("AUTORULE_NUM_PROCESSES") or profile.num_processes)


def accelerate_command(stage: str, profile: Profile, run_dir: Path, variant: str | None = None,
                       force: bool = False, environ=None) -> list[str]:
    """`accelerate launch` of this module with the profile's accelerate config and process count.

    Under `autorule slurm` the job exports AUTORULE_NUM_PROCESSES and, for several nodes, AUTORULE_NUM_MACHINES,
    AUTORULE_MAIN_PROCESS_IP/PORT and AUTORULE_NODE_LAUNCHER (an srun prefix): one launcher then starts on each
    node and learns its machine rank there (autorule_lib.slurm node-rank). Without them: one node, as before."""
    env = os.environ if environ is None else environ
    frozen = Path(run_dir) / "profile.yaml"
    if profile.source_file != str(frozen.resolve()):  # parallel cluster jobs read that file: never rewrite it
        frozen = dump_profile(profile, frozen)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes(profile, env))]
    if profile.accelerate_config:
        cmd += ["--config_file", profile.accelerate_config]
    machines = int(env.get("AUTORULE_NUM_MACHINES") or 1)
    if machines > 1:
        cmd += ["--num_machines", str(machines), "--main_process_ip", env["AUTORULE_MAIN_PROCESS_IP"],
                "--main_process_port", env.get("AUTORULE_MAIN_PROCESS_PORT", "29500")]
        cmd = shlex.split(env["AUTORULE_NODE_LAUNCHER"]) + [sys.executable, "-m", "autorule_lib.slurm",
                                                            "node-rank", "--"] + cmd
    cmd += ["-m", "autorule_lib.training_stages", stage, "--profile", str(frozen), "--run-dir", str(run_dir)]
    cmd += (["--variant", variant] if variant else []) + (["--force"] if force else [])
    return cmd


def run_stage(stage: str, profile: Profile, run_dir: str | Path, variant: str | None = None,
              force: bool = False) -> Path:
    """Run a training stage here (one process) or through `accelerate launch` (several)."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r} (have {STAGES})")
    run_dir = Path(run_dir)
    if num_processes(profile) <= 1:
        return _call(stage, profile, run_dir, variant, force)
    cmd = accelerate_command(stage, profile, run_dir, variant, force)
    print("launching:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    out = {"sft": artifacts(run_dir, SFT) / "model", "reward_model": artifacts(run_dir, RM) / "model",
           "ppo": artifacts(run_dir, GRPO) / "ppo" / "final"}
    return out.get(stage, artifacts(run_dir, GRPO) / str(variant) / "final")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run one training stage (used by `accelerate launch`).")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--profile", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--variant")
    p.add_argument("--force", action="store_true")
    p.add_argument("--launch", action="store_true",
                   help="start it as the notebook does (accelerate launch when several processes); used by the "
                        "one-job-per-run cluster jobs of `autorule slurm --parallel-runs`")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    call = run_stage if a.launch else _call
    call(a.stage, load_profile(a.profile), Path(a.run_dir), a.variant, a.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
