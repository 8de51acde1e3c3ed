"""AutoRule's rewards as reward functions for TRL's ``GRPOTrainer`` (book/method.md §3).

TRL 1.12 calls every reward function as ``f(prompts=, completions=, completion_ids=, trainer_state=,
log_extra=, log_metric=, **dataset_columns)`` and expects one float per completion, or ``None`` where
the function has no reward for it. It combines them as ``Σ w_i r_i`` with ``GRPOConfig.reward_weights``
using ``nansum`` (a ``None`` adds nothing), and a completion for which *every* function returned
``None`` gets zero advantage. ``log_metric(name, value)`` adds a scalar to the step's logged metrics.

Rewards here:
* rule reward: ``frac`` = satisfied fraction of the rules, ``(frac − shift) · scale`` (the released code;
  0.75 and 10) or ``frac`` itself (the paper's text). ``frac`` is taken over the *scored* rules, and only
  when at least ``min_scored_rule_fraction`` of them were scored; otherwise the rule reward is ``None``.
* RM reward: ``(RM(text) − μ) / σ`` with μ, σ frozen after RM training (a JSON ``{"mean", "std"}``).
* length penalty: ``−max(0, (L − 300) / 600)``, L = completion tokens including EOS.

An unscored rule reward must not silently become "frac = shift": with ``unscored_response: drop`` (the
default) the RM reward also returns ``None`` for that completion, so TRL gives it no learning signal.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Sequence

from ..artifacts import read_json
from ..config import GRPOStageConfig, Profile, RewardConfig
from ..layout import RM, RULES, RunLayout
from ..text_format import ASSISTANT, USER, policy_text, verifier_conversation
from ..verify.verdict import NO_VERDICT, Verdict, reason_kind
from ..verify.verifier import RuleVerifier
from ..verify.verifier import build_verifier
from ..profiles import resolve_local_path
from ..artifacts import require
from .reward_model import RewardModelScorer
from .. import models

Scorer = Callable[[list[str]], Sequence[float]]  # full policy texts -> raw RM scores


# ---------------------------------------------------------------- the formulas

def rule_fraction(verdicts: Sequence[Verdict], min_scored_fraction: float = 1.0) -> float | None:
    """Satisfied fraction over the scored rules, or None if too few (or none) were scored."""
    scored = [v.value for v in verdicts if v.value is not None]
    if not verdicts or not scored or len(scored) < min_scored_fraction * len(verdicts) - 1e-9:
        return None
    return sum(scored) / len(scored)


def rule_reward_value(frac: float | None, cfg: RewardConfig) -> float | None:
    if frac is None:
        return None
    return (frac - cfg.rule_shift) * cfg.rule_scale if cfg.rule_reward == "shifted" else frac


def rule_reward_from_verdicts(verdicts: Sequence[Verdict], cfg: RewardConfig) -> float | None:
    """One response's rule reward from its verdicts (None when unscored, see ``rule_fraction``)."""
    return rule_reward_value(rule_fraction(verdicts, cfg.min_scored_rule_fraction), cfg)


def length_penalty_value(num_tokens: int, cfg: RewardConfig) -> float:
    return -max(0.0, (num_tokens - cfg.length_threshold) / cfg.length_scale)


def load_rm_normalizer(path: str | Path) -> tuple[float, float]:
    """(μ, σ) written by the reward-model stage; σ must be positive."""
    d = read_json(path, made_by="reward model stage")
    mean, std = float(d["mean"]), float(d["std"])
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"{path}: RM normaliser needs a finite mean and a positive std, got {d}")
    return mean, std


# ---------------------------------------------------------------- TRL inputs -> texts

def _prompt_text(prompt) -> str:
    """The user prompt from a TRL prompt: plain text (policy format or not) or a list of messages."""
    if isinstance(prompt, list):
        return next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    if prompt.startswith(USER) and prompt.endswith(ASSISTANT):  # already the policy's prompt format
        return prompt[len(USER):-len(ASSISTANT)]
    return prompt


def _completion_text(completion) -> str:
    if isinstance(completion, list):
        return "".join(m["content"] for m in completion if m["role"] == "assistant")
    return completion


def _batch_key(prompts, completions) -> str:
    texts = [str(p) + "\x00" + str(c) for p, c in zip(prompts, completions)]
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()


# ---------------------------------------------------------------- reward functions

class RuleReward:
    """The AutoRule rule reward: judge each completion under every rule, reward the satisfied fraction.

    Logs per step: ``rules/<i>_satisfied`` (rate among scored verdicts of rule i), ``rules/satisfied_fraction``,
    ``verifier/unscored_checks``, ``verifier/unscored_responses`` (fractions of the batch) and
    ``verifier/no_verdict`` (fraction of checks whose answer held no verdict and counted as 0, the original's rule).
    """

    __name__ = "rule_reward"  # TRL logs rewards/<__name__>/mean

    def __init__(self, verifier: RuleVerifier, rules: Sequence[str], cfg: RewardConfig, eos_token: str | None = None):
        if not rules:
            raise ValueError("the rule reward needs at least one rule")
        self.verifier, self.rules, self.cfg, self.eos = verifier, list(rules), cfg, eos_token
        self.last_batch: str | None = None
        self.last_unscored: set[int] = set()  # completions of the last batch with no rule reward
        self.last_metrics: dict[str, float] = {}

    def __call__(self, prompts, completions, log_metric=None, **kwargs) -> list[float | None]:
        convs = [verifier_conversation(_prompt_text(p), _completion_text(c), self.eos)
                 for p, c in zip(prompts, completions)]
        verdicts = self.verifier.verify(convs, self.rules)
        rewards = [rule_reward_from_verdicts(v, self.cfg) for v in verdicts]
        self.last_batch = _batch_key(prompts, completions)
        self.last_unscored = {i for i, r in enumerate(rewards) if r is None}
        self.last_metrics = self._metrics(verdicts, rewards)
        if log_metric is not None:
            for name, value in self.last_metrics.items():
                log_metric(name, value)
        return rewards

    def _metrics(self, verdicts: list[list[Verdict]], rewards: list[float | None]) -> dict[str, float]:
        m: dict[str, float] = {}
        for k in range(len(self.rules)):
            scored = [row[k].value for row in verdicts if row[k].value is not None]
            if scored:  # a rule with no scored verdict this step is left out, not logged as 0
                m[f"rules/{k:02d}_satisfied"] = sum(scored) / len(scored)
        all_scored = [v.value for row in verdicts for v in row if v.value is not None]
        if all_scored:
            m["rules/satisfied_fraction"] = sum(all_scored) / len(all_scored)
        checks = sum(len(row) for row in verdicts)
        m["verifier/unscored_checks"] = (checks - len(all_scored)) / max(1, checks)
        m["verifier/unscored_responses"] = sum(r is None for r in rewards) / max(1, len(rewards))
        m["verifier/no_verdict"] = sum(v.value == 0 and reason_kind(v.reason) == NO_VERDICT
                                       for row in verdicts for v in row) / max(1, checks)
        return m


class RMReward:
    """z-normalised reward-model score with frozen μ, σ. With ``skip_with`` (a RuleReward run earlier
    in the same step), returns None where that rule reward was None, so the completion is dropped.

    The RM reads what the policy generated: a completion that ended with EOS is scored in the RM's
    training format (``<|user|>p<|assistant|>r <eos>``), one cut at the length limit (its
    ``completion_ids`` do not end with ``eos_token_id``) at its last generated token — the original
    appends no EOS the policy never produced. Called without ``completion_ids`` (by hand), every
    completion counts as finished.
    """

    __name__ = "rm_reward"

    def __init__(self, scorer: Scorer, mean: float, std: float, eos_token: str, skip_with: RuleReward | None = None,
                 eos_token_id: int | None = None):
        self.scorer, self.mean, self.std, self.eos, self.skip_with = scorer, mean, std, eos_token, skip_with
        self.eos_id = eos_token_id
        self.last_metrics: dict[str, float] = {}

    def texts(self, prompts, completions, completion_ids=None) -> list[str]:
        finished = ([bool(ids) and ids[-1] == self.eos_id for ids in completion_ids]
                    if completion_ids is not None and self.eos_id is not None else [True] * len(completions))
        out = []
        for p, c, done in zip(prompts, completions, finished):
            c = _completion_text(c)
            # finished: the RM's training format, whatever trailing space/EOS the text had; cut: as generated
            out.append(policy_text(_prompt_text(p), c.removesuffix(self.eos).rstrip(), self.eos) if done
                       else USER + _prompt_text(p) + ASSISTANT + c)
        return out

    def __call__(self, prompts, completions, completion_ids=None, log_metric=None, **kwargs) -> list[float | None]:
        texts = self.texts(prompts, completions, completion_ids)
        raw = [float(s) for s in self.scorer(texts)]
        rewards: list[float | None] = [(s - self.mean) / self.std for s in raw]
        if self.skip_with is not None:
            if self.skip_with.last_batch != _batch_key(prompts, completions):
                raise RuntimeError("rm_reward must come after rule_reward in reward_funcs (it reuses its verdicts)")
            rewards = [None if i in self.skip_with.last_unscored else r for i, r in enumerate(rewards)]
        self.last_metrics = {"rm/raw_score_mean": sum(raw) / max(1, len(raw))}
        if log_metric is not None:
            log_metric("rm/raw_score_mean", self.last_metrics["rm/raw_score_mean"])
        return rewards


class LengthPenalty:
    """``−max(0, (L − threshold) / scale)``, L = completion tokens including the EOS the policy generated."""

    __name__ = "length_penalty"

    def __init__(self, cfg: RewardConfig, tokenizer=None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.last_metrics: dict[str, float] = {}

    def __call__(self, prompts, completions, completion_ids=None, log_metric=None, **kwargs) -> list[float]:
        if completion_ids is not None:  # TRL's ids keep the first EOS and drop the padding after it
            lengths = [len(ids) for ids in completion_ids]
        else:  # called by hand: count as the policy would have generated it, EOS included
            texts = [_completion_text(c) + " " + self.tokenizer.eos_token for c in completions]
            lengths = [len(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        self.last_metrics = {"completions/tokens_with_eos": sum(lengths) / max(1, len(lengths))}
        if log_metric is not None:
            log_metric("completions/tokens_with_eos", self.last_metrics["completions/tokens_with_eos"])
        return [length_penalty_value(n, self.cfg) for n in lengths]


# ---------------------------------------------------------------- the builder the GRPO stage calls

def build_reward_funcs(profile: Profile, variant: GRPOStageConfig, layout: RunLayout | None = None, *,
                       rm_scorer: Scorer | None = None, rm_normalizer: tuple[float, float] | None = None,
                       tokenizer=None, rules: Sequence[str] | None = None,
                       verifier: RuleVerifier | None = None) -> tuple[list, list[float]]:
    """(reward_funcs, reward_weights) for ``GRPOTrainer`` / ``GRPOConfig`` for one GRPO run.

    * ``autorule``: [rule_reward, rm_reward], weights (rule_weight, rm_weight) — 1:1 in the paper;
    * ``rm``: [rm_reward];
    * ``rm_length_penalty``: [rm_reward, length_penalty], weights (rm_weight, 1).

    Parts not given are loaded from the run's artifacts (``layout``): the rule set of chapter 02
    (``<rule_set>/merged_rules.json``), the RM and its frozen μ/σ of chapter 05, the policy tokenizer and
    the profile's verifier (verdict cache ``cache/verdicts.sqlite``).
    """
    cfg = profile.reward
    if layout is not None:
        rm_scorer, rm_normalizer, tokenizer = _from_run(profile, layout, rm_scorer, rm_normalizer, tokenizer)
    if rm_scorer is None or rm_normalizer is None or tokenizer is None:
        raise ValueError("build_reward_funcs needs rm_scorer, rm_normalizer and tokenizer, or a run layout to load "
                         "them")
    mean, std = rm_normalizer
    eos = tokenizer.eos_token
    rule_info = None
    if variant.reward == "autorule":
        if rules is None and (layout is not None or variant.rule_set_file):
            rules, rule_info = rules_for_variant(profile, variant, layout)
        if layout is not None and verifier is None:
            verifier = build_verifier(profile, layout.models, layout.verdict_cache)
        if verifier is None or not rules:
            raise ValueError("the autorule reward needs a verifier and a non-empty rule set")
        rule = RuleReward(verifier, rules, cfg, eos)
        rule.rule_set = rule_info or rule_set_info(rules, "given")  # provenance: which rules this run used
        rm = RMReward(rm_scorer, mean, std, eos, skip_with=rule if cfg.unscored_response == "drop" else None,
                      eos_token_id=getattr(tokenizer, "eos_token_id", None))
        return [rule, rm], [cfg.rule_weight, cfg.rm_weight]
    rm = RMReward(rm_scorer, mean, std, eos, eos_token_id=getattr(tokenizer, "eos_token_id", None))
    if variant.reward == "rm":
        return [rm], [cfg.rm_weight]
    if variant.reward == "rm_length_penalty":
        return [rm, LengthPenalty(cfg, tokenizer)], [cfg.rm_weight, 1.0]
    raise ValueError(f"unknown GRPO reward {variant.reward!r}")


def rule_set_info(rules: Sequence[str], source: str) -> dict:
    """What a run's provenance records about its rule set: where it came from, its size and hash."""
    digest = hashlib.sha256(json.dumps(list(rules), ensure_ascii=False).encode()).hexdigest()
    return {"source": source, "n_rules": len(rules), "sha256": digest}


def read_rule_file(path: Path) -> list[str]:
    """A user-supplied rule set: a JSON list of non-empty rule strings."""
    try:
        rules = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a JSON list of rules: {e}") from None
    if not isinstance(rules, list) or not rules or not all(isinstance(r, str) and r.strip() for r in rules):
        raise ValueError(f"{path}: expected a non-empty JSON list of rule strings")
    return rules


def rules_for_variant(profile: Profile, variant: GRPOStageConfig, layout: RunLayout | None) -> tuple[list[str], dict]:
    """(rules, provenance) of one GRPO run: its ``rule_set_file`` if given, else chapter 02's ``rule_set``."""
    if variant.rule_set_file:
        path = resolve_local_path(profile, variant.rule_set_file)
        rules = read_rule_file(path)
        return rules, {**rule_set_info(rules, f"file:{variant.rule_set_file}"), "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if layout is None:
        raise ValueError("the autorule reward needs a run (chapter 02's rule set) or grpo.rule_set_file")
    rules = load_rules(layout, variant.rule_set)
    return rules, rule_set_info(rules, f"stage 02 '{variant.rule_set}' (merged_rules.json)")


def rule_set_table(profile: Profile, layout: RunLayout | None = None) -> list[dict]:
    """Per named GRPO run: its reward and which rule set it uses (chapter 06 shows this)."""
    rows = []
    for name in profile.grpo_run_names():
        v = profile.grpo_variant(name)
        row = {"run": name, "reward": v.reward, "rule set": "—", "rules": None, "sha256": None}
        if v.reward == "autorule":
            try:
                _, info = rules_for_variant(profile, v, layout)
                row.update({"rule set": info["source"], "rules": info["n_rules"], "sha256": info["sha256"][:16]})
            except (OSError, ValueError) as e:
                row["rule set"] = f"not available: {e}"
        rows.append(row)
    return rows


def load_rules(layout: RunLayout, rule_set: str | None) -> list[str]:
    """A merged rule set of chapter 02: a bare JSON array of strings."""
    if rule_set is None:
        raise ValueError("the autorule reward needs grpo.rule_set ('uf' or 'mt')")
    path = require(layout.rules(rule_set), RULES)
    rules = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
        raise ValueError(f"{path}: expected a JSON array of rule strings")
    return rules


def _from_run(profile: Profile, layout: RunLayout, rm_scorer, rm_normalizer, tokenizer):
    if rm_normalizer is None:
        rm_normalizer = load_rm_normalizer(require(layout.rm_normalization, RM))
    if rm_scorer is None:
        rm_scorer = RewardModelScorer(require(layout.rm_model, RM), profile.reward_model.pad_token).score_texts
    if tokenizer is None:
        tokenizer = models.load_tokenizer(models.resolve(profile, "tokenizer", layout.models))
    return rm_scorer, rm_normalizer, tokenizer
