import json
import math

import pytest

from autorule_lib.config import GRPOStageConfig, RewardConfig
from autorule_lib.profiles import load_profile
from autorule_lib.train.rewards import LengthPenalty, RMReward, RuleReward, build_reward_funcs, length_penalty_value, load_rm_normalizer, rule_fraction, rule_reward_value
from autorule_lib.verify.verdict import Verdict, unscored

V = lambda *values: [Verdict(v) if v is not None else unscored("unparseable") for v in values]  # noqa: E731


@pytest.mark.parametrize("values,shifted,fraction", [
    ((1, 1, 1, 0), 0.0, 0.75),          # (0.75 - 0.75) * 10
    ((1, 0, 0, 0), -5.0, 0.25),         # (0.25 - 0.75) * 10
    ((1, 1, 1, 1), 2.5, 1.0),
    ((0, 0, 0, 0), -7.5, 0.0),
])
def test_rule_reward_matches_hand_computed_values(values, shifted, fraction):
    frac = rule_fraction(V(*values))
    assert rule_reward_value(frac, RewardConfig()) == pytest.approx(shifted)
    assert rule_reward_value(frac, RewardConfig(rule_reward="fraction")) == pytest.approx(fraction)


def test_unscored_rules_never_count_as_zero():
    verdicts = V(1, None, 1, 0)
    assert rule_fraction(verdicts) is None  # default: any unscored rule unscores the response
    assert rule_fraction(verdicts, min_scored_fraction=0.5) == pytest.approx(2 / 3)  # over the scored rules only
    assert rule_reward_value(2 / 3, RewardConfig(min_scored_rule_fraction=0.5)) == pytest.approx(-0.8333333)
    assert rule_fraction(verdicts, min_scored_fraction=0.8) is None  # 3 of 4 scored < 80 %
    assert rule_fraction(V(None, None), min_scored_fraction=0.0) is None
    assert rule_reward_value(None, RewardConfig()) is None


@pytest.mark.parametrize("length,penalty", [(1, 0.0), (300, 0.0), (301, -1 / 600), (900, -1.0), (1200, -1.5)])
def test_length_penalty(length, penalty):
    assert length_penalty_value(length, RewardConfig()) == pytest.approx(penalty)
    assert LengthPenalty(RewardConfig())(["p"], ["c"], completion_ids=[[7] * length]) == [pytest.approx(penalty)]


class SpaceTokenizer:
    eos_token = "<eos>"

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split(" ") for t in texts]}


def test_length_counts_the_eos_when_tokenizing_by_hand():
    words = " ".join(["w"] * 599)  # 599 words + the EOS = 600 tokens
    assert LengthPenalty(RewardConfig(), SpaceTokenizer())(["p"], [words]) == [pytest.approx(-0.5)]


class ScriptedVerifier:
    """Verdicts looked up by (response text, rule index); records what it was asked."""

    def __init__(self, table):
        self.table, self.seen = table, []

    def verify(self, conversations, rules):
        self.seen.append(conversations)
        return [V(*self.table[c.split("<|assistant|>")[1]]) for c in conversations]


RULES = ["r0", "r1", "r2", "r3"]
TABLE = {"good": (1, 1, 1, 1), "ok": (1, 1, 1, 0), "bad": (1, 0, 0, 0), "broken": (1, None, 1, 1)}


def test_rule_reward_callable_follows_trl_conventions():
    verifier = ScriptedVerifier(TABLE)
    rule = RuleReward(verifier, RULES, RewardConfig(), eos_token="<eos>")
    assert rule.__name__ == "rule_reward"
    logged = {}
    prompts = ["<|user|>Q<|assistant|>"] * 4  # TRL hands over the dataset's prompt text as it is
    out = rule(prompts=prompts, completions=["good", "ok", "bad", "broken <eos>"], completion_ids=None,
               log_metric=lambda k, v: logged.setdefault(k, v), trainer_state=None, log_extra=None)
    assert out == [pytest.approx(2.5), pytest.approx(0.0), pytest.approx(-5.0), None]
    assert verifier.seen[0][0] == "<|user|>Q<|assistant|>good" and verifier.seen[0][3].endswith("broken")
    assert logged["rules/00_satisfied"] == 1.0 and logged["rules/01_satisfied"] == pytest.approx(2 / 3)
    assert logged["rules/03_satisfied"] == pytest.approx(2 / 4)
    assert logged["verifier/unscored_checks"] == pytest.approx(1 / 16)
    assert logged["verifier/unscored_responses"] == pytest.approx(1 / 4)


def test_no_verdict_answers_count_as_zero_and_are_logged_per_step():
    """The original's rule: an answer without [[Yes]] is 0. The response keeps its reward (its group-mate
    keeps its learning signal) and the step logs how often it happened."""
    from autorule_lib.verify.verdict import parse_verdict

    class NoVerdictOnce:
        def verify(self, conversations, rules):
            return [[parse_verdict("[[Yes]]"), parse_verdict("I think it is fine.")] for _ in conversations]

    logged = {}
    out = RuleReward(NoVerdictOnce(), ["r0", "r1"], RewardConfig())(
        prompts=["Q", "Q"], completions=["a", "b"], log_metric=lambda k, v: logged.setdefault(k, v))
    assert out == [pytest.approx(-2.5), pytest.approx(-2.5)]  # (1/2 - 0.75) * 10, not None
    assert logged["verifier/no_verdict"] == pytest.approx(0.5) and logged["verifier/unscored_responses"] == 0.0


def test_rm_reward_z_normalises_with_the_frozen_stats(tmp_path):
    path = tmp_path / "rm_normalization.json"
    path.write_text(json.dumps({"mean": 2.0, "std": 4.0, "n_texts": 10}))
    mean, std = load_rm_normalizer(path)
    seen = []
    scorer = lambda texts: seen.extend(texts) or [10.0, -2.0]  # noqa: E731
    rm = RMReward(scorer, mean, std, "<eos>")
    assert rm(["<|user|>Q<|assistant|>", "Q2"], ["A ", "B<eos>"]) == [pytest.approx(2.0), pytest.approx(-1.0)]
    assert seen == ["<|user|>Q<|assistant|>A <eos>", "<|user|>Q2<|assistant|>B <eos>"]  # the RM's training format
    path.write_text(json.dumps({"mean": 0.0, "std": 0.0}))
    with pytest.raises(ValueError, match="positive std"):
        load_rm_normalizer(path)


def test_rm_reads_a_truncated_completion_at_its_last_generated_token():
    """TRL's completion_ids keep the EOS the policy generated; one cut at the length limit has none, and
    the original scores it as generated (no EOS appended that the policy never produced)."""
    seen = []
    rm = RMReward(lambda texts: seen.extend(texts) or [0.0] * len(texts), 0.0, 1.0, "<eos>", eos_token_id=2)
    rm(["<|user|>Q<|assistant|>", "Q2"], ["A ", "B was cut mid"], completion_ids=[[7, 8, 2], [9, 10, 11]])
    assert seen == ["<|user|>Q<|assistant|>A <eos>", "<|user|>Q2<|assistant|>B was cut mid"]


@pytest.mark.parametrize("policy,expected", [("drop", [1.0, None]), ("rm_only", [1.0, 1.0])])
def test_unscored_rule_reward_propagates_to_the_rm_reward(policy, expected):
    profile = load_profile("smoke")
    profile.reward.unscored_response = policy
    variant = GRPOStageConfig(reward="autorule")
    funcs, weights = build_reward_funcs(profile, variant, rm_scorer=lambda texts: [1.0] * len(texts),
                                        rm_normalizer=(0.0, 1.0), tokenizer=SpaceTokenizer(), rules=RULES,
                                        verifier=ScriptedVerifier(TABLE))
    rule, rm = funcs
    prompts, completions = ["Q", "Q"], ["good", "broken"]
    assert rule(prompts, completions) == [pytest.approx(2.5), None]
    assert rm(prompts, completions) == expected
    if policy == "drop":  # the RM reward must see the rule reward of the same batch, or refuse
        with pytest.raises(RuntimeError, match="after rule_reward"):
            rm(["Q"], ["another batch"])


def test_builder_variants_and_weights():
    from trl.trainer.utils import get_callable_name

    profile = load_profile("smoke")
    kw = dict(rm_scorer=lambda t: [0.0] * len(t), rm_normalizer=(0.0, 1.0), tokenizer=SpaceTokenizer())
    funcs, weights = build_reward_funcs(profile, GRPOStageConfig(reward="autorule"), rules=RULES,
                                        verifier=ScriptedVerifier(TABLE), **kw)
    assert [get_callable_name(f) for f in funcs] == ["rule_reward", "rm_reward"] and weights == [1.0, 1.0]
    funcs, weights = build_reward_funcs(profile, GRPOStageConfig(reward="rm"), **kw)
    assert [get_callable_name(f) for f in funcs] == ["rm_reward"] and weights == [1.0]
    funcs, weights = build_reward_funcs(profile, GRPOStageConfig(reward="rm_length_penalty"), **kw)
    assert [get_callable_name(f) for f in funcs] == ["rm_reward", "length_penalty"] and weights == [1.0, 1.0]
    with pytest.raises(ValueError, match="verifier"):
        build_reward_funcs(profile, GRPOStageConfig(reward="autorule"), rules=[], **kw)


def test_builder_loads_missing_parts_from_the_run(tmp_path):
    from autorule_lib.artifacts import MissingArtifactError
    from autorule_lib.layout import RunLayout

    profile, layout = load_profile("smoke"), RunLayout(tmp_path)
    with pytest.raises(MissingArtifactError, match="05_reward_model"):
        build_reward_funcs(profile, GRPOStageConfig(reward="rm"), layout, rm_scorer=lambda t: t,
                           tokenizer=SpaceTokenizer())
    rm_dir = tmp_path / "artifacts" / "05_reward_model"
    rm_dir.mkdir(parents=True)
    (rm_dir / "rm_normalization.json").write_text(json.dumps({"mean": 1.0, "std": 2.0}))
    with pytest.raises(MissingArtifactError, match="02_rule_extraction"):
        build_reward_funcs(profile, GRPOStageConfig(reward="autorule", rule_set="mt"), layout,
                           rm_scorer=lambda t: t, tokenizer=SpaceTokenizer())
    (rules_dir := tmp_path / "artifacts" / "02_rule_extraction" / "mt").mkdir(parents=True)
    (rules_dir / "merged_rules.json").write_text(json.dumps(RULES))
    funcs, _ = build_reward_funcs(profile, GRPOStageConfig(reward="autorule", rule_set="mt"), layout,
                                  rm_scorer=lambda t: [3.0] * len(t), tokenizer=SpaceTokenizer(),
                                  verifier=ScriptedVerifier(TABLE))
    assert funcs[0].rules == RULES and funcs[0](["Q"], ["good"]) == [pytest.approx(2.5)]
    assert funcs[1](["Q"], ["good"]) == [pytest.approx(1.0)]  # (3 - 1) / 2 with the run's frozen mu, sigma


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_two_grpo_steps_with_the_autorule_reward(models_dir, tmp_path):
    """TRL calls the rewards, combines them with reward_weights and logs the per-rule rates every step."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from autorule_lib.models import resolve
    from autorule_lib.verify.verifier import build_verifier

    profile = load_profile("smoke")
    policy = resolve(profile, "policy", models_dir)
    tok = AutoTokenizer.from_pretrained(policy)
    tok.padding_side = "left"
    verifier = build_verifier(profile, models_dir, mode="fast", layout="conversation_first", use_cache=False)
    rules = ["The assistant's responses should be polite.", "The assistant's responses should be short."]
    funcs, weights = build_reward_funcs(profile, GRPOStageConfig(reward="autorule"), tokenizer=tok, rules=rules,
                                        verifier=verifier, rm_normalizer=(0.0, 10.0),
                                        rm_scorer=lambda texts: [float(len(t) % 7) for t in texts])
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=2,
                      per_device_train_batch_size=4, num_generations=2, max_completion_length=8, beta=0.0,
                      logging_steps=1, save_strategy="no", reward_weights=weights, dataloader_pin_memory=False)
    data = Dataset.from_list([{"prompt": f"<|user|>Question {i}?<|assistant|>"} for i in range(8)])
    trainer = GRPOTrainer(model=policy, reward_funcs=funcs, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 2
    for h in logs:
        assert {"rewards/rule_reward/mean", "rewards/rm_reward/mean", "rules/00_satisfied", "rules/01_satisfied",
                "verifier/unscored_checks", "rm/raw_score_mean"} <= set(h)
        assert -7.5 <= h["rewards/rule_reward/mean"] <= 2.5 and not math.isnan(h["rewards/rm_reward/mean"])
    assert verifier.stats["checks"] > 0 and verifier.stats["checks"] % len(rules) == 0  # every rule, every completion


def test_grpo_can_use_a_user_supplied_rule_file_with_its_hash_recorded(tmp_path):
    from autorule_lib.train.rewards import rule_set_table

    (tmp_path / "appendix.json").write_text(json.dumps(["Rule one.", "Rule two."]))
    prof = tmp_path / "mine.yaml"
    prof.write_text("extends: smoke\ngrpo_runs: [appendix, rm_only]\n"
                    "grpo_variants: {appendix: {reward: autorule, rule_set_file: ./appendix.json}}\n")
    profile = load_profile(prof)
    funcs, _ = build_reward_funcs(profile, profile.grpo_variant("appendix"), rm_scorer=lambda t: [0.0] * len(t),
                                  rm_normalizer=(0.0, 1.0), tokenizer=SpaceTokenizer(),
                                  verifier=ScriptedVerifier({}))
    assert funcs[0].rules == ["Rule one.", "Rule two."]
    info = funcs[0].rule_set
    assert info["source"] == "file:./appendix.json" and info["n_rules"] == 2 and len(info["sha256"]) == 64
    table = {r["run"]: r for r in rule_set_table(profile)}
    assert table["appendix"]["rules"] == 2 and table["rm_only"]["rule set"] == "—"
    (tmp_path / "appendix.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="JSON list of rule strings"):
        build_reward_funcs(profile, profile.grpo_variant("appendix"), rm_scorer=lambda t: [0.0] * len(t),
                           rm_normalizer=(0.0, 1.0), tokenizer=SpaceTokenizer(), verifier=ScriptedVerifier({}))
