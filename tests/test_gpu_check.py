"""The GPU check's CPU rehearsal: every part passes at tiny shapes, and a failing part does not stop the rest.

benchmarks/gpu_check.py is meant to run, unattended and at once, in the rare minutes a GPU is lent; this
keeps it from rotting in between. The rehearsal goes through the same code as the GPU run except the
device (benchmarks/README.md).
"""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("cuda_correctness", "training_stages", "verifier_benchmark", "grpo_breakdown")


def rehearsal(tmp_path, models_dir, *extra, timeout=600):
    out = tmp_path / "gpu_check.md"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out), "--work-dir", str(tmp_path / "work"), "--models-dir", str(models_dir),
                           *extra], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return proc, out, time.perf_counter() - t0


def test_cpu_rehearsal_runs_every_part_and_writes_the_results(tmp_path, models_dir):
    proc, out, seconds = rehearsal(tmp_path, models_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "gpu_check: 4 passed, 0 failed"
    for name in PARTS:  # one summary line per part, in order
        assert sum(line.startswith(f"[PASS] {name} (") for line in lines) == 1
    assert [n for line in lines for n in PARTS if line.startswith(f"[PASS] {n} (")] == list(PARTS)
    report = out.read_text()
    assert "**gpu_check: 4 passed, 0 failed**" in report and "CPU rehearsal" in report
    for name in PARTS:
        assert re.search(rf"^\| {name} \| pass \| [\d.]+ \|", report, re.M), name
        assert f"## {name}" in report
    # the figures each part exists for
    assert re.search(r"attention fp32: .*'max_rel_err'", report) and re.search(r"attention bf16: .*'max_rel_err'",
                                                                                  report)
    assert re.search(r"'identical_verdicts': \d+", report)
    assert "mu" in report and "sigma" in report and "rule_reward_mean" in report
    assert re.search(r"fast_vs_parity_speedup: [\d.]+", report) and "checks/s" in report
    for share in ("generation", "verification", "RM scoring", "optimizer step"):
        assert re.search(rf"share: {share}: [\d.]+%", report), share
    print(f"CPU rehearsal: {seconds:.0f} s")


def test_a_failing_part_is_recorded_and_the_next_part_still_runs(tmp_path, models_dir):
    proc, out, _ = rehearsal(tmp_path, models_dir, "--parts", "cuda_correctness,grpo_breakdown",
                             "--inject-failure", "cuda_correctness")
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[-1] == "gpu_check: 1 passed, 1 failed"
    assert any(line.startswith("[FAIL] cuda_correctness (") and "failure injected" in line for line in lines)
    assert any(line.startswith("[PASS] grpo_breakdown (") for line in lines)
    report = out.read_text()
    assert re.search(r"^\| cuda_correctness \| FAIL \|", report, re.M)
    assert re.search(r"^\| grpo_breakdown \| pass \|", report, re.M)
    assert "RuntimeError: failure injected into cuda_correctness" in report  # the error is kept


def test_cuda_is_refused_clearly_without_a_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cuda",
                           "--out", str(tmp_path / "x.md")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "torch sees no CUDA device" in proc.stderr
    assert not (tmp_path / "x.md").exists()


def test_step_clock_shares_count_only_the_timed_steps():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    clock = gpu_check.StepClock(gpu_check.Context("cpu", True, Path("/nonexistent")))
    clock.edges = [0.0, 10.0, 14.0, 18.0]  # a 10 s warm-up step, then two of 4 s
    clock.spans = [("generation", 1.0, 9.0),  # in the warm-up: not counted
                   ("generation", 10.5, 12.5), ("verification", 12.5, 13.0), ("generation", 14.0, 16.0),
                   ("optimizer step", 17.0, 17.5)]
    per_step, shares = clock.shares(skip=1)
    assert per_step == 4.0
    assert shares["generation"] == pytest.approx(0.5) and shares["verification"] == pytest.approx(0.0625)
    assert shares["optimizer step"] == pytest.approx(0.0625)
    assert sum(shares.values()) == pytest.approx(1.0)
    clock.edges = [0.0, 10.0]
    with pytest.raises(gpu_check.PartFailed, match="only 1 steps timed"):
        clock.shares(skip=1)


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    import zipfile

    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n"
                                                                                 for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_carried_wheels_requirements_are_checked_against_the_image(tmp_path):
    """What decides, on the GPU machine, which fallback wheels to install (and what the fetch reports)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fetch_gpu_wheels as F

    ds = _wheel(tmp_path, "datasets", "5.2.0", ["pyarrow>=24.0.0", "dill<0.4.2,>=0.3.0", "fsspec<=2026.9.0",
                                                "pytest; extra == 'tests'"])
    trl = _wheel(tmp_path, "trl", "1.12.0", ["transformers>=4.56.2", "datasets>=4.7.0",
                                             "accelerate>=1.4.0"])
    dill = _wheel(tmp_path, "dill", "0.4.1", [])
    image = {"transformers": "5.17.0", "accelerate": "1.15.0", "pyarrow": "21.0.0", "fsspec": "2025.3.0"}
    unmet = {(w, r.name, got) for w, r, got in F.unmet([ds, trl, dill], image)}
    assert unmet == {(ds.name, "pyarrow", "21.0.0")}  # carried dill and datasets count; extras are skipped
    assert {r.name for _, r, _ in F.unmet([ds, trl], dict(image, transformers="4.40.0"))} == {"pyarrow", "dill",
                                                                                              "transformers"}
    assert F.unmet([ds, trl, dill], dict(image, pyarrow="24.0.0")) == []


def test_checkpointing_argument_follows_the_installed_transformers(monkeypatch):
    """Found by the rehearsal under the GPU image's transformers 5.17.0: it has no `activation_checkpointing`
    training argument (5.23.0 renamed `gradient_checkpointing`, keeping it as a deprecated alias)."""
    import dataclasses as dc

    from transformers import TrainingArguments

    from autorule_lib.train.common import common_args
    from autorule_lib.profiles import load_profile

    p = load_profile("smoke")
    args = lambda: common_args(p, Path("/tmp/x"), learning_rate=1e-4, warmup_ratio=0.0, max_grad_norm=1.0,  # noqa: E731
                                 max_steps=1, save_steps=1, gradient_checkpointing=True, betas=(0.9, 0.95))
    installed = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    assert installed in args()
    old = {k: v for k, v in TrainingArguments.__dataclass_fields__.items() if k != "activation_checkpointing"}
    old.setdefault("gradient_checkpointing", dc.field(default=False))
    monkeypatch.setattr(TrainingArguments, "__dataclass_fields__", old)
    got = args()
    assert "gradient_checkpointing" in got and "activation_checkpointing" not in got
