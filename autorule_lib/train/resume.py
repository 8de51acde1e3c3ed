"""Checkpoints that count, and where a re-run resumes.

A checkpoint counts only once its completion marker is written (last, after every weight file), so a
run killed mid-save never resumes from half a checkpoint; incomplete ones are moved aside, never deleted.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..artifacts import read_json, write_json
from .ranks import dist_state

CHECKPOINT_MARKER = "autorule_complete.json"  # written last into a checkpoint: it counts only with it
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def checkpoint_problem(ckpt: Path) -> str | None:
    """None if ``ckpt`` is a complete resume point, else what is wrong with it (a kill or a full disk during
    the save). With our marker: every file it lists is there at its recorded size. Without (a save that never
    finished, or written before the marker existed): the state is readable and model, optimizer and scheduler
    files are there (a missing optimizer would silently resume with a fresh one)."""
    marker = ckpt / CHECKPOINT_MARKER
    if marker.exists():
        try:
            files = read_json(marker)["files"]
        except (ValueError, KeyError, TypeError):
            return f"{CHECKPOINT_MARKER} is unreadable"
        for name, size in files.items():
            f = ckpt / name
            if not f.is_file() or f.stat().st_size != size:
                return f"{name} is missing or cut short"
        return None
    try:
        state = read_json(ckpt / "trainer_state.json")
    except (OSError, ValueError):
        return "trainer_state.json is missing or unreadable"
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json is not a trainer state"
    if not any((ckpt / w).is_file() for w in WEIGHTS):
        return "no model weights"
    if not (ckpt / "optimizer.pt").is_file() and not any(ckpt.glob("global_step*")):
        return "no optimizer state"
    if not (ckpt / "scheduler.pt").is_file() and not any(ckpt.glob("global_step*")):
        return "no scheduler state"
    return None


def checkpoint_files(ckpt: Path) -> dict[str, int]:
    return {str(f.relative_to(ckpt)): f.stat().st_size for f in sorted(ckpt.rglob("*"))
            if f.is_file() and f.name != CHECKPOINT_MARKER}


def complete_checkpoints():
    """A TrainerCallback that marks a checkpoint complete once every rank has finished writing it: the
    marker (the checkpoint's files and sizes) is written last, atomically, so a requeue or a full disk
    mid-save never leaves something a re-run would resume from."""
    from transformers import TrainerCallback

    class CompleteCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            dist_state().wait_for_everyone()  # ZeRO-3 ranks write their own shards
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and ckpt.is_dir():
                missing = [] if args.save_only_model else [
                    f for f in ("optimizer.pt", "scheduler.pt") if not (ckpt / f).is_file()
                    and not any(ckpt.glob("global_step*"))]
                if not missing:  # an incomplete save gets no marker: resume skips it
                    write_json(ckpt / CHECKPOINT_MARKER, {"global_step": state.global_step,
                                                          "max_steps": state.max_steps,
                                                          "model_only": bool(args.save_only_model),
                                                          "files": checkpoint_files(ckpt)})
            dist_state().wait_for_everyone()

    return CompleteCheckpoints()


def resume_point(out_dir: Path) -> tuple[Path | None, dict | None]:
    """(last complete checkpoint, its trainer state). Incomplete ones after it are moved aside to
    ``incomplete-checkpoint-N`` (nothing deleted; the Trainer would otherwise overwrite into them), each said
    in one line. Every rank calls this; the main one decides and moves, the others wait and read its choice."""
    state = dist_state()
    chosen = None
    if out_dir.exists():
        with state.main_process_first():
            found = sorted(((int(m.group(1)), p) for p in out_dir.iterdir()
                            if (m := CHECKPOINT.match(p.name)) and p.is_dir()), reverse=True)
            for step, ckpt in found:
                problem = checkpoint_problem(ckpt)
                if problem is None:
                    chosen = ckpt
                    break
                if state.is_main_process:
                    # a name outside the Trainer's "checkpoint-*" glob: neither resumed nor rotated
                    n, aside = 1, ckpt.with_name(f"incomplete-{ckpt.name}")
                    while aside.exists():
                        n, aside = n + 1, ckpt.with_name(f"incomplete{n + 1}-{ckpt.name}")
                    ckpt.rename(aside)
                    print(f"{out_dir.name}: {ckpt.name} is incomplete ({problem}); moved to {aside.name}", flush=True)
    if chosen is None:
        return None, None
    if state.is_main_process:
        print(f"{out_dir.name}: resuming from {chosen.name}", flush=True)
    return chosen, read_json(chosen / "trainer_state.json")


def reached_end(ckpt_state: dict | None) -> bool:
    """The checkpoint was saved at the configured end: the stage was killed between its last save and its
    finished marker. Resuming would train past the end (the Trainer runs a step before checking)."""
    return bool(ckpt_state) and ckpt_state.get("max_steps", 0) > 0 and \
        ckpt_state["global_step"] >= ckpt_state["max_steps"]


def _stamp_matches(stamp: Path, settings: str) -> bool:
    try:
        return read_json(stamp).get("settings_hash") == settings
    except (OSError, ValueError, AttributeError):
        return False


def last_checkpoint(out_dir: Path) -> str | None:
    ckpt, _ = resume_point(out_dir)
    return str(ckpt) if ckpt else None


def read_marker(ckpt: Path) -> dict:
    try:
        return read_json(ckpt / CHECKPOINT_MARKER)
    except (OSError, ValueError):
        return {}


CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(run_folder: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of a training run's saved checkpoints, by step, with ``final`` last.

    ``final`` takes the step after the last intermediate checkpoint's step when done.json names none.
    """
    run_folder = Path(run_folder)
    found = sorted((int(m.group(1)), p) for p in run_folder.glob("checkpoint-*")
                   if (m := CHECKPOINT.match(p.name)) and (p / "config.json").exists())
    final = run_folder / "final"
    if (final / "config.json").exists():
        step = _final_step(run_folder)
        if step is None:
            step = found[-1][0] + 1 if found else 0
        found = [(s, p) for s, p in found if s != step] + [(step, final)]
    return found


def _final_step(run_folder: Path) -> int | None:
    import json

    done = run_folder / "done.json"
    if done.exists():
        step = json.loads(done.read_text()).get("global_step")
        return int(step) if step is not None else None
    return None


def tokenizer_folder(checkpoint: Path) -> Path:
    """Intermediate checkpoints may lack the tokenizer files; the run's final folder has them."""
    if (checkpoint / "tokenizer_config.json").exists():
        return checkpoint
    return checkpoint.parent / "final"
