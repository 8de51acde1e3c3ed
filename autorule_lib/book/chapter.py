"""What a notebook needs to start a chapter: the profile, the run's layout and its own artifact folder.

The same call works under papermill (the runner injects the frozen profile and run directory) and in
JupyterLab (defaults: the named profile and its usual run directory, so earlier chapters' artifacts
are found).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..config import Profile
from ..layout import OVERVIEW, Run, RunLayout
from ..profiles import load_profile, run_dir as default_run_dir
from ..smoke.build import build_models


@dataclass
class ChapterContext(Run):
    """The run (profile and layout) as one chapter sees it: its name and its own artifact folder."""

    name: str
    out: Path  # this chapter's artifacts (``layout.chapter_out(name)``)

    @property
    def models_dir(self) -> Path:
        return self.layout.models


def open_chapter(name: str, profile: str | Profile = "smoke", run_dir: str | Path | None = None) -> ChapterContext:
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    rdir = default_run_dir(prof, run_dir)
    if prof.models.build is not None:
        # models built locally: nothing in such a run may reach the Hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    _quiet_progress_bars()
    layout = RunLayout(rdir)
    # the prologue builds them (once per run) and records them where the method finds them (autorule_lib.models);
    # the overview loads no model, so the first chapter that does pays for the build (the smoke judge's training)
    if name != OVERVIEW:
        build_models(prof, layout.models)
    ctx = ChapterContext(prof, layout, name, layout.chapter_out(name))
    print(f"chapter {name} | profile {prof.name} (hash {prof.hash()}) | run dir {rdir}")
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
