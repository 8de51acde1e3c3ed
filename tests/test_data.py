import json

import pytest

from autorule_lib.config import DataConfig
from autorule_lib.data.preparation import SchemaError, filter_reasons, load_source, prepare_mt_bench, prepare_ultrafeedback, sample_per_question, split_questions, add_content_columns, save_sets
from conftest import mt_row, uf_row


def splits_with(train_prefs):
    return {"train_prefs": train_prefs, "test_prefs": [uf_row()], "train_sft": [uf_row()], "test_sft": [uf_row()]}


def reasons(rows, tok, max_tokens=512):
    return filter_reasons([add_content_columns(r) for r in rows], tok, max_tokens)


def test_filter_each_reason_and_first_reason_wins(word_tokenizer):
    rows = [
        uf_row(),
        uf_row(chosen="word " * 600),
        uf_row(prompt="long " * 600),
        uf_row(rejected="x " * 600),
        uf_row(score_chosen=5.0, score_rejected=5.0),
        uf_row(score_chosen=4.0, score_rejected=5.0),
        uf_row(chosen="Paris. Confidence: 90%"),
        uf_row(rejected="I have high CONFIDENCE in this."),
        uf_row(chosen="word " * 600, score_chosen=5.0, score_rejected=5.0),  # long and tied -> too_long
        uf_row(chosen="confident and sure"),  # 'confident' is not the word 'confidence'
    ]
    assert reasons(rows, word_tokenizer) == [None, "too_long", "too_long", "too_long", "score_not_higher",
                                             "score_not_higher", "contains_confidence", "contains_confidence",
                                             "too_long", None]


def test_length_limit_counts_bos_and_is_strict(word_tokenizer):
    # 510 words + BOS = 511 tokens < 512 kept; 511 words + BOS = 512 dropped
    assert reasons([uf_row(chosen="w " * 510), uf_row(chosen="w " * 511)], word_tokenizer) == [None, "too_long"]


def test_prepare_ultrafeedback_report_and_sets(word_tokenizer):
    train = [uf_row(prompt=f"q{i}") for i in range(3)] + [uf_row(prompt="t", score_chosen=1.0, score_rejected=2.0)]
    test = [uf_row(prompt=f"test {i}") for i in range(5)] + [uf_row(prompt="c", chosen="Confidence: 80%")]
    src = {"train_prefs": train, "test_prefs": test, "train_sft": [uf_row()], "test_sft": [uf_row()]}
    out = prepare_ultrafeedback(src, word_tokenizer, DataConfig(uf_test_size=3))
    assert out.report["train_prefs"].dropped == {"malformed": 0, "too_long": 0, "score_not_higher": 1,
                                                 "contains_confidence": 0}
    assert out.report["test_prefs"].rows_in == 6 and out.report["test_prefs"].rows_kept == 5
    assert [r["prompt"] for r in out.sets["uf_test"]] == ["test 0", "test 1", "test 2"]  # stored order, first N
    assert out.sets["rl_prompts"][0] == {"prompt": "q0", "prompt_id": train[0]["prompt_id"]}
    row = out.sets["rm_train"][0]
    assert row["chosen_content"] == "It is 4." and row["rejected_content"] == "It is 5." and row["response"] == "It is 4."
    assert set(row) >= {"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"}
    assert len(out.processed["train_prefs"]) == 4  # the pushed/processed data is unfiltered


def test_training_filter_can_be_switched_off_but_test_set_is_always_filtered(word_tokenizer):
    src = splits_with([uf_row(), uf_row(prompt="tie", score_chosen=3.0, score_rejected=3.0)])
    src["test_prefs"].append(uf_row(prompt="tie2", score_chosen=3.0, score_rejected=3.0))
    out = prepare_ultrafeedback(src, word_tokenizer, DataConfig(filter_training_data=False))
    assert len(out.sets["rm_train"]) == 2 and len(out.sets["uf_test"]) == 1


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.pop("score_rejected"), "score_rejected"),
    (lambda r: r["chosen"].reverse(), "chosen[0].role"),
    (lambda r: r["rejected"][1].update(content=None), "rejected[1]"),
    (lambda r: r.update(prompt=5), "prompt"),
    (lambda r: r.update(messages=[r["messages"][0]]), "messages"),
    (lambda r: r.update(score_chosen="high"), "score_chosen"),
])
def test_malformed_row_names_split_row_and_field(word_tokenizer, mutate, field):
    rows = [uf_row(), uf_row(prompt="bad")]
    mutate(rows[1])
    with pytest.raises(SchemaError) as e:
        prepare_ultrafeedback(splits_with(rows), word_tokenizer, DataConfig())
    assert (e.value.split, e.value.index, e.value.field) == ("train_prefs", 1, field)
    assert "train_prefs" in str(e.value) and "row 1" in str(e.value) and field in str(e.value)


def test_empty_prompt_or_response_is_data_not_a_schema_error(word_tokenizer):
    """The original's filter passes rows whose prompt or response is empty (real UltraFeedback has some)."""
    empty_prompt = uf_row(prompt="")
    empty_response = uf_row(prompt="Say nothing.", chosen="")
    empty_response["messages"][1]["content"] = ""
    out = prepare_ultrafeedback(splits_with([uf_row(), empty_prompt, empty_response]), word_tokenizer, DataConfig())
    rep = out.report["train_prefs"]
    assert rep.dropped["malformed"] == 0 and rep.rows_kept == 3
    assert {r["prompt"] for r in out.sets["rm_train"]} == {"What is 2+2?", "", "Say nothing."}
    assert [r["chosen_content"] for r in out.processed["train_prefs"]][2] == ""


def test_malformed_rows_can_be_skipped_and_counted(word_tokenizer):
    rows = [uf_row(), uf_row(prompt="bad")]
    rows[1]["chosen"].reverse()
    out = prepare_ultrafeedback(splits_with(rows), word_tokenizer, DataConfig(skip_bad_rows=True))
    assert out.report["train_prefs"].dropped["malformed"] == 1 and out.report["train_prefs"].rows_kept == 1
    assert "chosen[0].role" in out.report["train_prefs"].malformed_examples[0]


def test_mt_question_splits():
    ids = range(81, 161)
    train, held = split_questions(ids, "intended")
    assert len(train) == len(held) == 40
    assert train[:6] == [81, 82, 83, 84, 85, 91] and held[:6] == [86, 87, 88, 89, 90, 96]
    train, held = split_questions(ids, "original")
    assert train == [81, 91, 101, 111, 121, 131, 141, 151]
    assert held == [86, 96, 106, 116, 126, 136, 146, 156]
    with pytest.raises(ValueError, match="mt_split"):
        split_questions(ids, "other")


def test_mt_ties_dropped_and_sampling():
    rows = [mt_row(81, judge=f"j{i}") for i in range(10)] + [mt_row(82), mt_row(82, winner="tie"),
                                                             mt_row(86, winner="model_b", turn=2),
                                                             mt_row(86, winner="tie (inconsistent)")]
    out = prepare_mt_bench({"human": rows}, DataConfig(mt_samples_per_question=8, mt_sample_seed=42))
    rep = out.report["human"]
    assert rep.dropped == {"tie": 2, "malformed": 0} and rep.rows_kept == 12
    assert len(out.sets["mt_train"]) == 11 and [r["question_id"] for r in out.sets["mt_heldout"]] == [86]
    sample = out.sets["mt_train_sample"]
    q81 = [r["judge"] for r in sample if r["question_id"] == 81]
    assert len(q81) == 8 and len(set(q81)) == 8  # without replacement
    assert [r["question_id"] for r in sample].count(82) == 1  # all rows when fewer than k
    again = prepare_mt_bench({"human": rows}, DataConfig(mt_samples_per_question=8, mt_sample_seed=42))
    assert [r["judge"] for r in again.sets["mt_train_sample"]] == [r["judge"] for r in sample]
    other = sample_per_question(out.sets["mt_train"], 8, seed=7)
    assert [r["judge"] for r in other if r["question_id"] == 81] != q81


def test_mt_malformed_rows():
    bad = mt_row(81, turn=2)
    bad["conversation_b"] = bad["conversation_b"][:2]  # a turn-2 judgment needs both turns
    with pytest.raises(SchemaError) as e:
        prepare_mt_bench({"human": [mt_row(), bad]}, DataConfig())
    assert (e.value.index, e.value.field) == (1, "conversation_b")
    weird = mt_row(81, winner="model_c")
    out = prepare_mt_bench({"human": [mt_row(), weird]}, DataConfig(skip_bad_rows=True))
    assert out.report["human"].dropped["malformed"] == 1


def test_sources_jsonl_parquet_and_save_to_disk_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"train_prefs": [uf_row(), uf_row(prompt="b")], "test_prefs": [uf_row(prompt="c")]}
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "pq").mkdir()
    for split, rs in rows.items():
        (tmp_path / "jsonl" / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rs) + "\n")
        pq.write_table(pa.Table.from_pylist(rs), tmp_path / "pq" / f"{split}.parquet")
    save_sets(rows, tmp_path / "disk")
    loaded = [load_source(str(tmp_path / d), ["train_prefs", "test_prefs"]) for d in ("jsonl", "pq", "disk")]
    assert loaded[0] == rows and loaded[1] == rows and loaded[2] == rows
    with pytest.raises(FileNotFoundError, match=r"missing split\(s\) \['train_sft'\]"):
        load_source(str(tmp_path / "jsonl"), ["train_sft"])


def test_bad_json_line_is_located(tmp_path):
    (tmp_path / "human.jsonl").write_text(json.dumps(mt_row()) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"human.jsonl:2: not valid JSON"):
        load_source(str(tmp_path), ["human"])
