"""Training stages on TRL's own trainers: SFT, Bradley-Terry reward model, GRPO, PPO (book/method.md §4).

Every stage builds its TRL config from the profile, checkpoints on the profile's schedule, resumes from
the last checkpoint when re-run, and writes ``done.json`` (settings hash + provenance) when finished so
a finished stage is not retrained unless forced. Text is tokenised here, not by TRL, because TRL would
add a BOS that the paper's format does not have (``<|user|>{prompt}<|assistant|>{response} <eos>``).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

from .artifacts import provenance, read_json, write_json
from .cache import cache_key
from .config import ConfigError, Profile
from .text_format import completion_text, policy_prompt, policy_text


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

def device_kind(profile: Profile) -> str:
    import torch

    if profile.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if profile.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but torch sees no CUDA device")
    return profile.device


def check_logging(profile: Profile) -> None:
    """Fail before training, not after the first logging step."""
    if profile.report_to == "wandb" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("report_to: 'wandb' needs the WANDB_API_KEY environment variable (not set)")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


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
    cpu = device_kind(profile) == "cpu"
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


DONE_TIMEOUT_S = float(os.environ.get("AUTORULE_RANK_WAIT_S", 4 * 3600))  # a 70B save on slow storage fits


def wait_for_file(path: Path, ready: Callable[[], bool], what: str, timeout_s: float | None = None) -> None:
    """Wait until ``ready()`` (rank 0 writes ``path``), polling the filesystem, not a collective: a long save
    on rank 0 must not trip NCCL's barrier timeout, and a rank 0 that died gives a clear error, not a hang."""
    import time

    timeout_s = DONE_TIMEOUT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {os.environ.get('RANK', '0')}: {path} did not appear within {timeout_s:.0f} s "
                               f"({what}); see rank 0's log for its error (AUTORULE_RANK_WAIT_S sets the wait)")
        time.sleep(0.5)


def wait_for_done(out_dir: Path, settings: str) -> None:
    if world_size() > 1:
        wait_for_file(Path(out_dir) / "done.json", lambda: stage_finished(out_dir, settings),
                      "rank 0 saving the final model and writing the finished marker")


def dist_state():
    """accelerate's process state, created as the Trainer will create it: a CPU run's ranks (ACCELERATE_USE_CPU,
    set by ``training_stages.run_stage``) form a gloo group. Whoever creates it first fixes it for the process,
    so every call here must agree with TrainingArguments(use_cpu=...)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def rank_device(profile: Profile | None = None) -> str:
    """This process's device as accelerate set it (creating its state first when needed): under several
    processes rank k's models go to cuda:k, never all to cuda:0."""
    import torch

    if world_size() > 1:
        return str(dist_state().device)
    if profile is not None:
        return device_kind(profile)
    return "cuda" if torch.cuda.is_available() else "cpu"


def seed_everything(profile: Profile) -> None:
    """Seed Python, NumPy and torch (every device) from the profile before a stage creates or samples anything:
    the Trainer seeds only in its own constructor, after a new RM score head (``score.weight | MISSING``) or a
    PPO value head has already been drawn from the unseeded global generator."""
    from transformers import set_seed

    set_seed(profile.seed)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


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
    from .checkpoints import CHECKPOINT

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


def read_marker(ckpt: Path) -> dict:
    try:
        return read_json(ckpt / CHECKPOINT_MARKER)
    except (OSError, ValueError):
        return {}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # the paper's convention: pad = eos
    return tok


# ---------------------------------------------------------------- SFT

def sft_example(prompt: str, response: str, tokenizer, max_length: int) -> dict:
    """input_ids (no BOS) and labels with the prompt masked: loss on response tokens only."""
    prompt_ids = tokenizer(policy_prompt(prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(completion_text(response, tokenizer.eos_token), add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def train_sft(profile: Profile, rows: list[dict], eval_rows: list[dict], base_model: str, out_dir: Path,
              force: bool = False, callbacks: list | None = None) -> Path:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg, final = profile.sft, out_dir / "model"
    settings = settings_hash(cfg, portable(base_model, out_dir), profile.hash())
    if not prepare_output(out_dir, settings, force):
        return final
    seed_everything(profile)
    resume = resume_point(out_dir)
    weights = str(resume[0]) if reached_end(resume[1]) else base_model  # at the end: the checkpoint's model
    tok = load_tokenizer(base_model)
    to_ds = lambda rs: Dataset.from_list([sft_example(r["prompt"], r["chosen_content"], tok, cfg.max_length)
                                          for r in rs])
    args = SFTConfig(
        **common_args(profile, out_dir, learning_rate=cfg.learning_rate, warmup_ratio=cfg.warmup_ratio,
                      max_grad_norm=cfg.max_grad_norm, max_steps=cfg.max_steps, save_steps=cfg.save_steps,
                      gradient_checkpointing=cfg.gradient_checkpointing, betas=(cfg.adam_beta1, cfg.adam_beta2),
                      save_total_limit=cfg.save_total_limit, save_only_model=cfg.save_only_model),
        num_train_epochs=cfg.num_train_epochs, per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=accumulation_steps(cfg.global_batch_size, cfg.per_device_batch_size, "sft"),
        max_length=cfg.max_length, dataset_kwargs={"skip_prepare_dataset": True}, eval_strategy="no",
    )
    trainer = SFTTrainer(model=weights, args=args, train_dataset=to_ds(rows), eval_dataset=to_ds(eval_rows),
                         processing_class=tok, callbacks=callbacks)
    start(trainer, out_dir, resume)
    metrics = trainer.evaluate()
    return finish(trainer, profile, "sft", out_dir, final, settings, base_model=base_model, eval_metrics=metrics)


# ---------------------------------------------------------------- reward model

def rm_pair(row: dict, tokenizer) -> dict:
    """Chosen and rejected as full policy texts (no BOS, ' <eos>' at the end), tokenised."""
    enc = lambda resp: tokenizer(policy_text(row["prompt"], resp, tokenizer.eos_token),
                                 add_special_tokens=False)["input_ids"]
    return {"chosen_ids": enc(row["chosen_content"]), "rejected_ids": enc(row["rejected_content"])}


def load_rm_tokenizer(path: str, pad_token: str):
    tok = load_tokenizer(path)
    if pad_token not in tok.get_vocab():
        raise ConfigError(f"reward_model.pad_token: {pad_token!r} is not in the vocabulary of {path}")
    tok.pad_token = pad_token
    return tok


def train_reward_model(profile: Profile, rows: list[dict], eval_rows: list[dict], sft_model: str, out_dir: Path,
                       force: bool = False, callbacks: list | None = None) -> Path:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    cfg, final = profile.reward_model, out_dir / "model"
    settings = settings_hash(cfg, portable(sft_model, out_dir), profile.hash())
    if not prepare_output(out_dir, settings, force):
        return final
    seed_everything(profile)  # before the new score head is drawn
    resume = resume_point(out_dir)
    weights = str(resume[0]) if reached_end(resume[1]) else sft_model
    tok = load_rm_tokenizer(sft_model, cfg.pad_token)
    model = AutoModelForSequenceClassification.from_pretrained(weights, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(
        **common_args(profile, out_dir, learning_rate=cfg.learning_rate, warmup_ratio=cfg.warmup_ratio,
                      max_grad_norm=cfg.max_grad_norm, max_steps=cfg.max_steps, save_steps=cfg.save_steps,
                      gradient_checkpointing=cfg.gradient_checkpointing, betas=(cfg.adam_beta1, cfg.adam_beta2),
                      save_total_limit=cfg.save_total_limit, save_only_model=cfg.save_only_model),
        num_train_epochs=cfg.num_train_epochs, per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=accumulation_steps(cfg.global_batch_size, cfg.per_device_batch_size,
                                                       "reward_model"),
        max_length=cfg.max_length, eval_strategy="no",
    )
    to_ds = lambda rs: Dataset.from_list([rm_pair(r, tok) for r in rs])
    trainer = RewardTrainer(model=model, args=args, train_dataset=to_ds(rows), eval_dataset=to_ds(eval_rows),
                            processing_class=tok, callbacks=callbacks)
    start(trainer, out_dir, resume)
    metrics = trainer.evaluate()
    return finish(trainer, profile, "reward_model", out_dir, final, settings, sft_model=sft_model,
                  eval_metrics=metrics)


class RewardModelScorer:
    """Scores policy texts with the trained RM, read at the last (EOS) token."""

    def __init__(self, path: str | Path, pad_token: str, batch_size: int = 8, device: str | None = None):
        from transformers import AutoModelForSequenceClassification

        self.tokenizer = load_rm_tokenizer(str(path), pad_token)
        self.tokenizer.padding_side = "right"
        self.device = device or rank_device()
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path)).to(self.device).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size

    def score_texts(self, texts: list[str]) -> list[float]:
        import torch

        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i: i + self.batch_size], add_special_tokens=False, padding=True,
                                 return_tensors="pt").to(self.device)
            with torch.no_grad():
                out.extend(self.model(**enc).logits[:, 0].float().tolist())
        return out

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        eos = self.tokenizer.eos_token
        return self.score_texts([policy_text(p, r.removesuffix(eos).rstrip(), eos)
                                 for p, r in zip(prompts, responses)])


def rm_normalization(scorer: RewardModelScorer, pairs: list[dict]) -> dict:
    """Frozen mu/sigma of RM scores over chosen ∪ rejected of the filtered test pairs (book/method.md §3)."""
    import statistics

    prompts = [r["prompt"] for r in pairs]
    scores = (scorer.score(prompts, [r["chosen_content"] for r in pairs])
              + scorer.score(prompts, [r["rejected_content"] for r in pairs]))
    n = len(pairs)
    # σ: the unbiased (n−1) estimator, as the original's torch.std
    return {"mean": statistics.fmean(scores), "std": statistics.stdev(scores) or 1.0, "n_texts": 2 * n,
            "pair_accuracy": sum(c > r for c, r in zip(scores[:n], scores[n:])) / n if n else None}


# ---------------------------------------------------------------- GRPO

def grpo_prompts(rows: list[dict], tokenizer, max_prompt_length: int) -> list[dict]:
    """RL prompts in the policy format; prompts over the limit are dropped (TRL 1.12 does not truncate)."""
    out = []
    for r in rows:
        text = policy_prompt(r["prompt"])
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_prompt_length:
            out.append({"prompt": text, "raw_prompt": r["prompt"]})
    return out


def grpo_args(profile: Profile, variant, out_dir: Path) -> dict:
    """GRPOConfig values for one run; rollout-level numbers map onto TRL's generation batch."""
    v = variant
    responses_per_rollout = v.prompts_per_rollout * v.num_generations
    if responses_per_rollout % v.train_batch_size:
        raise ConfigError(f"grpo: prompts_per_rollout x num_generations = {responses_per_rollout} is not a multiple "
                          f"of train_batch_size {v.train_batch_size}")
    updates_per_rollout = responses_per_rollout // v.train_batch_size
    return dict(
        **common_args(profile, out_dir, learning_rate=v.learning_rate, warmup_ratio=v.warmup_ratio,
                      max_grad_norm=v.max_grad_norm, max_steps=v.max_steps,
                      save_steps=v.save_every_rollouts * updates_per_rollout,
                      gradient_checkpointing=v.gradient_checkpointing, betas=(v.adam_beta1, v.adam_beta2),
                      save_total_limit=v.save_total_limit, save_only_model=v.save_only_model),
        num_train_epochs=v.num_episodes, per_device_train_batch_size=v.per_device_batch_size,
        gradient_accumulation_steps=accumulation_steps(v.train_batch_size, v.per_device_batch_size, "grpo"),
        generation_batch_size=responses_per_rollout, num_generations=v.num_generations,
        max_completion_length=v.max_completion_length, temperature=v.temperature, top_p=v.top_p,
        # the original's KL term had zero gradient; beta=0 reproduces that exactly (and skips the ref model)
        beta=v.kl_beta if v.kl_mode == "nominal" else 0.0, epsilon=v.clip_epsilon,
        # OpenRLHF averages token losses over each micro-batch: TRL's 'bnpo' is that aggregation
        loss_type="bnpo" if v.loss_aggregation == "token" else "grpo", scale_rewards="group",
        num_iterations=1, use_vllm=v.use_vllm, vllm_mode=v.vllm_mode, log_completions=False,
    )


def grpo_settings(profile: Profile, variant, sft_model: str, names: list[str], reward_weights: list[float],
                  out_dir: Path, rule_sets: list | tuple = ()) -> str:
    return settings_hash(variant, portable(sft_model, out_dir), profile.hash(), names, list(reward_weights),
                         *rule_sets)


def _no_bos_grpo_trainer():
    from trl import GRPOTrainer

    class NoBosGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that tokenises plain-text prompts without a BOS, as the policy was trained."""

        def _tokenize_prompts(self, prompts: list):
            if isinstance(prompts[0], str):
                return self.processing_class(text=prompts, add_special_tokens=False)["input_ids"], None, {}
            return super()._tokenize_prompts(prompts)

    return NoBosGRPOTrainer


def train_grpo(profile: Profile, variant_name: str, prompts: list[dict], sft_model: str, out_dir: Path,
               reward_funcs: list[Callable], reward_weights: list[float], force: bool = False,
               callbacks: list | None = None) -> Path:
    """One named GRPO run. ``sft_model`` must be a saved directory: TRL reloads the reference model from it."""
    from datasets import Dataset
    from trl import GRPOConfig

    variant = profile.grpo_variant(variant_name)
    final = out_dir / "final"
    names = [getattr(f, "__name__", type(f).__name__) for f in reward_funcs]
    rule_sets = [f.rule_set for f in reward_funcs if getattr(f, "rule_set", None)]  # which rules (file or stage 02)
    settings = grpo_settings(profile, variant, sft_model, names, reward_weights, out_dir, rule_sets)
    if not prepare_output(out_dir, settings, force):
        return final
    seed_everything(profile)
    resume = resume_point(out_dir)
    weights = str(resume[0]) if reached_end(resume[1]) else sft_model
    tok = load_tokenizer(sft_model)
    tok.padding_side = "left"
    args = GRPOConfig(**grpo_args(profile, variant, out_dir), reward_weights=reward_weights)
    trainer = _no_bos_grpo_trainer()(model=weights, reward_funcs=reward_funcs, args=args,
                                     train_dataset=Dataset.from_list(grpo_prompts(prompts, tok,
                                                                                  variant.max_prompt_length)),
                                     processing_class=tok, callbacks=callbacks)
    start(trainer, out_dir, resume)
    return finish(trainer, profile, f"grpo/{variant_name}", out_dir, final, settings, sft_model=sft_model,
                  variant=dataclasses.asdict(variant), reward_funcs=names, reward_weights=reward_weights,
                  rule_set=rule_sets[0] if rule_sets else None)


# ---------------------------------------------------------------- PPO

def ppo_batch_args(cfg, world: int) -> dict:
    """PPOConfig batch fields giving the original's ``prompts_per_rollout / train_batch_size`` optimizer
    updates of ``train_batch_size`` per rollout (8 of 128 per 1024 prompts).

    trl 1.12's loop generates ``per_device_train_batch_size x gradient_accumulation_steps`` prompts per
    rank, splits them into ``num_mini_batches`` and those into micro-batches of
    ``per_device_train_batch_size``, but its Accelerator steps the optimizer once per
    ``gradient_accumulation_steps`` micro-batches counted over the whole rollout — with accumulation > 1
    a rollout gets one update, whatever ``num_mini_batches`` says. So accumulation is 1, the per-device
    batch is the whole local rollout, and each mini-batch (``train_batch_size / world`` sequences per
    rank) is one micro-batch and one update. Generation and the rollout forward passes run in chunks
    of ``per_device_batch_size`` (``local_rollout_forward_batch_size``).
    """
    if cfg.prompts_per_rollout % cfg.train_batch_size:
        raise ConfigError("ppo: prompts_per_rollout must be a multiple of train_batch_size")
    if cfg.train_batch_size % world:
        raise ConfigError(f"ppo: train_batch_size {cfg.train_batch_size} is not a multiple of the {world} processes")
    local_rollout = cfg.prompts_per_rollout // world
    return dict(per_device_train_batch_size=local_rollout, gradient_accumulation_steps=1,
                num_mini_batches=cfg.prompts_per_rollout // cfg.train_batch_size,
                local_rollout_forward_batch_size=min(cfg.per_device_batch_size, local_rollout))


def normalize_score_head(reward_model, mean: float, std: float) -> None:
    """Make the RM return ``(score − μ) / σ``: its linear score head is rescaled in place (exactly; no
    wrapper, so TRL's ``get_reward`` reads it as usual)."""
    import torch

    head = reward_model.score
    with torch.no_grad():
        head.weight.div_(std)
        if head.bias is None:
            head.bias = torch.nn.Parameter(torch.zeros(head.out_features, dtype=head.weight.dtype,
                                                       device=head.weight.device), requires_grad=False)
        head.bias.copy_((head.bias - mean) / std)


def train_ppo(profile: Profile, prompts: list[dict], sft_model: str, rm_model: str, out_dir: Path,
              force: bool = False, rm_normalizer: tuple[float, float] | None = None) -> Path:
    """PPO baseline with TRL's experimental PPOTrainer (trl 1.12). It has one optimizer for actor and critic,
    so the critic's separate LR cannot be expressed: the actor LR is used for both (the chapter says so).
    Its custom loop does not resume mid-run: an interrupted PPO run starts again."""
    import warnings

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.ppo import PPOConfig, PPOTrainer

    cfg, final = profile.ppo, out_dir / "final"
    settings = settings_hash(cfg, portable(sft_model, out_dir), portable(rm_model, out_dir), profile.hash())
    if not prepare_output(out_dir, settings, force):
        return final
    seed_everything(profile)
    if cfg.samples_per_prompt != 1:
        raise ConfigError("ppo.samples_per_prompt: TRL's PPOTrainer draws one sample per prompt")
    tok = load_rm_tokenizer(sft_model, profile.reward_model.pad_token)  # pad != eos: rewards read at EOS
    tok.padding_side = "left"
    ids = [tok(policy_prompt(r["prompt"]), add_special_tokens=False)["input_ids"] for r in prompts]
    ppo_args = common_args(profile, out_dir, learning_rate=cfg.actor_learning_rate, warmup_ratio=cfg.critic_warmup_ratio,
                           max_grad_norm=cfg.max_grad_norm, max_steps=-1, save_steps=10**9, gradient_checkpointing=False,
                           betas=(cfg.adam_beta1, cfg.adam_beta2))
    # no checkpoints: the loop cannot resume from them, and TRL's end-of-run checkpoint reads .config from the
    # DDP-wrapped model (AttributeError under several processes)
    ppo_args["save_strategy"] = "no"
    args = PPOConfig(
        **ppo_args,
        **ppo_batch_args(cfg, world_size()), num_ppo_epochs=1, response_length=cfg.max_completion_length,
        temperature=cfg.temperature, kl_coef=cfg.kl_coef, kl_estimator="k1", gamma=cfg.gamma, lam=cfg.gae_lambda,
        stop_token="eos", num_sample_generations=0,
        total_episodes=(cfg.max_steps * cfg.prompts_per_rollout if cfg.max_steps > 0
                        else cfg.num_episodes * len(ids)),
    )
    load = lambda cls, p, **kw: cls.from_pretrained(p, **kw)
    policy, ref = load(AutoModelForCausalLM, sft_model), load(AutoModelForCausalLM, sft_model)
    value, reward = (load(AutoModelForSequenceClassification, rm_model, num_labels=1) for _ in range(2))
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    if cfg.normalize_reward:  # the original's --normalize_reward: z-score with the RM's μ/σ before the KL term
        from .rewards import load_rm_normalizer

        normalize_score_head(reward, *(rm_normalizer or load_rm_normalizer(Path(rm_model).parent /
                                                                           "rm_normalization.json")))
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=Dataset.from_dict({"input_ids": ids}))
    start(trainer, None)  # TRL's PPO loop takes no checkpoint: an interrupted run restarts
    return finish(trainer, profile, "ppo", out_dir, final, settings, save=save_ppo_policy, sft_model=sft_model,
                  rm_model=rm_model)


def save_ppo_policy(trainer, final_dir: Path) -> None:
    """The policy alone, as a loadable model. TRL's PPOTrainer.save_model looks for ``.policy`` on the wrapped
    model, which under DDP (or DeepSpeed) is the wrapper, so it would save the policy+value state dict without a
    config. The state dict is gathered by every rank (collective under ZeRO-3); rank 0 writes."""
    acc = trainer.accelerator
    full = acc.get_state_dict(getattr(trainer, "deepspeed", None) or trainer.model)
    if acc.is_main_process:
        policy = acc.unwrap_model(trainer.model).policy
        policy.save_pretrained(str(final_dir), state_dict={k.removeprefix("policy."): v for k, v in full.items()
                                                            if k.startswith("policy.")})
