"""The Bradley-Terry reward model (book/method.md §4.2) on TRL's ``RewardTrainer``, its scorer, and the
μ/σ that normalise its scores in the GRPO and PPO rewards.
"""
from __future__ import annotations

from pathlib import Path

from .. import models
from ..config import ConfigError, Profile
from ..models import load_sequence_classifier
from ..text_format import policy_text
from .common import accumulation_steps, common_args, finish, portable, prepare_output, seed_everything, settings_hash, start
from .ranks import rank_device
from .resume import reached_end, resume_point

# ---------------------------------------------------------------- reward model


def rm_pair(row: dict, tokenizer) -> dict:
    """Chosen and rejected as full policy texts (no BOS, ' <eos>' at the end), tokenised."""
    enc = lambda resp: tokenizer(policy_text(row["prompt"], resp, tokenizer.eos_token),  # noqa: E731
                                 add_special_tokens=False)["input_ids"]
    return {"chosen_ids": enc(row["chosen_content"]), "rejected_ids": enc(row["rejected_content"])}


def load_rm_tokenizer(path: str, pad_token: str):
    tok = models.load_tokenizer(path, pad_with_eos=True)
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
    to_ds = lambda rs: Dataset.from_list([rm_pair(r, tok) for r in rs])  # noqa: E731
    trainer = RewardTrainer(model=model, args=args, train_dataset=to_ds(rows), eval_dataset=to_ds(eval_rows),
                            processing_class=tok, callbacks=callbacks)
    start(trainer, out_dir, resume)
    metrics = trainer.evaluate()
    return finish(trainer, profile, "reward_model", out_dir, final, settings, sft_model=sft_model,
                  eval_metrics=metrics)


class RewardModelScorer:
    """Scores policy texts with the trained RM, read at the last (EOS) token."""

    def __init__(self, path: str | Path, pad_token: str, batch_size: int = 8, device: str | None = None):
        self.tokenizer = load_rm_tokenizer(str(path), pad_token)
        self.tokenizer.padding_side = "right"
        self.device = device or rank_device()
        # in the checkpoint's own dtype, as it always was: these scores feed μ/σ and every RM reward
        self.model = load_sequence_classifier(path, self.device, None)
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
