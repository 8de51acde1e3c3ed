"""The smoke profile's one entry point: build its tiny models and record them in the run's model registry.

Entry points (the chapter prologue, the CLI, test fixtures, benchmarks) call ``build_models``; the method
code only reads the registry (``autorule_lib.models.resolve``) and never learns how a model came to exist.
"""
from __future__ import annotations

from pathlib import Path

from .. import models
from ..config import ConfigError, Profile
from .models import ensure_tiny_models
from .verifier import ensure_tiny_verifier


def build_models(profile: Profile, models_dir: str | Path) -> dict[str, Path]:
    """Build (once) every model the profile names by its local-build name and record it in the run's model
    registry, where the method code finds it (``autorule_lib.models.resolve``). Only entry points call this:
    the chapter prologue, the CLI, test fixtures and benchmarks. Returns the registry ({} when nothing is built).

    'verifier' is the trained tiny judge (``smoke.verifier``); 'judge' (evaluation.judge_model) the untrained
    tiny Llama built for the verifier role: a judge of rankings and ratings gains nothing from the trained one.
    """
    import torch

    build = profile.models.build
    roles = [r for r in models.ROLES if models.builds_locally(profile, r)]
    if profile.verifier.backend in ("openai", "bedrock"):  # an API serves the verifier: nothing local reads it
        roles = [r for r in roles if r != "verifier"]
    if not roles:
        return {}
    if build != "tiny":
        raise ConfigError(f"models.build: the smoke builder builds 'tiny' models, not {build!r}")
    # the builders seed torch; the caller's random stream (a notebook's, a test's) stays as it was
    with torch.random.fork_rng(devices=[]):
        tiny = ensure_tiny_models(profile, models_dir)
        paths = {"tokenizer": tiny["tokenizer"], "policy": tiny["policy"], "judge": tiny["verifier"]}
        if "verifier" in roles:
            paths["verifier"] = ensure_tiny_verifier(profile, models_dir)
    return models.record_models(models_dir, {r: paths[r] for r in roles}, builder=f"autorule_lib.smoke ({build})")
