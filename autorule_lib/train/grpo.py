"""GRPO (book/method.md §4.3) on TRL's ``GRPOTrainer``: one named run per reward variant.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from .. import models
from ..config import ConfigError, Profile
from ..text_format import policy_prompt
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
    tok = models.load_tokenizer(sft_model, pad_with_eos=True)
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
