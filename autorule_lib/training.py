"""Training stages on TRL's own trainers: SFT, Bradley-Terry reward model, GRPO, PPO (METHOD.md §4).

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


# Settings of METHOD.md §4 that TRL 1.12 cannot express exactly, and what is used instead.
TRL_DEVIATIONS = [
    ("GRPO token-level loss", "OpenRLHF averages token losses per micro-batch", "loss_type='bnpo' (same)"),
    ("GRPO prompt length", "prompts truncated at 1024 tokens", "longer prompts dropped (TRL 1.12 does not "
                                                                  "truncate); the <512-token filter makes this moot"),
    ("GRPO rollout batch", "1024 prompts x 2 samples, 16 updates of 128",
     "generation_batch_size=2048, per-device batch x accumulation x processes = 128"),
    ("PPO critic LR", "actor 3e-7, critic 5e-6", "one optimizer: actor LR for both"),
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
                max_steps: int, save_steps: int, gradient_checkpointing: bool, betas=(0.9, 0.999)) -> dict:
    """TrainingArguments shared by every stage; CPU switches only when the profile runs on CPU."""
    check_logging(profile)
    cpu = device_kind(profile) == "cpu"
    return dict(
        output_dir=str(out_dir), learning_rate=learning_rate, lr_scheduler_type="constant_with_warmup",
        # transformers 5 reads a float < 1 in warmup_steps as a ratio of the total steps
        warmup_steps=warmup_ratio, max_grad_norm=max_grad_norm, max_steps=max_steps, save_strategy="steps",
        save_steps=save_steps, logging_steps=1, seed=profile.seed, report_to=profile.report_to,
        adam_beta1=betas[0], adam_beta2=betas[1], bf16=profile.precision == "bf16" and not cpu,
        use_cpu=cpu, dataloader_pin_memory=not cpu, **{_checkpointing_key(): gradient_checkpointing and not cpu},
        save_only_model=False, disable_tqdm=True,
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


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prepare_output(out_dir: Path, settings: str, force: bool) -> bool:
    """True if the stage must run. A finished stage with the same settings is kept; different settings move
    the old output aside (nothing is deleted) so stale checkpoints are never resumed. Under several
    processes the main one decides and moves; the others follow it."""
    from accelerate import PartialState

    with PartialState().main_process_first():
        done, stamp = out_dir / "done.json", out_dir / "settings.json"
        if done.exists() and not force and read_json(done).get("settings_hash") == settings:
            return False
        if is_main_process():
            if out_dir.exists() and (force or (stamp.exists() and read_json(stamp)["settings_hash"] != settings)):
                n = 1
                while (aside := out_dir.with_name(f"{out_dir.name}.old{n}")).exists():
                    n += 1
                out_dir.rename(aside)
            out_dir.mkdir(parents=True, exist_ok=True)
            write_json(stamp, {"settings_hash": settings})
    return True


def last_checkpoint(out_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(out_dir)) if out_dir.exists() else None


def finish(trainer, profile: Profile, stage: str, out_dir: Path, final_dir: Path, settings: str, **extra) -> Path:
    trainer.save_model(str(final_dir))  # collective under DeepSpeed: every rank calls it
    if is_main_process():
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(str(final_dir))
        write_json(out_dir / "log_history.json", trainer.state.log_history)
        write_json(out_dir / "done.json", {"settings_hash": settings, "global_step": trainer.state.global_step,
                                           **provenance(profile, stage, **extra)})
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


def start(trainer, out_dir: Path | None) -> None:
    """Train from the last checkpoint under ``out_dir`` if there is one (None: no resume), with one-line
    progress."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(progress_lines())
    if out_dir is None:
        trainer.train()
    else:
        trainer.train(resume_from_checkpoint=last_checkpoint(out_dir))


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
    settings = settings_hash(cfg, base_model, profile.hash())
    if not prepare_output(out_dir, settings, force):
        return final
    tok = load_tokenizer(base_model)
    to_ds = lambda rs: Dataset.from_list([sft_example(r["prompt"], r["chosen_content"], tok, cfg.max_length)
                                          for r in rs])
    args = SFTConfig(
        **common_args(profile, out_dir, learning_rate=cfg.learning_rate, warmup_ratio=cfg.warmup_ratio,
                      max_grad_norm=cfg.max_grad_norm, max_steps=cfg.max_steps, save_steps=cfg.save_steps,
                      gradient_checkpointing=cfg.gradient_checkpointing, betas=(cfg.adam_beta1, cfg.adam_beta2)),
        num_train_epochs=cfg.num_train_epochs, per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=accumulation_steps(cfg.global_batch_size, cfg.per_device_batch_size, "sft"),
        max_length=cfg.max_length, dataset_kwargs={"skip_prepare_dataset": True}, eval_strategy="no",
    )
    trainer = SFTTrainer(model=base_model, args=args, train_dataset=to_ds(rows), eval_dataset=to_ds(eval_rows),
                         processing_class=tok, callbacks=callbacks)
    start(trainer, out_dir)
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
    settings = settings_hash(cfg, sft_model, profile.hash())
    if not prepare_output(out_dir, settings, force):
        return final
    tok = load_rm_tokenizer(sft_model, cfg.pad_token)
    model = AutoModelForSequenceClassification.from_pretrained(sft_model, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(
        **common_args(profile, out_dir, learning_rate=cfg.learning_rate, warmup_ratio=cfg.warmup_ratio,
                      max_grad_norm=cfg.max_grad_norm, max_steps=cfg.max_steps, save_steps=cfg.save_steps,
                      gradient_checkpointing=cfg.gradient_checkpointing),
        num_train_epochs=cfg.num_train_epochs, per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=accumulation_steps(cfg.global_batch_size, cfg.per_device_batch_size,
                                                       "reward_model"),
        max_length=cfg.max_length, eval_strategy="no",
    )
    to_ds = lambda rs: Dataset.from_list([rm_pair(r, tok) for r in rs])
    trainer = RewardTrainer(model=model, args=args, train_dataset=to_ds(rows), eval_dataset=to_ds(eval_rows),
                            processing_class=tok, callbacks=callbacks)
    start(trainer, out_dir)
    metrics = trainer.evaluate()
    return finish(trainer, profile, "reward_model", out_dir, final, settings, sft_model=sft_model,
                  eval_metrics=metrics)


class RewardModelScorer:
    """Scores policy texts with the trained RM, read at the last (EOS) token."""

    def __init__(self, path: str | Path, pad_token: str, batch_size: int = 8, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification

        self.tokenizer = load_rm_tokenizer(str(path), pad_token)
        self.tokenizer.padding_side = "right"
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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
    """Frozen mu/sigma of RM scores over chosen ∪ rejected of the filtered test pairs (METHOD.md §3)."""
    import statistics

    prompts = [r["prompt"] for r in pairs]
    scores = (scorer.score(prompts, [r["chosen_content"] for r in pairs])
              + scorer.score(prompts, [r["rejected_content"] for r in pairs]))
    n = len(pairs)
    return {"mean": statistics.fmean(scores), "std": statistics.pstdev(scores) or 1.0, "n_texts": 2 * n,
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
                      gradient_checkpointing=v.gradient_checkpointing, betas=(v.adam_beta1, v.adam_beta2)),
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
    settings = settings_hash(variant, sft_model, profile.hash(), names, reward_weights)
    if not prepare_output(out_dir, settings, force):
        return final
    tok = load_tokenizer(sft_model)
    tok.padding_side = "left"
    args = GRPOConfig(**grpo_args(profile, variant, out_dir), reward_weights=reward_weights)
    trainer = _no_bos_grpo_trainer()(model=sft_model, reward_funcs=reward_funcs, args=args,
                                     train_dataset=Dataset.from_list(grpo_prompts(prompts, tok,
                                                                                  variant.max_prompt_length)),
                                     processing_class=tok, callbacks=callbacks)
    start(trainer, out_dir)
    return finish(trainer, profile, f"grpo/{variant_name}", out_dir, final, settings, sft_model=sft_model,
                  variant=dataclasses.asdict(variant), reward_funcs=names, reward_weights=reward_weights)


# ---------------------------------------------------------------- PPO

def train_ppo(profile: Profile, prompts: list[dict], sft_model: str, rm_model: str, out_dir: Path,
              force: bool = False) -> Path:
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
    settings = settings_hash(cfg, sft_model, rm_model, profile.hash())
    if not prepare_output(out_dir, settings, force):
        return final
    if cfg.samples_per_prompt != 1:
        raise ConfigError("ppo.samples_per_prompt: TRL's PPOTrainer draws one sample per prompt")
    tok = load_rm_tokenizer(sft_model, profile.reward_model.pad_token)  # pad != eos: rewards read at EOS
    tok.padding_side = "left"
    ids = [tok(policy_prompt(r["prompt"]), add_special_tokens=False)["input_ids"] for r in prompts]
    mini_batches = cfg.prompts_per_rollout // cfg.train_batch_size
    if cfg.prompts_per_rollout % cfg.train_batch_size:
        raise ConfigError("ppo: prompts_per_rollout must be a multiple of train_batch_size")
    local_rollout = cfg.prompts_per_rollout // world_size()
    args = PPOConfig(
        **common_args(profile, out_dir, learning_rate=cfg.actor_learning_rate, warmup_ratio=cfg.critic_warmup_ratio,
                      max_grad_norm=cfg.max_grad_norm, max_steps=-1, save_steps=10**9, gradient_checkpointing=False),
        per_device_train_batch_size=min(cfg.per_device_batch_size, local_rollout),
        gradient_accumulation_steps=max(1, local_rollout // min(cfg.per_device_batch_size, local_rollout)),
        num_mini_batches=mini_batches, num_ppo_epochs=1, response_length=cfg.max_completion_length,
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
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=Dataset.from_dict({"input_ids": ids}))
    start(trainer, None)  # TRL's PPO loop takes no checkpoint: an interrupted run restarts
    return finish(trainer, profile, "ppo", out_dir, final, settings, sft_model=sft_model, rm_model=rm_model)
