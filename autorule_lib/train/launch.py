"""The training chapters' stages: inputs from earlier chapters' artifacts, one process or `accelerate launch`.

The same functions run in the notebook's kernel on the CPU smoke profile and, when the profile asks for
several processes, in every process started by ``accelerate launch -m autorule_lib.train.launch``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ..artifacts import provenance, read_json, require, write_json
from ..config import Profile
from ..data.preparation import load_source
from ..layout import DATA, RM, SFT, Run
from ..models import pick_device, resolve
from ..profiles import dump_profile, load_profile
from .common import stage_finished
from .ranks import dist_state, wait_for_file, world_size
from .grpo import grpo_settings, train_grpo
from .ppo import train_ppo
from .reward_model import RewardModelScorer, rm_normalization, train_reward_model
from .sft import train_sft
from .rewards import build_reward_funcs, rules_for_variant

STAGES = ("sft", "reward_model", "grpo", "ppo")


def uf_sets(run: Run) -> dict[str, list[dict]]:
    return load_source(str(require(run.layout.data_sets("ultrafeedback"), DATA)))


def sft_model(run: Run) -> str:
    return str(require(run.layout.sft_model, SFT))


def rm_model(run: Run) -> str:
    return str(require(run.layout.rm_model, RM))


def sft_stage(run: Run, force: bool = False) -> Path:
    profile = run.profile
    sets = uf_sets(run)
    base = resolve(profile, "policy", run.layout.models)
    return train_sft(profile, sets["sft_train"], sets["sft_eval"], base, run.layout.sft_dir, force=force)


def reward_model_stage(run: Run, force: bool = False) -> Path:
    """Bradley-Terry RM from the SFT model, then mu/sigma frozen on the filtered test pairs.

    Under several processes mu/sigma is computed by rank 0 in a fresh process (no DeepSpeed ZeRO-3 configured
    there: a ``from_pretrained`` under ``zero.Init`` in one rank would issue collectives the others never join);
    the other ranks wait for its file."""
    profile = run.profile
    sets = uf_sets(run)
    out = run.layout.rm_dir
    path = train_reward_model(profile, sets["rm_train"], sets["rm_eval"], sft_model(run), out, force=force)
    norm_file = run.layout.rm_normalization
    done = read_json(out / "done.json")  # every rank returns from training only once it exists
    current = lambda: norm_file.exists() and read_json(norm_file).get("settings_hash") == done["settings_hash"]  # noqa: E731
    if not current():
        if world_size() <= 1:
            write_rm_normalization(run)
        elif int(os.environ.get("RANK", "0")) == 0:
            subprocess.run([sys.executable, "-m", "autorule_lib.train.launch", "rm-normalization", "--profile",
                            str(dump_frozen(run)), "--run-dir", str(run.run_dir)],
                           env=single_process_env(), check=True)
        wait_for_file(norm_file, current, "rank 0 computing mu/sigma")
    return path


def write_rm_normalization(run: Run, device: str | None = None) -> Path:
    profile, layout = run.profile, run.layout
    done = read_json(layout.rm_dir / "done.json", RM)
    scorer = RewardModelScorer(layout.rm_model, profile.reward_model.pad_token, device=device)
    stats = rm_normalization(scorer, uf_sets(run)["rm_eval"])
    return write_json(layout.rm_normalization, {
        **stats, "settings_hash": done["settings_hash"], "computed_on": "rm_eval (filtered test_prefs), chosen and "
        "rejected", **provenance(profile, "reward_model/normalization", rm_model=f"{RM}/model")})


def single_process_env() -> dict:
    """This environment without the launcher's distributed variables: a child of one rank runs alone, on that
    rank's GPU."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
            "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
    local = os.environ.get("LOCAL_RANK")
    if local is not None and "CUDA_VISIBLE_DEVICES" in os.environ:
        visible = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
        env["CUDA_VISIBLE_DEVICES"] = visible[int(local)] if int(local) < len(visible) else visible[0]
    elif local is not None:
        env["CUDA_VISIBLE_DEVICES"] = local
    return env


def dump_frozen(run: Run) -> Path:
    frozen = run.layout.profile_file
    if run.profile.source_file != str(frozen.resolve()):
        frozen = dump_profile(run.profile, frozen)
    return frozen


def grpo_stage(run: Run, variant: str, force: bool = False) -> Path:
    profile = run.profile
    sets = uf_sets(run)
    out = run.layout.grpo_dir(variant)
    v = profile.grpo_variant(variant)
    names, weights = reward_layout(profile, v)
    rule_sets = [rules_for_variant(profile, v, run.layout)[1]] if v.reward == "autorule" else []
    if not force and stage_finished(out, grpo_settings(profile, v, sft_model(run), names, weights, out,
                                                       rule_sets)):
        return out / "final"  # e.g. the --parallel-runs collector: nothing is built for a finished run
    # accelerate sets each rank's device here, so the RM and a local verifier go to the rank's own GPU
    dist_state()
    funcs, weights = build_reward_funcs(profile, v, run.layout)
    return train_grpo(profile, variant, sets["rl_prompts"], sft_model(run), out, funcs, weights, force=force)


def reward_layout(profile: Profile, variant) -> tuple[list[str], list[float]]:
    """The reward functions' names and weights a GRPO run will have (``rewards.build_reward_funcs``), known
    without loading any model."""
    c = profile.reward
    return {"autorule": (["rule_reward", "rm_reward"], [c.rule_weight, c.rm_weight]),
            "rm": (["rm_reward"], [c.rm_weight]),
            "rm_length_penalty": (["rm_reward", "length_penalty"], [c.rm_weight, 1.0])}.get(variant.reward, ([], []))


def ppo_stage(run: Run, force: bool = False) -> Path:
    sets = uf_sets(run)
    return train_ppo(run.profile, sets["rl_prompts"], sft_model(run), rm_model(run), run.layout.ppo_dir, force=force)


def _call(stage: str, run: Run, variant: str | None, force: bool) -> Path:
    if stage == "rm-normalization":
        return write_rm_normalization(run)
    if stage == "grpo":
        if not variant:
            raise ValueError("stage 'grpo' needs a variant (a name in the profile's grpo_variants)")
        return grpo_stage(run, variant, force)
    return {"sft": sft_stage, "reward_model": reward_model_stage, "ppo": ppo_stage}[stage](run, force)


def num_processes(profile: Profile, environ=None) -> int:
    """The profile's process count, unless a cluster job says how many its allocation has (autorule slurm)."""
    env = os.environ if environ is None else environ
    return int(env.get("AUTORULE_NUM_PROCESSES") or profile.num_processes)


def accelerate_command(stage: str, run: Run, variant: str | None = None, force: bool = False,
                       environ=None) -> list[str]:
    """`accelerate launch` of this module with the profile's accelerate config and process count.

    Under `autorule slurm` the job exports AUTORULE_NUM_PROCESSES and, for several nodes, AUTORULE_NUM_MACHINES,
    AUTORULE_MAIN_PROCESS_IP/PORT and AUTORULE_NODE_LAUNCHER (an srun prefix): one launcher then starts on each
    node and learns its machine rank there (autorule_lib.cluster.slurm node-rank). Without them: one node, as before."""
    env = os.environ if environ is None else environ
    profile = run.profile
    frozen = dump_frozen(run)  # parallel cluster jobs read that file: never rewrite it
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes(profile, env))]
    if profile.accelerate_config:
        cmd += ["--config_file", profile.accelerate_config]
    elif pick_device(profile) == "cpu":  # torchrun's launcher; run_stage sets ACCELERATE_USE_CPU: a gloo group
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]  # (--cpu starts ONE process)
    machines = int(env.get("AUTORULE_NUM_MACHINES") or 1)
    if machines > 1:
        cmd += ["--num_machines", str(machines), "--main_process_ip", env["AUTORULE_MAIN_PROCESS_IP"],
                "--main_process_port", env.get("AUTORULE_MAIN_PROCESS_PORT", "29500")]
        cmd = shlex.split(env["AUTORULE_NODE_LAUNCHER"]) + [sys.executable, "-m", "autorule_lib.cluster.slurm",
                                                            "node-rank", "--"] + cmd
    cmd += ["-m", "autorule_lib.train.launch", stage, "--profile", str(frozen), "--run-dir", str(run.run_dir)]
    cmd += (["--variant", variant] if variant else []) + (["--force"] if force else [])
    return cmd


def run_stage(stage: str, run: Run, variant: str | None = None, force: bool = False) -> Path:
    """Run a training stage here (one process) or through `accelerate launch` (several)."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r} (have {STAGES})")
    profile, layout = run.profile, run.layout
    if num_processes(profile) <= 1:
        return _call(stage, run, variant, force)
    cmd = accelerate_command(stage, run, variant, force)
    print("launching:", " ".join(cmd), flush=True)
    cpu = not profile.accelerate_config and pick_device(profile) == "cpu"
    subprocess.run(cmd, check=True, env={**os.environ, "ACCELERATE_USE_CPU": "true"} if cpu else None)
    out = {"sft": layout.sft_model, "reward_model": layout.rm_model, "ppo": layout.ppo_final}
    return out.get(stage, layout.grpo_final(str(variant)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run one training stage (used by `accelerate launch`).")
    p.add_argument("stage", choices=STAGES + ("rm-normalization",))
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
    call(a.stage, Run.at(load_profile(a.profile), a.run_dir), a.variant, a.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
