"""What every training stage shares (SFT, reward model, GRPO, PPO on TRL's own trainers; book/method.md §4).

Every stage builds its TRL config from the profile, checkpoints on the profile's schedule, resumes from
the last checkpoint when re-run, and writes ``done.json`` (settings hash + provenance) when finished so
a finished stage is not retrained unless forced. Text is tokenised here, not by TRL, because TRL would
add a BOS that the paper's format does not have (``<|user|>{prompt}<|assistant|>{response} <eos>``).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..artifacts import provenance, read_json, write_json
from ..cache import cache_key
from ..config import ConfigError, Profile
from ..models import pick_device
from .ranks import dist_state, is_main_process, wait_for_file, world_size
from .resume import (
    CHECKPOINT_MARKER,
    _stamp_matches,
    complete_checkpoints,
    reached_end,
    read_marker,
    resume_point,
)

# Settings of book/method.md §4 that TRL 1.12 cannot express exactly, and what is used instead.
TRL_DEVIATIONS = [
    ("GRPO token-level loss", "OpenRLHF averages token losses per micro-batch", "loss_type='bnpo' (same)"),
    ("GRPO prompt length", "prompts truncated at 1024 tokens", "longer prompts dropped (TRL 1.12 does not "
                                                                  "truncate); the <512-token filter makes this moot"),
    ("GRPO rollout batch", "1024 prompts x 2 samples, 16 updates of 128",
     "generation_batch_size=2048, per-device batch x accumulation x processes = 128"),
    ("PPO critic LR", "actor 3e-7, critic 5e-6", "one optimizer: actor LR for both"),
    ("PPO updates per rollout", "1024 prompts, 8 updates of 128 (micro-batches with gradient accumulation)",
     "8 updates of 128; TRL 1.12 steps once per accumulation cycle of the whole rollout, so accumulation is 1 "
     "and each update's 128 / processes sequences per rank form one micro-batch (loss averaged over it)"),
    ("PPO top-p", "0.9", "1.0 (TRL's PPOTrainer fixes top_p=1.0)"),
    ("PPO resume", "-", "TRL's PPO loop cannot resume mid-run; an interrupted run restarts"),
    ("BOS", "no BOS in the policy format", "we tokenise ourselves; GRPO prompts without BOS (subclass)"),
]


# ---------------------------------------------------------------- shared TRL arguments


def check_logging(profile: Profile) -> None:
    """Fail before training, not after the first logging step."""
    if profile.report_to == "wandb" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("report_to: 'wandb' needs the WANDB_API_KEY environment variable (not set)")


def accumulation_steps(global_batch: int, per_device: int, key: str) -> int:
    """Gradient accumulation that makes ``per_device x processes x steps`` equal the global batch."""
    per_step = per_device * world_size()
    if global_batch % per_step:
        raise ConfigError(f"{key}: global batch {global_batch} is not a multiple of "
                          f"per_device_batch_size x processes = {per_step}")
    return global_batch // per_step


def common_args(profile: Profile, out_dir: Path, *, learning_rate: float, warmup_ratio: float, max_grad_norm: float,
                max_steps: int, save_steps: int, gradient_checkpointing: bool, betas: tuple[float, float],
                save_total_limit: int | None = None, save_only_model: bool = False) -> dict:
    """TrainingArguments shared by every stage; CPU switches only when the profile runs on CPU."""
    check_logging(profile)
    if save_total_limit is not None and save_total_limit < 2:
        # the Trainer rotates before a new checkpoint is marked complete: keep one complete one meanwhile
        raise ConfigError(f"save_total_limit: {save_total_limit} leaves no complete checkpoint while the next one is "
                          "written; use 2 or more, or null (keep all)")
    cpu = pick_device(profile) == "cpu"
    return dict(
        output_dir=str(out_dir), learning_rate=learning_rate, lr_scheduler_type="constant_with_warmup",
        # transformers 5 reads a float < 1 in warmup_steps as a ratio of the total steps
        warmup_steps=warmup_ratio, max_grad_norm=max_grad_norm, max_steps=max_steps, save_strategy="steps",
        save_steps=save_steps, logging_steps=1, seed=profile.seed, report_to=profile.report_to,
        adam_beta1=betas[0], adam_beta2=betas[1], bf16=profile.precision == "bf16" and not cpu,
        use_cpu=cpu, dataloader_pin_memory=not cpu, **{_checkpointing_key(): gradient_checkpointing and not cpu},
        save_only_model=save_only_model, save_total_limit=save_total_limit, disable_tqdm=True,
    )


def _checkpointing_key() -> str:
    """transformers renamed ``gradient_checkpointing`` to ``activation_checkpointing`` after 5.17 (the GPU
    machine's version, which has only the old name; newer ones keep it as a deprecated alias)."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


# ---------------------------------------------------------------- stage bookkeeping

def settings_hash(*parts) -> str:
    return cache_key({"parts": [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts]})[:16]


def run_root(out_dir: Path) -> Path:
    """The run directory holding a stage's output (``<run>/artifacts/<stage>[/<run name>]``)."""
    out_dir = Path(out_dir).absolute()
    for parent in out_dir.parents:
        if parent.name == "artifacts":
            return parent.parent
    return out_dir.parent


def portable(path: str | Path, out_dir: Path) -> str:
    """A model path as it enters a stage's identity: relative to the run directory when it lies inside it,
    so a copied or moved run directory resumes instead of retraining (Hub ids and outside paths as given)."""
    root, p = run_root(out_dir), Path(str(path)).expanduser()
    if p.is_absolute() and p.absolute().is_relative_to(root):
        return "<run>/" + p.absolute().relative_to(root).as_posix()
    return str(path)


def stage_finished(out_dir: Path, settings: str) -> bool:
    """Finished only when the marker is readable and records these settings (a marker from other settings, or
    one cut short by a crash, means: not finished)."""
    try:
        return read_json(Path(out_dir) / "done.json").get("settings_hash") == settings
    except (OSError, ValueError, AttributeError):
        return False


def wait_for_done(out_dir: Path, settings: str) -> None:
    if world_size() > 1:
        wait_for_file(Path(out_dir) / "done.json", lambda: stage_finished(out_dir, settings),
                      "rank 0 saving the final model and writing the finished marker")


def seed_everything(profile: Profile) -> None:
    """Seed Python, NumPy and torch (every device) from the profile before a stage creates or samples anything:
    the Trainer seeds only in its own constructor, after a new RM score head (``score.weight | MISSING``) or a
    PPO value head has already been drawn from the unseeded global generator."""
    from transformers import set_seed

    set_seed(profile.seed)


def prepare_output(out_dir: Path, settings: str, force: bool) -> bool:
    """True if the stage must run. A finished stage with the same settings is kept; different settings move
    the old output aside (nothing is deleted) so stale checkpoints are never resumed. Under several
    processes the main one decides and moves; the others follow it."""
    with dist_state().main_process_first():
        stamp = out_dir / "settings.json"
        if not force and stage_finished(out_dir, settings):
            return False
        if is_main_process():
            if out_dir.exists() and (force or (stamp.exists() and not _stamp_matches(stamp, settings))):
                n = 1
                while (aside := out_dir.with_name(f"{out_dir.name}.old{n}")).exists():
                    n += 1
                out_dir.rename(aside)
            out_dir.mkdir(parents=True, exist_ok=True)
            write_json(stamp, {"settings_hash": settings})
    return True


def train_summary(log_history: list[dict]) -> dict:
    """Loss and tokens over the whole run, from the full history (the Trainer's own ``train_loss`` covers only
    the steps of the last ``train()`` call, so it is wrong after a resume)."""
    out, total, prev = {}, 0.0, 0
    for e in log_history:
        if "loss" in e and "step" in e:
            total += float(e["loss"]) * (e["step"] - prev)  # a logged loss averages the steps since the last log
            prev = e["step"]
    if prev:
        out["train_loss"] = total / prev
    tokens = [e["num_tokens"] for e in log_history if "num_tokens" in e and not any(k.startswith("eval_") for k in e)]
    if tokens:
        out["num_tokens"] = tokens[-1]
    return out


def _copy_model_files(src: Path, dst: Path) -> None:
    """A model folder from a checkpoint's files (weights, config), without optimizer or trainer state."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    skip = {"optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin", CHECKPOINT_MARKER}
    for f in src.iterdir():
        if f.is_file() and f.name not in skip and not f.name.startswith("rng_state"):
            shutil.copy2(f, dst / f.name)


def finish(trainer, profile: Profile, stage: str, out_dir: Path, final_dir: Path, settings: str, save=None,
           **extra) -> Path:
    from_ckpt = getattr(trainer, "_autorule_finalised_from", None)
    if save is not None:
        save(trainer, final_dir)
    elif from_ckpt is None:
        trainer.save_model(str(final_dir))  # collective under DeepSpeed: every rank calls it
    elif is_main_process():  # no training ran here (no DeepSpeed engine to save from): the checkpoint's files
        _copy_model_files(from_ckpt, final_dir)
    if is_main_process():
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(str(final_dir))
        write_json(out_dir / "log_history.json", trainer.state.log_history)
        write_json(out_dir / "done.json", {"settings_hash": settings, "global_step": trainer.state.global_step,
                                           **train_summary(trainer.state.log_history),
                                           **({"finalised_from": from_ckpt.name} if from_ckpt else {}),
                                           **provenance(profile, stage, **extra)})
    wait_for_done(out_dir, settings)  # every rank returns only once the stage is finished for all
    return final_dir


def progress_lines(every: int = 0):
    """A TrainerCallback printing one short line per logging interval instead of the full log dict
    (which buries the notebooks); the full history is kept in log_history.json and plotted."""
    from transformers import TrainerCallback

    keys = ("loss", "reward", "objective/scores", "eval_loss", "accuracy", "kl", "completions/mean_length")

    class ProgressLines(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            n = every or max(1, state.max_steps // 10)
            due = state.global_step % n == 0 or state.global_step == state.max_steps
            shown = " ".join(f"{k}={float(logs[k]):.4g}" for k in keys if k in (logs or {}))
            if shown and state.is_world_process_zero and due:
                run = Path(args.output_dir).name
                print(f"{run}: step {state.global_step}/{state.max_steps} {shown}", flush=True)

    return ProgressLines()


def start(trainer, out_dir: Path | None, resume: tuple | None = None) -> None:
    """Train from the last complete checkpoint under ``out_dir`` if there is one (None: no resume), with
    one-line progress. A checkpoint at the configured end is not trained from: the trainer takes its state
    and ``finish`` its model files. ``resume``: a ``resume_point`` already looked up (the caller built the
    model from it)."""
    from transformers import PrinterCallback, TrainerCallback
    from transformers.utils import logging as hf_logging

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(progress_lines())
    # rotating checkpoints saved within a second (tiny runs) warns that mtime "may not be reliable" and falls back
    # to step order, which is what we want anyway: keep it out of the chapters
    hf_logging.get_logger("transformers.trainer_utils").setLevel(hf_logging.ERROR)
    if out_dir is None:
        trainer.train()
        return
    trainer.add_callback(complete_checkpoints())

    class RestoreTokenCount(TrainerCallback):
        """TRL's SFT/RM trainers count tokens from 0 in every train() call; continue the checkpoint's count."""

        def on_train_begin(self, args, state, control, **kw):
            seen = [e["num_tokens"] for e in state.log_history if "num_tokens" in e]
            if seen and hasattr(trainer, "_total_train_tokens"):
                trainer._total_train_tokens = seen[-1]

    trainer.add_callback(RestoreTokenCount())
    ckpt, ckpt_state = resume if resume is not None else resume_point(out_dir)
    if reached_end(ckpt_state):
        from transformers.trainer_callback import TrainerState

        trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
        trainer._autorule_finalised_from = ckpt
        if is_main_process():
            print(f"{out_dir.name}: {ckpt.name} is at the configured end (step {ckpt_state['global_step']}/"
                  f"{ckpt_state['max_steps']}); finalised from it, not trained further", flush=True)
        return
    if ckpt is not None and read_marker(ckpt).get("model_only"):
        if is_main_process():
            print(f"{out_dir.name}: {ckpt.name} holds no optimizer state (save_only_model); training restarts "
                  "from step 0", flush=True)
            for old in out_dir.glob(f"checkpoint-*/{CHECKPOINT_MARKER}"):
                old.unlink()  # re-saved in place: the old marker must not vouch for a half-rewritten folder
        ckpt = None
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
