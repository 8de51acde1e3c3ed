"""Same commit, profile and seed give the same numbers: two smoke-book runs in different directories write
identical JSON artifacts in every chapter (timestamps, durations and the run directory's own path aside)."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from autorule_lib.config import PROJECT_ROOT

# what legitimately differs between two runs: when and how fast, and where (the run directory itself); and
# checkpoint_id, a file-identity stamp (path, sizes, mtimes: artifacts.files_stamp), not a number
VOLATILE = re.compile(r"(^|_)(runtime|per_second|created_at|started_at|finished_at|time|seconds|elapsed|duration|"
                      r"timestamp|took_s|wall_s|date)$|_at$|^time_|^seconds|^checkpoint_id$|^eps$")  # eps: TRL PPO's episodes/s
# a checkpoint's completeness record lists file sizes, and trainer_state.json's size varies with its timings
NOT_METRICS = {"autorule_complete.json"}


def normalised(value, run_dir: str):
    if isinstance(value, dict):
        return {k: normalised(v, run_dir) for k, v in value.items() if not VOLATILE.search(str(k))}
    if isinstance(value, list):
        return [normalised(v, run_dir) for v in value]
    if isinstance(value, str):
        return value.replace(run_dir, "<run>")
    if isinstance(value, float) and math.isnan(value):
        return "NaN"  # a NaN metric (e.g. a variance over one value) is the same result in both runs
    return value


def json_differences(a: Path, b: Path) -> list[str]:
    """Relative paths of the JSON files under ``a/artifacts`` that are missing from, or differ in, ``b``."""
    out = []
    for fa in sorted((a / "artifacts").rglob("*.json")):
        if fa.name in NOT_METRICS:
            continue
        rel = fa.relative_to(a)
        fb = b / rel
        if not fb.exists():
            out.append(f"{rel} (missing in the second run)")
            continue
        try:
            ja, jb = json.loads(fa.read_text()), json.loads(fb.read_text())
        except ValueError:
            out.append(f"{rel} (not JSON)")
            continue
        if normalised(ja, str(a)) != normalised(jb, str(b)):
            out.append(str(rel))
    return out


def test_normalisation_keeps_numbers_and_drops_only_volatile_keys():
    a = {"mean": 0.5, "created_at": "x", "train_runtime": 1.0, "path": "/r1/artifacts/m", "log": [{"loss": 1.0}]}
    b = {"mean": 0.5, "created_at": "y", "train_runtime": 2.0, "path": "/r2/artifacts/m", "log": [{"loss": 1.0}]}
    assert normalised(a, "/r1") == normalised(b, "/r2")
    assert normalised({"v": float("nan"), "eps": 7}, "/r1") == normalised({"v": float("nan"), "eps": 8}, "/r2")
    assert normalised({"v": float("nan")}, "/r1") != normalised({"v": 0.0}, "/r2")
    assert normalised({**a, "mean": 0.6}, "/r1") != normalised(b, "/r2")
    assert normalised({**a, "log": [{"loss": 1.1}]}, "/r1") != normalised(b, "/r2")


@pytest.mark.slow
def test_two_smoke_book_runs_write_identical_metrics(tmp_path, smoke_run):
    first, _, result = smoke_run  # the suite's own smoke run (its fake secrets change no number) ...
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    second = tmp_path / "b"  # ... and a second one from scratch in another directory
    done = subprocess.run([sys.executable, "-m", "autorule_lib.book.cli", "run", "--profile", "smoke", "--output-dir",
                           str(second)], cwd=PROJECT_ROOT, env=dict(os.environ), capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = [Path(first), second]
    n = len(list((runs[0] / "artifacts").rglob("*.json")))
    assert n > 20  # every chapter's metrics, not an empty comparison
    assert json_differences(runs[0], runs[1]) == []
