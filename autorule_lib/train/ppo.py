"""The PPO baseline (book/method.md §4.4) on TRL's experimental ``PPOTrainer``.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..config import ConfigError, Profile
from ..text_format import policy_prompt
from .common import common_args, finish, portable, prepare_output, seed_everything, settings_hash, start
from .ranks import world_size
from .reward_model import load_rm_tokenizer, normalize_score_head
from .rewards import load_rm_normalizer

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
    load = lambda cls, p, **kw: cls.from_pretrained(p, **kw)  # noqa: E731
    policy, ref = load(AutoModelForCausalLM, sft_model), load(AutoModelForCausalLM, sft_model)
    value, reward = (load(AutoModelForSequenceClassification, rm_model, num_labels=1) for _ in range(2))
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    if cfg.normalize_reward:  # the original's --normalize_reward: z-score with the RM's μ/σ before the KL term
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
