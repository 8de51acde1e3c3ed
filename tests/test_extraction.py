"""Rule extraction: samples, the three stages, honest accounting, outputs, resume and the CLI."""
import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from autorule_lib.book import cli
from autorule_lib.cache import ResponseCache
from autorule_lib.config import PROJECT_ROOT
from autorule_lib.profiles import load_profile
from autorule_lib.extraction.pipeline import ExtractionError, diff_rule_sets, extract_rules
from autorule_lib.extraction.sampling import Example, sample_mt, sample_uf, serialize_conversation
from autorule_lib.extraction.templates import explain_messages, load_templates, merge_messages, step_of
from autorule_lib.llm.base import LLMCallError, LLMResponse
from loopback_server import LoopbackChatServer, extraction_responder
from conftest import mt_row, uf_row

TEMPLATES = load_templates()


@pytest.fixture(scope="module")
def smoke():
    return load_profile("smoke")


def profile_with(smoke, **extraction):
    import dataclasses
    return dataclasses.replace(smoke, extraction=dataclasses.replace(smoke.extraction, **extraction))


# ---------------------------------------------------------------- samples

def test_uf_sample_is_seeded_without_replacement_and_chosen_is_a():
    rows = [uf_row(prompt=f"q{i}", chosen=f"good {i}", rejected=f"bad {i}") for i in range(20)]
    a, b, c = sample_uf(rows, 8, 42), sample_uf(rows, 8, 42), sample_uf(rows, 8, 7)
    assert [e.example_id for e in a] == [e.example_id for e in b] != [e.example_id for e in c]
    assert len({e.example_id for e in a}) == 8
    for e in a:
        row = rows[e.source["row"]]
        assert e.conversation_a == row["chosen"] and e.conversation_b == row["rejected"] and e.winner == "model_a"
    assert len(sample_uf(rows, 100, 42)) == 20  # all rows when fewer than asked


def test_mt_sample_drops_ties_caps_per_question_and_swaps_consistently():
    rows = [mt_row(question_id=q, winner=w, judge=f"j{i}") for q in (81, 82) for i, w in
            enumerate(["model_a", "model_b", "tie", "model_a", "model_b", "model_a", "tie (inconsistent)"])]
    ex = sample_mt(rows, 3, sample_seed=42, swap_seed=42)
    assert Counter(e.source["question_id"] for e in ex) == {81: 3, 82: 3}
    assert not any(rows[e.source["row"]]["winner"].startswith("tie") for e in ex)
    for e in ex:
        row = rows[e.source["row"]]
        winner_conv = row["conversation_a"] if row["winner"] == "model_a" else row["conversation_b"]
        assert (e.conversation_a if e.winner == "model_a" else e.conversation_b) == winner_conv
        assert e.source["swapped"] == (e.conversation_a == row["conversation_b"])
    swaps = [e.source["swapped"] for e in sample_mt(rows * 20, 200, 42, swap_seed=1)]
    assert 0.35 < sum(swaps) / len(swaps) < 0.65  # p = 0.5
    assert [e.example_id for e in sample_mt(rows, 3, 42, 42, question_ids=[82])] == \
        [e.example_id for e in ex if e.source["question_id"] == 82]


def test_prompts_follow_the_method_contracts():
    ex = Example("x", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                 [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}], "model_b")
    msgs = explain_messages(ex, TEMPLATES)
    assert [m["role"] for m in msgs] == ["user"]  # no system prompt
    text = msgs[0]["content"]
    assert serialize_conversation(ex.conversation_a) == "User: Hi\nAssistant: Hello!"
    assert text.index("User: Hi\nAssistant: Hello!") < text.index("User: Hi\nAssistant: Go away.")
    assert "Assistant A" in text and "Assistant B" in text and "model_b" in text
    merge = merge_messages(["rule one", "rule two"], TEMPLATES)[0]["content"]
    assert "- rule one\n- rule two" in merge
    assert [step_of(m, TEMPLATES) for m in (msgs, merge_messages(["r"], TEMPLATES))] == ["explain", "merge"]
    assert all(t.version for t in TEMPLATES.values())


# ---------------------------------------------------------------- the run, with a scripted client

class ScriptedClient:
    """Answers by stage; markers in the pair's prompt pick a failure mode."""
    provider, model = "scripted", "fake-r1"

    def __init__(self, merge_answer=None):
        self.calls, self.seen = Counter(), []
        self.merge_answer = merge_answer
        if merge_answer is not None:
            self.model = "fake-r1-bad-merge"  # its own cache entries, not the good run's merge answer
        self._lock = threading.Lock()

    def default_params(self):
        return {"temperature": 0.6, "max_tokens": 100}

    def complete(self, messages, **params):
        stage, text = step_of(messages, TEMPLATES), messages[-1]["content"]
        with self._lock:
            self.calls[stage] += 1
            self.seen.append((stage, text))
        if stage == "explain":
            if "FAIL_CALL" in text:
                raise LLMCallError("ThrottlingException", "still throttled", retries=6)
            tag = text.split("Question ")[1].split("\n")[0][:12]
            reasoning = None if "NO_CHAIN" in text else f"CHAIN<{tag}> the winner is concise"
            return LLMResponse(text=f"EXPLANATION<{tag}>", reasoning=reasoning, usage={"input_tokens": 10,
                                                                                      "output_tokens": 20})
        if stage == "extract":
            if "BADRULES" in text:
                return LLMResponse(text="I think the rules are: be concise, be clear.")
            if "FENCED" in text:
                return LLMResponse(text='Here you go:\n```json\n["The assistant\'s responses should be brief."]\n```')
            return LLMResponse(text=json.dumps(["The assistant's responses should be brief.",
                                                "The assistant's responses should be polite."]))
        lines = [line[2:] for line in text.splitlines() if line.startswith("- ")]
        return LLMResponse(text=self.merge_answer if self.merge_answer is not None else json.dumps(lines[:1]))


def uf_rows(*tags):
    return [uf_row(prompt=f"Question {t}", chosen=f"good answer {t}", rejected=f"bad answer {t}") for t in tags]


def run(smoke, tmp_path, rows, client, **extraction):
    profile = profile_with(smoke, uf_num_examples=len(rows), **extraction)
    return extract_rules(profile, "uf", rows, tmp_path / "out", client=client, progress=False)


def test_end_to_end_outputs_and_honest_accounting(smoke, tmp_path):
    rows = uf_rows("ok1 BADRULES", "ok2", "FAIL_CALL", "NO_CHAIN", "ok3 FENCED", "ok4")
    client = ScriptedClient()
    result = run(smoke, tmp_path, rows, client)
    out = tmp_path / "out"
    records = json.loads((out / "explanation_results.json").read_text())
    assert len(records) == 6 and len({r["example_id"] for r in records}) == 6  # every sampled example, once
    by_tag = {r["conversations"]["conversation_a"][0]["content"].split()[1]: r for r in records}
    assert by_tag["FAIL_CALL"]["failure_reason"] == "call_failed:ThrottlingException"
    assert by_tag["NO_CHAIN"]["failure_reason"] == "no_reasoning_chain"
    bad = next(r for t, r in by_tag.items() if t.startswith("ok1"))
    assert bad["status"] == "failed" and bad["failure_reason"] == "parse_failed:no_array"
    assert bad["extract_answer"].startswith("I think")  # the raw answer is kept for inspection
    fenced = next(r for t, r in by_tag.items() if t.startswith("ok3"))
    assert fenced["status"] == "ok" and "code_fence" in fenced["parse_repairs"]
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["explain"]["failed_by_reason"] == {"call_failed:ThrottlingException": 1,
                                                               "no_reasoning_chain": 1}
    assert report["stages"]["explain"]["retries"] == 6
    assert report["stages"]["extract"]["failed_by_reason"] == {"parse_failed:no_array": 1}
    assert report["stages"]["extract"]["repaired"] == 1 and report["examples_ok"] == 3
    assert report["merge"]["candidate_rules"] == 5 and report["merge"]["unique_rules"] == 2
    merged = json.loads((out / "merged_rules.json").read_text())
    assert merged == result.merged_rules == ["The assistant's responses should be brief."]
    rules = json.loads((out / "rules.json").read_text())
    assert rules["rule_set_hash"] == hashlib.sha256(json.dumps(merged).encode()).hexdigest()
    prov = rules["provenance"]
    assert prov["llm"] == {"provider": "scripted", "model": "fake-r1", "demonstration_responses": False}
    assert prov["prompt_templates"]["extract"]["version"] == TEMPLATES["extract"].version
    assert prov["sample"]["seed"] == smoke.extraction.uf_sample_seed and len(prov["source_examples"]) == 6
    with open(out / "explanation_results.tsv", newline="") as f:
        tsv = list(csv.DictReader(f, delimiter="\t"))
    assert len(tsv) == 6 and Counter(r["status"] for r in tsv) == {"ok": 3, "failed": 3}
    # the extract prompt carried the reasoning chain, not the final explanation (paper default)
    extract_prompts = [t for s, t in client.seen if s == "extract"]
    assert all("CHAIN<" in t and "EXPLANATION<" not in t for t in extract_prompts)


def test_explanation_switch_extracts_from_the_final_explanation(smoke, tmp_path):
    client = ScriptedClient()
    run(smoke, tmp_path, uf_rows("a", "b NO_CHAIN"), client, extract_from="explanation")
    extract_prompts = [t for s, t in client.seen if s == "extract"]
    assert len(extract_prompts) == 2 and all("EXPLANATION<" in t and "CHAIN<" not in t for t in extract_prompts)


def test_rerun_of_a_finished_extraction_makes_no_calls(smoke, tmp_path):
    rows = uf_rows("a", "b", "c")
    first = run(smoke, tmp_path, rows, ScriptedClient())
    again = ScriptedClient()
    second = run(smoke, tmp_path, rows, again)
    assert sum(again.calls.values()) == 0
    assert second.merged_rules == first.merged_rules and second.report["stages"]["explain"]["cache_hits"] == 3
    prev = json.loads((tmp_path / "out" / "rules.previous.json").read_text())
    assert diff_rule_sets(prev["rules"], second.merged_rules)["added"] == []


@pytest.mark.parametrize("merge_answer, reason", [("[]", "empty_merge"), ("The merged rules are above.", "no_array")])
def test_empty_or_unparseable_merge_is_an_error_not_an_empty_file(smoke, tmp_path, merge_answer, reason):
    out = tmp_path / "out"
    run(smoke, tmp_path, uf_rows("a"), ScriptedClient())  # a good earlier run leaves a rule set behind
    assert (out / "merged_rules.json").exists()
    with pytest.raises(ExtractionError, match=reason):
        run(smoke, tmp_path, uf_rows("a", "b"), ScriptedClient(merge_answer=merge_answer))
    assert not (out / "merged_rules.json").exists() and not (out / "rules.json").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and reason in report["error"]
    assert len(json.loads((out / "explanation_results.json").read_text())) == 2  # the work is kept


def test_nothing_to_merge_is_an_error(smoke, tmp_path):
    with pytest.raises(ExtractionError, match="no_rules_to_merge"):
        run(smoke, tmp_path, uf_rows("FAIL_CALL", "x BADRULES"), ScriptedClient())


def test_identical_pairs_get_independent_samples(smoke, tmp_path):
    rows = uf_rows("same") * 2
    client = ScriptedClient()
    result = run(smoke, tmp_path, rows, client)
    assert client.calls["explain"] == 2  # sample index 0 and 1, not one cached answer for both
    assert result.report["examples_ok"] == 2


# ---------------------------------------------------------------- CLI and the smoke fixture

def write_source(path, rows, split="train_prefs"):
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_cli_exit_status(tmp_path, capsys):
    src = write_source(tmp_path / "src", uf_rows("a", "b", "c"))
    with LoopbackChatServer(extraction_responder(), max_requests=50) as srv:
        code = cli.main(["extract-rules", "--dataset_type", "uf", "--source", str(src), "--output-dir",
                         str(tmp_path / "ok"), "--llm", "openai", "--base-url", srv.url, "--model", "m",
                         "--uf-num-examples", "3", "--num_proc", "2", "--profile", "smoke"])
    assert code == 0 and json.loads((tmp_path / "ok" / "merged_rules.json").read_text())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    profile = tmp_path / "p.yaml"
    profile.write_text(f"extends: smoke\nextraction: {{replay_file: {empty}}}\n")
    code = cli.main(["extract-rules", "--dataset-type", "uf", "--source", str(src), "--output_dir",
                     str(tmp_path / "bad"), "--llm", "replay", "--profile", str(profile)])
    assert code == 1 and "no rule set" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "merged_rules.json").exists()
    records = json.loads((tmp_path / "bad" / "explanation_results.json").read_text())
    assert {r["failure_reason"] for r in records} == {"call_failed:no_recording"}


def test_smoke_replay_fixture_covers_the_chapter(smoke, tmp_path):
    """The recorded demonstration responses cover every call of the smoke chapter; one answer is
    repaired and one fails, visibly."""
    from autorule_lib.data.preparation import UF_SPLITS, load_source, prepare_mt_bench, prepare_ultrafeedback
    from autorule_lib.smoke.models import build_tiny_tokenizer, tiny_corpus

    tok = build_tiny_tokenizer(tiny_corpus(smoke), smoke.models.tiny, tmp_path / "tok")
    uf = prepare_ultrafeedback(load_source(smoke.data.ultrafeedback_source, UF_SPLITS), tok, smoke.data)
    mt = prepare_mt_bench(load_source(smoke.data.mt_bench_source, ["human"]), smoke.data)
    results = {name: extract_rules(smoke, name, rows, tmp_path / name, split=split, progress=False)
               for name, rows, split in (("uf", uf.processed["train_prefs"], "train_prefs"),
                                         ("mt", mt.sets["mt_train"], "mt_train"))}
    records = [r for res in results.values() for r in res.records]
    assert all(r["demonstration"] for r in records)
    assert len(records) == smoke.extraction.uf_num_examples + len(mt.sets["mt_train_sample"])
    reasons = Counter(r["failure_reason"] for r in records if r["status"] != "ok")
    assert sum(reasons.values()) == 1 and next(iter(reasons)).startswith("parse_failed:")
    assert any(r["parse_repairs"] for r in records)
    for res in results.values():
        assert res.merged_rules and len(res.merged_rules) < len(res.unique_rules)


def test_uf_sample_is_drawn_from_unfiltered_train_prefs_by_default(smoke, tmp_path):
    """The original samples its 256 pairs before the length/quality filter: the smoke sample holds pairs
    the filter drops; the chapter and the CLI read the same pool, and 'filtered' is a switch."""
    import dataclasses

    from autorule_lib.data.preparation import UF_SPLITS, filter_reasons, load_source, prepare_ultrafeedback
    from autorule_lib.extraction.sampling import build_examples, uf_sample_pool
    from autorule_lib.extraction.pipeline import extract_rules_from_source
    from autorule_lib.smoke.models import build_tiny_tokenizer, tiny_corpus

    assert smoke.extraction.uf_sample_pool == "unfiltered"
    assert uf_sample_pool(smoke, tmp_path / "uf") == (str(tmp_path / "uf" / "processed"), "train_prefs")
    tok = build_tiny_tokenizer(tiny_corpus(smoke), smoke.models.tiny, tmp_path / "tok")
    uf = prepare_ultrafeedback(load_source(smoke.data.ultrafeedback_source, UF_SPLITS), tok, smoke.data)
    pool = uf.processed["train_prefs"]
    examples, _ = build_examples(smoke, "uf", pool, split="train_prefs")
    drawn = [pool[int(e.example_id.rsplit("/", 1)[1])] for e in examples]
    assert any(reasons is not None for reasons in filter_reasons(drawn, tok, smoke.data.max_tokens))
    filtered = dataclasses.replace(smoke, extraction=dataclasses.replace(smoke.extraction, uf_sample_pool="filtered"))
    assert uf_sample_pool(filtered, tmp_path / "uf")[1] == "rm_train"
    with pytest.raises(ExtractionError, match="uf_sample_pool"):
        extract_rules_from_source(filtered, "uf", str(tmp_path), tmp_path / "out")


def test_extraction_prompts_carry_the_originals_content():
    t = load_templates()
    extract = t["extract"].render(source_text="REASONING", winner_letter="A")
    assert extract.rstrip().endswith("REASONING\n[End of the reasoning]")  # the reasoning comes last
    examples = [x for x in extract.splitlines() if x.startswith("- The assistant's responses should")]
    assert len(examples) == 3 and "assumptions" in examples[0] and "already provided" in examples[1]
    assert "structure" in examples[2] and not any(w in " ".join(examples) for w in ("concise", "brief", "short"))
    assert "without a code block" in extract
    merge = t["merge"].render(rules="- r1\n- r2")
    assert "The assistant's responses should ..." not in merge and "form" not in merge  # no imposed phrasing


# ---------------------------------------------------------------- crash and resume

def test_sigkill_midway_then_rerun_loses_nothing_and_repeats_no_finished_call(tmp_path):
    n = 10
    src = write_source(tmp_path / "src", uf_rows(*[f"k{i}" for i in range(n)]))
    out = tmp_path / "out"
    with LoopbackChatServer(extraction_responder(), latency_s=0.15, max_requests=200, lifetime_s=120) as srv:
        cmd = [sys.executable, "-m", "autorule_lib.book.cli", "extract-rules", "--dataset_type", "uf", "--source",
               str(src), "--output_dir", str(out), "--llm", "openai", "--base-url", srv.url, "--model", "m",
               "--uf_num_examples", str(n), "--num_proc", "2", "--profile", "smoke"]
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while srv.hits < 8 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        first_hits = srv.hits
        finished = len(ResponseCache(out / "llm_cache.sqlite"))  # answers stored before the kill
        assert 0 < finished < 2 * n + 1 and not (out / "merged_rules.json").exists()

        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        second_hits = srv.hits - first_hits
        bodies = Counter(json.dumps(b, sort_keys=True) for b in srv.requests)

    total_calls = 2 * n + 1  # explain + extract per example, one merge
    assert len(bodies) == total_calls  # every call made at least once
    assert second_hits == total_calls - finished  # only what was not finished was asked again
    assert sum(bodies.values()) - total_calls <= 2  # repeats only for calls in flight at the kill (num_proc)
    records = json.loads((out / "explanation_results.json").read_text())
    assert len(records) == n and len({r["example_id"] for r in records}) == n
    assert all(r["status"] == "ok" for r in records)
    assert json.loads((out / "merged_rules.json").read_text())
