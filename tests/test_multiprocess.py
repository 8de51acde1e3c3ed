"""Rank-correct training stages, on CPU: every rank agrees on completion (a slow save on rank 0 cannot make
another rank read a missing marker), mu/sigma in a fresh process, device placement after accelerate's state
exists, a finished GRPO run builds nothing, and the smoke profile's chapters 04-06 with two gloo ranks."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autorule_lib.train.common import stage_finished
from autorule_lib.train.ranks import wait_for_file
from autorule_lib.train import launch as S
from autorule_lib.layout import Run, RunLayout
from autorule_lib.config import PROJECT_ROOT
from autorule_lib.profiles import load_profile
from conftest import with_smoke_models


def two_rank_profile(tmp_path: Path, name="smoke_two_ranks") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"extends: smoke\nname: {name}\nnum_processes: 2\n")
    return path


# ---------------------------------------------------------------- in one process

def test_reward_models_and_verifiers_are_built_after_accelerate_set_the_device(tmp_path, monkeypatch):
    from accelerate import PartialState

    PartialState._reset_state()
    seen = {}

    def fake_build(profile, variant, layout):
        seen["state_existed"] = bool(PartialState._shared_state)
        return [lambda **kw: [0.0]], [1.0]

    monkeypatch.setattr(S, "build_reward_funcs", fake_build)
    monkeypatch.setattr(S, "uf_sets", lambda run_dir: {"rl_prompts": []})
    monkeypatch.setattr(S, "sft_model", lambda run_dir: str(tmp_path / "sft"))
    monkeypatch.setattr(S, "train_grpo", lambda *a, **k: tmp_path / "final")
    S.grpo_stage(Run.at(load_profile("smoke"), tmp_path), "rm_only")
    assert seen == {"state_existed": True}


def test_a_finished_grpo_run_builds_no_reward_model_or_verifier(tmp_path, monkeypatch):
    import autorule_lib.train.rewards as R

    profile, layout = load_profile("smoke"), RunLayout(tmp_path)
    sft = layout.sft_model
    out = layout.grpo_dir("autorule_uf")
    v = profile.grpo_variant("autorule_uf")
    names, weights = S.reward_layout(profile, v)
    rules = layout.rules("uf")  # the run's identity includes its rule set
    rules.parent.mkdir(parents=True)
    rules.write_text(json.dumps(["Rule one."]))
    out.mkdir(parents=True)
    rule_set = R.rules_for_variant(profile, v, layout)[1]
    (out / "done.json").write_text(json.dumps({"settings_hash": S.grpo_settings(profile, v, str(sft), names, weights,
                                                                                 out, [rule_set])}))

    def must_not_build(*a, **k):
        raise AssertionError("built the RM and verifier for a finished run")

    monkeypatch.setattr(S, "build_reward_funcs", must_not_build)
    monkeypatch.setattr(S, "uf_sets", lambda run_dir: {"rl_prompts": []})
    monkeypatch.setattr(S, "sft_model", lambda run_dir: str(sft))
    assert S.grpo_stage(Run(profile, layout), "autorule_uf") == out / "final"


def test_reward_layout_matches_the_reward_functions_built():
    """The collector's completion check must compute the same identity as the training itself."""
    from autorule_lib.train.rewards import build_reward_funcs

    class Tok:
        eos_token = "</s>"

    class Verifier:
        pass

    profile = load_profile("smoke")
    for name in profile.grpo_variants:
        v = profile.grpo_variant(name)
        funcs, weights = build_reward_funcs(profile, v, rm_scorer=lambda texts: [0.0] * len(texts),
                                            rm_normalizer=(0.0, 1.0), tokenizer=Tok(), rules=["r"],
                                            verifier=Verifier())
        assert S.reward_layout(profile, v) == ([f.__name__ for f in funcs], weights), name


def test_a_missing_marker_is_a_clear_error_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(TimeoutError, match=r"rank 1: .*done.json did not appear within 1 s .*rank 0's log"):
        wait_for_file(tmp_path / "done.json", lambda: stage_finished(tmp_path, "abc"), "rank 0 saving", 1)


def test_child_of_a_rank_runs_alone_on_that_ranks_gpu(monkeypatch):
    for k, v in {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "x", "ACCELERATE_USE_DEEPSPEED":
                 "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}.items():
        monkeypatch.setenv(k, v)
    env = S.single_process_env()
    assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"} & set(env)
    assert not [k for k in env if k.startswith("ACCELERATE_")] and env["CUDA_VISIBLE_DEVICES"] == "5"


# ---------------------------------------------------------------- two CPU ranks

@pytest.fixture(scope="module")
def rm_inputs(tmp_path_factory, models_dir):
    """What chapter 05 reads (prepared sets, SFT model), made in one process."""
    from autorule_lib.data.preparation import prepare_data

    run = with_smoke_models(models_dir, tmp_path_factory.mktemp("rm_inputs"))
    profile = load_profile("smoke")
    prepare_data(profile, "ultrafeedback", profile.data.ultrafeedback_source,
                 RunLayout(run).data("ultrafeedback"), models_dir=RunLayout(run).models)
    S.sft_stage(Run.at(profile, run))
    return run


def launched_ranks(stage_dir: Path) -> int:
    """How many processes trained: the Trainer's own record in a checkpoint (not the launcher's flags)."""
    import torch

    ckpt = next(stage_dir.glob("checkpoint-*"))
    return torch.load(ckpt / "training_args.bin", weights_only=False).world_size


SLOW_SAVE = """
import os
if os.environ.get("RANK") == "0":  # launched rank 0 only: its final save takes long (an 8B model on slow storage)
    import time
    import autorule_lib.train.reward_model as T  # the stage this test runs calls its own finish
    _finish = T.finish
    def slow_finish(trainer, *a, **k):
        time.sleep(float(os.environ["SLOW_SAVE_S"]))
        return _finish(trainer, *a, **k)
    T.finish = slow_finish
"""


def test_two_ranks_agree_on_completion_despite_a_slow_save_on_rank_0(rm_inputs, tmp_path):
    run = shutil.copytree(rm_inputs, tmp_path / "run")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(SLOW_SAVE))
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "SLOW_SAVE_S": "8",
           "OMP_NUM_THREADS": "1"}
    profile = two_rank_profile(tmp_path)
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "autorule_lib.train.launch", "reward_model", "--launch",
                           "--profile", str(profile), "--run-dir", str(run)], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.monotonic() - t0 > 8  # the slow save happened
    out = RunLayout(run).rm_dir
    assert launched_ranks(out) == 2
    norm = json.loads((out / "rm_normalization.json").read_text())
    assert norm["settings_hash"] == json.loads((out / "done.json").read_text())["settings_hash"]
    # mu/sigma belong to the saved RM (computed in a fresh process from the final model)
    again = S.write_rm_normalization(Run.at(load_profile(str(profile)), run))
    assert json.loads(again.read_text())["mean"] == pytest.approx(norm["mean"], abs=1e-6)


@pytest.mark.slow
def test_training_stages_of_chapters_04_to_06_with_two_cpu_ranks(models_dir, tmp_path, capfd):
    """Every training stage (SFT, RM with mu/sigma, each GRPO variant, PPO) as chapters 04-06 call it
    (``run_stage``), under `accelerate launch` with two gloo ranks on CPU. Inputs of chapters 01-03 (prepared
    sets, a rule set per source, the trained tiny verifier) are made in one process first."""
    from autorule_lib.data.preparation import prepare_data
    profile = load_profile(two_rank_profile(tmp_path))
    run = with_smoke_models(models_dir, tmp_path / "run")  # the fixture's models, trained tiny verifier included
    prepare_data(profile, "ultrafeedback", profile.data.ultrafeedback_source,
                 RunLayout(run).data("ultrafeedback"), models_dir=RunLayout(run).models)
    for rule_set in ("uf", "mt"):  # chapter 02's output format: a JSON array of rule strings
        rules = RunLayout(run).rules(rule_set)
        rules.parent.mkdir(parents=True)
        rules.write_text(json.dumps(["The response answers the question directly.",
                                     "The response is concise and avoids repetition."]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.monotonic()
    S.run_stage("sft", Run.at(profile, run))
    S.run_stage("reward_model", Run.at(profile, run))
    for name in profile.grpo_run_names():
        S.run_stage("grpo", Run.at(profile, run), variant=name)
    S.run_stage("ppo", Run.at(profile, run))
    took = time.monotonic() - t0
    said = capfd.readouterr()
    print(f"two-rank training stages of chapters 04-06: {took:.0f} s")
    assert said.out.count("launching:") == 3 + len(profile.grpo_run_names())
    assert "--num_processes 2" in said.out
    art = run / "artifacts"
    assert launched_ranks(art / "04_sft") == 2 and launched_ranks(art / "06_grpo" / "rm_only") == 2
    for stage in ["04_sft", "05_reward_model"] + [f"06_grpo/{v}" for v in profile.grpo_run_names()] + ["06_grpo/ppo"]:
        done = json.loads((art / stage / "done.json").read_text())
        assert done["global_step"] > 0, stage
    norm = json.loads((art / "05_reward_model" / "rm_normalization.json").read_text())
    assert norm["settings_hash"] == json.loads((art / "05_reward_model" / "done.json").read_text())["settings_hash"]
