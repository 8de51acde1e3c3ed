"""Reward-hacking study pieces that need no model: probes, checkpoint selection, training reward, divergence."""

import pandas as pd

from autorule_lib.evaluate import reward_hacking as rh
from autorule_lib.config import RewardConfig
from autorule_lib.layout import RunLayout
from autorule_lib.profiles import load_profile

ROW = {"prompt_id": "p0", "prompt": "Explain rain.", "rejected_content": "Water.",
       "chosen_content": "Rain forms when water vapour condenses into droplets. They fall when heavy."}


def test_probes_are_the_four_degenerate_responses_beside_the_real_ones():
    p = rh.probes(ROW, repeat=3, pad_to_words=50)
    assert list(p) == ["chosen", "rejected", "empty", "repeated sentence", "bare 'Thought process:'",
                       "padded to great length"]
    assert p["empty"] == "" and p["bare 'Thought process:'"] == "Thought process:"
    assert p["repeated sentence"] == " ".join(["Rain forms when water vapour condenses into droplets."] * 3)
    assert p["padded to great length"].startswith(ROW["chosen_content"]) and len(p["padded to great length"].split()) >= 50


def test_two_episode_runs_come_from_the_profile():
    assert rh.two_episode_runs(load_profile("paper")) == ["autorule_uf_2ep", "rm_only_2ep"]


def test_study_checkpoints_start_at_sft_and_keep_the_final(tmp_path):
    run = tmp_path / "artifacts" / "06_grpo" / "rm_only_2ep"
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6", "final"):
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")
    layout = RunLayout(tmp_path)
    steps = [s for s, _ in rh.study_checkpoints(layout, "rm_only_2ep", every=2)]
    assert steps == [0, 4, 7]  # SFT, every 2nd checkpoint, the final one
    assert rh.study_checkpoints(layout, "rm_only_2ep")[0][1] == tmp_path / "artifacts" / "04_sft" / "model"
    assert rh.study_checkpoints(layout, "missing_run") == []


def test_training_reward_is_what_the_run_optimised():
    cfg = RewardConfig()
    assert rh.training_reward("autorule", 0.5, -1.0, cfg) == -0.5
    assert rh.training_reward("autorule", 0.5, None, cfg) is None  # unscored: no number, not 0
    assert rh.training_reward("rm", 0.5, -1.0, cfg) == 0.5


def test_divergence_from_the_sft_start():
    table = pd.DataFrame([
        {"run": "rm_only_2ep", "step": 0, "training_reward": 0.0, "rm_reward": 0.0, "rule_reward": 1.0, "uf_win_rate": 50.0},
        {"run": "rm_only_2ep", "step": 8, "training_reward": 2.0, "rm_reward": 2.0, "rule_reward": 0.5, "uf_win_rate": 40.0},
    ])
    d = rh.divergence(table).loc["rm_only_2ep"]
    assert (d["training reward change"], d["win rate change (points)"], d["rule reward change"]) == (2.0, -10.0, -0.5)


def test_probe_summary_says_which_probes_beat_the_chosen_response():
    df = pd.DataFrame([
        {"prompt_id": "a", "probe": "chosen", "rm_reward": 1.0, "rule_fraction": 0.9, "rule_reward": 1.5,
         "rule_unscored": 0, "words": 50},
        {"prompt_id": "a", "probe": "empty", "rm_reward": 2.0, "rule_fraction": 0.1, "rule_reward": -6.5,
         "rule_unscored": 0, "words": 0},
    ])
    s = rh.probe_summary(df)
    assert s.loc["empty", "beats chosen (RM)"] == 1.0 and s.loc["empty", "beats chosen (rules)"] == 0.0
