"""Supervised fine-tuning on the chosen responses (book/method.md §4.1), on TRL's ``SFTTrainer``.
"""
from __future__ import annotations

from pathlib import Path

from .. import models
from ..config import Profile
from ..text_format import completion_text, policy_prompt
from .common import (
    accumulation_steps,
    common_args,
    finish,
    portable,
    prepare_output,
    seed_everything,
    settings_hash,
    start,
)
from .resume import reached_end, resume_point

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
    tok = models.load_tokenizer(base_model, pad_with_eos=True)
    to_ds = lambda rs: Dataset.from_list([sft_example(r["prompt"], r["chosen_content"], tok, cfg.max_length)  # noqa: E731
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
