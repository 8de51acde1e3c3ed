"""Which trained models a run holds, by the training chapters' layout, and which are missing.

Where they are is ``layout.RunLayout``'s: SFT at ``04_sft/model``; GRPO runs at ``06_grpo/<variant>/final``
with intermediate ``checkpoint-<step>`` folders and ``log_history.json``; PPO at ``06_grpo/ppo/final``.
Variant names come from the profile's ``grpo_variants``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..layout import GRPO, SFT, Run

LABELS = {
    "sft": "SFT", "ppo": "PPO", "rm_only": "GRPO, RM only", "length_penalty": "GRPO, length penalty",
    "length_control": "GRPO, length control", "autorule_uf": "AutoRule (UF rules)",
    "autorule_mt": "AutoRule (MT rules)", "autorule_uf_2ep": "AutoRule (UF rules), 2 episodes",
    "rm_only_2ep": "GRPO, RM only, 2 episodes",
}


@dataclass
class Method:
    name: str  # "sft", a GRPO variant name, or "ppo"
    chapter: str  # the chapter that trains it
    path: Path  # its final model folder (may not exist)

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name)

    @property
    def present(self) -> bool:
        return (self.path / "config.json").exists()


def all_methods(run: Run, two_episode: bool = False) -> list[Method]:
    """SFT, every one-episode GRPO variant of the profile, and PPO (or only the two-episode runs)."""
    prof, layout = run.profile, run.layout
    variants = [v for v in prof.grpo_variants if (prof.grpo_variant(v).num_episodes >= 2) == two_episode]
    grpo = [Method(v, GRPO, layout.grpo_final(v)) for v in variants]
    if two_episode:
        return grpo
    return [Method("sft", SFT, layout.sft_model)] + grpo + [Method("ppo", GRPO, layout.ppo_final)]


def availability(methods: list[Method], profile=None) -> list[dict]:
    """One row per method for the chapter: present, or why not (which chapter makes it, or not asked for)."""
    chosen = set(profile.grpo_run_names()) if profile is not None else None

    def why(m: Method) -> str:
        if m.present:
            return str(m.path)
        if chosen is not None and m.chapter == GRPO and m.name != "ppo" and m.name not in chosen:
            return "not trained: not in this profile's grpo_runs"
        return f"missing: run chapter {m.chapter}"

    return [{"method": m.name, "label": m.label, "present": m.present, "path": why(m)} for m in methods]
