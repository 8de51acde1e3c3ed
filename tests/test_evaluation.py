"""Generation cache, the likelihood judge on a tiny model, checkpoint discovery, results and relative gains."""
import json
import math
import os

import pandas as pd
import pytest

from autorule_lib.train.resume import checkpoints, tokenizer_folder
from autorule_lib.config import TinyModelConfig
from autorule_lib.evaluate.results import PAPER_RELATIVE_GAINS, relative_gains, results_table
from autorule_lib.text_format import policy_prompt
from autorule_lib.smoke.models import build_tiny_llama, build_tiny_tokenizer

CFG = TinyModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, seed=5)
CORPUS = [f"Question {i}: name a colour. Answer: blue number {i}." for i in range(100)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok = build_tiny_tokenizer(CORPUS, CFG, d / "tok")
    build_tiny_llama(tok, CFG, d / "model")
    return d / "model"


def test_generation_is_cached_per_checkpoint_prompt_and_settings(tiny, tmp_path):
    from autorule_lib.cache import ResponseCache
    from autorule_lib.evaluate.generation import GenerationSettings, generate
    from autorule_lib.models import model_id as checkpoint_id

    cache = ResponseCache(tmp_path / "c.sqlite")
    prompts = [policy_prompt("Name a colour."), policy_prompt("Question 3")]
    s = GenerationSettings(temperature=0.9, top_p=1.0, max_new_tokens=6, batch_size=2, seed=1)
    first = generate(tiny, prompts, s, cache)
    assert [r["cached"] for r in first] == [False, False] and all(r["n_tokens"] <= 6 for r in first)
    again = generate(tiny, prompts, GenerationSettings(0.9, 1.0, 6, batch_size=1, seed=1), cache)
    assert [r["cached"] for r in again] == [True, True] and [r["text"] for r in again] == [r["text"] for r in first]
    greedy = generate(tiny, prompts[:1], GenerationSettings(0.0, 1.0, 6, 2, 1), cache)
    assert greedy[0]["cached"] is False  # other settings, other key
    before = checkpoint_id(tiny)
    weights = next(tiny.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert checkpoint_id(tiny) != before  # a retrained checkpoint is never served stale responses
    assert generate(tiny, prompts[:1], s, cache)[0]["cached"] is False


def test_likelihood_judge_scores_whole_answers(tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autorule_lib.evaluate.judge import LikelihoodJudge

    judge = LikelihoodJudge(str(tiny))
    messages = [{"role": "user", "content": "Which is better, A or B?"}]
    candidates = ["A", "B is better", "Rating: [[10]]"]
    scores = judge.score(messages, candidates)
    assert len(scores) == 3 and all(math.isfinite(x) and x < 0 for x in scores)
    reply = judge.choose(messages, candidates)
    assert reply.text == candidates[scores.index(max(scores))] and reply.scores == scores

    tok, model = AutoTokenizer.from_pretrained(tiny), AutoModelForCausalLM.from_pretrained(tiny)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    cand = tok("B is better", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + cand])).logits[0].float(), -1)
    manual = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cand))
    assert scores[1] == pytest.approx(manual, abs=1e-4)


def test_likelihood_mode_refuses_api_judges(tmp_path):
    from autorule_lib.profiles import load_profile
    from autorule_lib.evaluate.judge import make_judge

    prof = load_profile("paper")
    prof.evaluation.judge_mode = "likelihood"
    with pytest.raises(ValueError, match="local judge"):
        make_judge(prof, tmp_path, None)


def test_checkpoints_in_step_order_with_final_last(tmp_path):
    run = tmp_path / "rm_only_2ep"
    for name in ("checkpoint-10", "checkpoint-2", "final", "checkpoint-x"):
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")
    (run / "final" / "tokenizer_config.json").write_text("{}")
    assert [(s, p.name) for s, p in checkpoints(run)] == [(2, "checkpoint-2"), (10, "checkpoint-10"), (11, "final")]
    (run / "done.json").write_text(json.dumps({"global_step": 10}))  # final is the last checkpoint's weights
    assert [(s, p.name) for s, p in checkpoints(run)] == [(2, "checkpoint-2"), (10, "final")]
    assert tokenizer_folder(run / "checkpoint-2") == run / "final"


def row(method, metric, value, ci=(None, None), unit="%"):
    return {"method": method, "metric": metric, "value": value, "ci_low": ci[0], "ci_high": ci[1], "unit": unit,
            "step": None, "n": 10, "run": "r", "checkpoint": "c", "checkpoint_id": "i", "judge": "j",
            "profile_hash": "h", "note": ""}


def test_relative_gains_beside_the_papers():
    rows = [row("rm_only", "alpaca_lc_win_rate", 20.0), row("autorule_uf", "alpaca_lc_win_rate", 25.0),
            row("rm_only", "mt_bench_turn_2", 0.0, unit="score"), row("autorule_uf", "mt_bench_turn_2", 5.0, unit="")]
    g = relative_gains(rows)
    assert sorted(g["paper gain (%)"].unique()) == [6.1, 28.6] == sorted(x["paper_gain_pct"] for x in PAPER_RELATIVE_GAINS)
    uf_lc = g[(g["comparison"] == "autorule_uf vs rm_only") & (g["metric"] == "AlpacaEval 2.0 LC (%)")].iloc[0]
    assert uf_lc["our gain (%)"] == 25.0
    mt_lc = g[(g["comparison"] == "autorule_mt vs rm_only") & (g["metric"] == "AlpacaEval 2.0 LC (%)")].iloc[0]
    assert pd.isna(mt_lc["our gain (%)"]) and "not measured" in mt_lc["note"]
    mt2 = g[(g["comparison"] == "autorule_uf vs rm_only") & (g["metric"] == "MT-Bench turn 2")].iloc[0]
    assert pd.isna(mt2["our gain (%)"]) and "undefined" in mt2["note"]


def test_results_table_marks_what_was_not_measured():
    rows = [row("sft", "mt_bench_turn_1", 6.25, (5.0, 7.5), unit="score"),
            row("autorule_uf", "uf_win_rate", 61.234, (50.0, 70.0))]
    t = results_table(rows, ["sft", "autorule_uf", "ppo"])
    assert t.loc["autorule_uf", "UF win rate (%)"] == "61.2 [50.0, 70.0]"
    assert t.loc["sft", "MT-Bench turn 1"] == "6.25 [5.00, 7.50]"
    assert t.loc["ppo", "UF win rate (%)"] == "not measured"


def test_unmeasured_does_not_count_the_reference_side():
    from autorule_lib.evaluate.results import REFERENCE_NOTE, unmeasured

    ref = {**row("sft", "uf_win_rate", None), "note": REFERENCE_NOTE}
    out = unmeasured([ref, row("sft", "mt_bench_turn_1", 5.0, unit="")], ["sft"])
    assert "UF win rate (%)" not in out["sft"] and "MT-Bench turn 2" in out["sft"]
