import pytest

from autorule_lib.extraction.parsing import parse_rule_list

R1 = "The assistant's responses should be concise."
R2 = "The assistant's responses should cite sources."


def test_bare_array_and_empty_array():
    p = parse_rule_list(f'["{R1}", "{R2}"]')
    assert p.ok and p.rules == [R1, R2] and p.repairs == []
    empty = parse_rule_list("  [] \n")
    assert empty.ok and empty.rules == []  # an explicit empty answer is legitimate, not a failure


@pytest.mark.parametrize("answer, repair", [
    (f'```json\n["{R1}", "{R2}"]\n```', "code_fence"),
    (f'Here are the rules I found:\n```json\n["{R1}", "{R2}"]\n```\nLet me know if you need more.',
     "prose_around_array"),
    (f'Sure. The rules are ["{R1}", "{R2}"] as requested.', "prose_around_array"),
    (f'<think>the user wants rules, maybe [1, 2]</think>["{R1}", "{R2}"]', "removed_think_block"),
    (f'{{"rules": ["{R1}", "{R2}"]}}', "unwrapped_object"),
    (f'[{{"rule": "{R1}"}}, "{R2}"]', "unwrapped_1_object_items"),
    (f'See [1] below. Answer: ["{R1}", "{R2}"]', "prose_around_array"),
])
def test_unambiguous_deviations_are_repaired_and_named(answer, repair):
    p = parse_rule_list(answer)
    assert p.ok, p.error
    assert p.rules == [R1, R2]
    assert repair in p.repairs


def test_truncated_array_keeps_complete_items_and_says_so():
    p = parse_rule_list(f'["{R1}", "{R2}", "The assistant\'s responses should avo')
    assert p.ok and p.rules == [R1, R2]
    assert p.repairs == ["truncated_array_dropped_partial_item"]
    p = parse_rule_list(f'```json\n["{R1}",')  # cut after a complete item, inside an unclosed fence
    assert p.ok and p.rules == [R1] and p.repairs == ["truncated_array"]


@pytest.mark.parametrize("answer, reason", [
    ("", "empty_answer"),
    (None, "empty_answer"),
    ("I could not find any rules in this reasoning.", "no_array"),
    ('"The assistant should be concise."', "not_a_list"),
    ('{"a": ["x"], "b": ["y"]}', "not_a_list"),
    (f'["{R1}", 42]', "non_string_items"),
    (f'["{R1}", ["nested"]]', "non_string_items"),
    (f'First draft: ["{R1}"]. Final answer: ["{R2}"]', "ambiguous"),
    (f"['{R1[:20]}', 'single quotes']", "not_json"),  # Python literal: we never eval
    ('["The assistant\'s responses should', "truncated"),
])
def test_unreadable_answers_fail_with_a_reason(answer, reason):
    p = parse_rule_list(answer)
    assert not p.ok and p.rules is None
    assert p.error == reason


def test_blank_items_are_dropped_visibly_and_items_stripped():
    p = parse_rule_list(f'["  {R1}  ", "", "   "]')
    assert p.rules == [R1] and "dropped_2_blank_items" in p.repairs


def test_identical_arrays_in_two_fences_are_not_ambiguous():
    p = parse_rule_list(f'```\n["{R1}"]\n```\nAgain:\n```json\n["{R1}"]\n```')
    assert p.ok and p.rules == [R1]
    q = parse_rule_list(f'```\n["{R1}"]\n```\n```\n["{R2}"]\n```')
    assert not q.ok and q.error == "ambiguous"
