"""What a notebook needs to start a stage: the profile, the run directory and its own artifact folder.

The same call works under papermill (the runner injects the frozen profile and run directory) and in
JupyterLab (defaults: the named profile and its usual run directory, so earlier stages' artifacts
are found).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import stage_dir
from ..config import Profile
from ..profiles import load_profile, run_dir as default_run_dir
from ..smoke.models import build_models


@dataclass
class StageContext:
    name: str
    profile: Profile
    run_dir: Path
    out: Path  # this stage's artifacts

    @property
    def models_dir(self) -> Path:
        return self.run_dir / "models"

    def artifacts(self, stage: str) -> Path:
        """Another stage's artifact folder (it may not exist yet)."""
        return self.run_dir / "artifacts" / stage


def open_stage(name: str, profile: str | Profile = "smoke", run_dir: str | Path | None = None) -> StageContext:
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    rdir = default_run_dir(prof, run_dir)
    if prof.models.build is not None:
        # models built locally: nothing in such a run may reach the Hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    _quiet_progress_bars()
    # the prologue builds them (once per run) and records them where the method finds them (autorule_lib.models)
    build_models(prof, rdir / "models")
    ctx = StageContext(name, prof, rdir, stage_dir(rdir, name))
    print(f"stage {name} | profile {prof.name} (hash {prof.hash()}) | run dir {rdir}")
    return ctx


def _quiet_progress_bars() -> None:
    """Per-shard/per-batch bars from HF libraries clutter executed notebooks and the book."""
    import warnings

    from tqdm import TqdmExperimentalWarning, TqdmWarning

    warnings.filterwarnings("ignore", category=TqdmWarning)
    warnings.filterwarnings("ignore", category=TqdmExperimentalWarning)
    # deprecations raised inside transformers/TRL by their own calls: nothing a reader can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl)\.")
    # transformers' load reports ("score.weight | MISSING" for a new head) and deprecation notices about its
    # own calls: on a reader's page they read as faults; errors still show (training subprocesses inherit)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass
