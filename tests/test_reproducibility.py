"""Same commit, profile and seed give the same numbers: chapter 05's RM and its frozen mu/sigma, trained twice in
fresh processes from copies of one run directory, agree exactly."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autorule_lib.config import PROJECT_ROOT
from autorule_lib.profiles import load_profile
from autorule_lib.data.preparation import prepare_data
from autorule_lib.layout import Run, RunLayout
from autorule_lib.train.launch import sft_stage
from conftest import with_smoke_models


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, models_dir):
    """A run directory holding what chapter 05 reads: the prepared UltraFeedback sets and the SFT model."""
    run = with_smoke_models(models_dir, tmp_path_factory.mktemp("run"))
    smoke = Run.at(load_profile("smoke"), run)
    prepare_data(smoke.profile, "ultrafeedback", smoke.profile.data.ultrafeedback_source,
                 smoke.layout.data("ultrafeedback"), models_dir=smoke.layout.models)
    sft_stage(smoke)
    return run


def run_stage_in_fresh_process(stage: str, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "random"}  # nothing may depend on the process's hash seed
    return subprocess.run([sys.executable, "-m", "autorule_lib.train.launch", stage, "--profile", "smoke",
                           "--run-dir", str(run_dir), *extra], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_reward_model_and_normalisation_are_identical_across_fresh_runs(sft_run, tmp_path):
    results = []
    for name in ("a", "b"):
        run = shutil.copytree(sft_run, tmp_path / name)
        done = run_stage_in_fresh_process("reward_model", run)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        norm = json.loads((RunLayout(run).rm_normalization).read_text())
        losses = [e["loss"] for e in json.loads((RunLayout(run).rm_dir / "log_history.json").read_text()) if "loss" in e]
        results.append((norm["mean"], norm["std"], norm["pair_accuracy"], losses))
    assert results[0] == results[1]
