"""The sanity-check table: computed from a run's metric rows, honest about 'no' and 'not measured'."""
import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from autorule_lib.evaluate import sanity
from autorule_lib.layout import RunLayout

METHODS = ["sft", "autorule_uf", "autorule_mt", "rm_only", "length_penalty", "length_control", "ppo"]


def row(method, metric, value, step=None, stage="09_results"):
    return {"method": method, "metric": metric, "value": value, "step": step, "stage": stage}


def good_rows():
    rows = [row(m, "mean_tokens", v) for m, v in
            {"sft": 20, "rm_only": 24, "length_penalty": 12, "autorule_uf": 10, "autorule_mt": 11, "ppo": 22}.items()]
    rows += [row(m, "rule_satisfaction_uf", v) for m, v in {"sft": 0.4, "rm_only": 0.3, "autorule_uf": 0.7}.items()]
    rows += [row(m, "rule_satisfaction_mt", v) for m, v in {"sft": 0.4, "rm_only": 0.3, "autorule_mt": 0.6}.items()]
    rows += [row(m, "rm_score", v) for m, v in {"sft": -0.2, "rm_only": 0.9, "ppo": 0.1}.items()]
    rows += [row(m, "identical_to_sft", 0.0) for m in METHODS if m != "sft"]
    for run in ("rm_only_2ep", "autorule_uf_2ep"):
        for step, rm, rule in ((0, 0.0, -1.0), (4, 0.5, -0.5), (8, 0.8, -0.4)):
            rows += [row(run, "rm_reward", rm, step, "08_reward_hacking"),
                     row(run, "rule_reward", rule, step, "08_reward_hacking")]
    return rows


def table(rows):
    checks = sanity.default_checks(METHODS, ["rm_only_2ep", "autorule_uf_2ep"])
    return sanity.sanity_table(rows, checks, episodes={"rm_only_2ep": 2, "autorule_uf_2ep": 2})


def test_every_check_holds_on_rows_that_move_the_right_way():
    t = table(good_rows())
    assert list(t.columns) == ["expected", "measured", "holds"]
    assert (t["holds"] == "yes").all(), t
    assert len(t) == 10  # length, 2 x 2 rule satisfaction, RM-only, PPO, 2 episode checks, changed responses
    lp = t.loc["length penalty gives shorter completions than RM-only"]
    assert lp["measured"] == "length_penalty 12.000, rm_only 24.000"
    assert "step 4: 0.500, step 8: 0.800" in t.loc["rm_only_2ep: the reward-hacking probes differ between episode 1 and 2",
                                                     "measured"]


def test_a_reward_with_the_wrong_sign_reads_no():
    rows = [r for r in good_rows() if not (r["method"] == "length_penalty" and r["metric"] == "mean_tokens")]
    rows.append(row("length_penalty", "mean_tokens", 30))
    rows = [dict(r, value=-r["value"]) if r["metric"] == "rm_score" else r for r in rows]  # RM sign flipped
    t = table(rows)
    assert t.loc["length penalty gives shorter completions than RM-only", "holds"] == "no"
    assert t.loc["RM-only GRPO raises the mean RM score above SFT", "holds"] == "no"
    assert t.loc["PPO raises the mean RM score above SFT", "holds"] == "no"


def test_identical_episodes_and_untrained_models_read_no():
    rows = [r for r in good_rows() if not (r["stage"] == "08_reward_hacking" and r["step"] == 8)]
    for r in [r for r in rows if r["stage"] == "08_reward_hacking" and r["step"] == 4]:
        rows.append(dict(r, step=8))  # episode 2 measured exactly as episode 1: the policy did not move
    rows = [dict(r, value=1.0) if r["method"] == "ppo" and r["metric"] == "identical_to_sft" else r for r in rows]
    t = table(rows)
    assert t.loc["rm_only_2ep: the reward-hacking probes differ between episode 1 and 2", "holds"] == "no"
    assert t.loc["every trained model answers differently from the SFT model", "holds"] == "no"


def test_missing_numbers_read_not_measured_never_yes():
    rows = [r for r in good_rows() if r["method"] != "ppo" and r["stage"] != "08_reward_hacking"]
    t = table(rows)
    assert t.loc["PPO raises the mean RM score above SFT", "holds"] == "not measured"
    assert t.loc["autorule_uf_2ep: the reward-hacking probes differ between episode 1 and 2", "holds"] == "not measured"
    # only a final checkpoint, nothing at the end of episode 1: not measured rather than SFT vs final
    only_final = [row("rm_only_2ep", "rm_reward", v, s, "08_reward_hacking") for s, v in ((0, 0.0), (8, 1.0))]
    t = table(good_rows()[:5] + only_final)
    assert t.loc["rm_only_2ep: the reward-hacking probes differ between episode 1 and 2", "holds"] == "not measured"


class FakeScorer:
    """RuleScores' interface: two rules, 'Yes' to both for short texts; the second unscored for 'x'."""
    rules = ["r1", "r2"]
    verifier = SimpleNamespace(describe=lambda: {"verifier_id": "fake"})

    def __call__(self, prompts, texts):
        out = []
        for t in texts:
            if t == "x":
                out.append({"fraction": 1.0, "reward": None, "unscored": 1})
            else:
                out.append({"fraction": 1.0 if len(t) < 5 else 0.0, "reward": 0.0, "unscored": 0})
        return out


def test_measure_heldout_rows(tmp_path):
    ctx = SimpleNamespace(name="09_results", run_dir=tmp_path,
                          profile=SimpleNamespace(name="smoke", demonstration=True, hash=lambda: "h"))
    responses = {"sft": [{"prompt_id": "a", "prompt": "p", "text": "long answer", "n_tokens": 10},
                         {"prompt_id": "b", "prompt": "q", "text": "x", "n_tokens": 1}],
                 "rm_only": [{"prompt_id": "a", "prompt": "p", "text": "ok", "n_tokens": 2},
                             {"prompt_id": "b", "prompt": "q", "text": "x", "n_tokens": 1}]}
    rm = lambda prompts, texts: [float(len(t)) for t in texts]  # noqa: E731
    rows = sanity.measure_heldout(ctx, responses, rm, {"uf": FakeScorer()}, {})
    got = {(r["method"], r["metric"]): r["value"] for r in rows}
    assert got[("sft", "mean_tokens")] == 5.5 and got[("rm_only", "rm_score")] == 1.5
    # sft: 'long answer' 0 of 2, 'x' 1 of 1 scored -> 1/3; rm_only: 'ok' 2 of 2, 'x' 1 of 1 -> 3/3
    assert got[("sft", "rule_satisfaction_uf")] == pytest.approx(1 / 3)
    assert got[("rm_only", "rule_satisfaction_uf")] == 1.0
    assert got[("rm_only", "identical_to_sft")] == 0.5 and ("sft", "identical_to_sft") not in got
    (tmp_path / "artifacts" / "09_results").mkdir(parents=True)
    (tmp_path / "artifacts" / "09_results" / "metrics.json").write_text(json.dumps(rows))
    assert sanity.load_rows(RunLayout(tmp_path)) == json.loads(json.dumps(rows))
    assert list(sanity.heldout_table(rows).index) == ["sft", "rm_only"]


def smoke_table(run_dir):
    return sanity.sanity_table(sanity.load_rows(RunLayout(run_dir)), sanity.default_checks(
        METHODS, ["autorule_uf_2ep", "rm_only_2ep"]), episodes={"autorule_uf_2ep": 2, "rm_only_2ep": 2})


@pytest.mark.slow
def test_sanity_table_is_complete_on_the_smoke_run(smoke_book):
    run_dir, _ = smoke_book  # the session's smoke run (or AUTORULE_BOOK_RUN_DIR), finished and built
    t = smoke_table(run_dir)
    written = pd.read_csv(Path(run_dir) / "artifacts" / "09_results" / "sanity_checks.csv", index_col="check")
    assert written["holds"].to_dict() == t["holds"].to_dict()  # the chapter's table, from the same rows
    assert (t["holds"] != "not measured").all(), "\n" + t.to_string()


# Issue 14: with the tiny verifier judging the response (v2, no markdown characters) all 10 checks hold
# on the seeded smoke run; with v1 (judge prompt length) the four AutoRule rule-satisfaction checks did not.
@pytest.mark.slow
def test_sanity_checks_hold_on_the_seeded_smoke_run(smoke_book):
    run_dir, _ = smoke_book
    t = smoke_table(run_dir)
    assert (t["holds"] == "yes").all(), "\n" + t.to_string()
