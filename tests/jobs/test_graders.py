"""The pure parts of evals: templates, graders, label matching. No Redis, no engine."""

from __future__ import annotations

import json

import pytest

from jobs.eval_templates import (
    TemplateError,
    references,
    render,
    render_message,
    schema_allows,
)
from jobs.graders import (
    JUDGE_MAX_TOKENS,
    SIMILARITY_METRICS,
    grade_label,
    grade_score,
    grade_text,
    judge_request,
    match_label,
    read_score,
    string_check,
    text_similarity,
)

CONTEXT = {"item": {"q": "2+2?", "answer": "4", "meta": {"lang": "en", "tags": ["math", "easy"]},
                    "n": 3, "ok": True, "nothing": None},
           "sample": {"output_text": "The answer is 4."}}


# -- templates -----------------------------------------------------------------------------

@pytest.mark.parametrize(("template", "expected"), [
    ("{{item.q}}", "2+2?"),
    ("Q: {{ item.q }} A: {{sample.output_text}}", "Q: 2+2? A: The answer is 4."),
    ("{{item.meta.lang}}/{{item.meta.tags.1}}", "en/easy"),
    ("{{item.n}} {{item.ok}} [{{item.nothing}}]", "3 true []"),
    ("{{item.meta.tags}}", '["math", "easy"]'),
    ("no placeholders {single} braces", "no placeholders {single} braces"),
])
def test_render(template, expected):
    assert render(template, CONTEXT) == expected


@pytest.mark.parametrize("template", [
    "{{item.missing}}", "{{item.meta.tags.7}}", "{{item.q.deeper}}", "{{sample.output_json}}",
    # Only dict keys and list indexes are looked up: Python attributes are just missing keys.
    "{{item.__class__}}", "{{item.q.__len__}}",
])
def test_render_refuses_what_the_data_lacks(template):
    with pytest.raises(TemplateError, match="missing"):
        render(template, CONTEXT)


@pytest.mark.parametrize("template", [
    "{{ item.q | upper }}", "{{ config }}", "{{ item['q'] }}", "{{ item.q + 1 }}",
    "{{ ''.__class__ }}", "{{}}",
])
def test_expressions_are_not_templates(template):
    with pytest.raises(TemplateError, match="not supported"):
        list(references(template))


def test_references_lists_each_path():
    assert list(references("{{item.a.b}} and {{ sample.output_text }}")) == [
        ("item", "a", "b"), ("sample", "output_text")]


SCHEMA = {"type": "object",
          "properties": {"q": {"type": "string"},
                         "meta": {"type": "object", "properties": {"lang": {"type": "string"}}},
                         "tags": {"type": "array", "items": {"type": "string"}},
                         "free": {"type": "object"},
                         "extra": {"type": "object", "properties": {},
                                   "additionalProperties": {"type": "string"}}},
          "required": ["q"]}


@pytest.mark.parametrize(("path", "allowed"), [
    (("q",), True), (("meta", "lang"), True), (("tags", "0"), True), (("free", "any", "x"), True),
    (("extra", "whatever"), True), ((), True),
    (("qq",), False), (("meta", "langg"), False), (("q", "deeper"), False),
    (("tags", "first"), False),
])
def test_schema_allows(path, allowed):
    assert schema_allows(SCHEMA, path) is allowed


def test_messages_render_to_chat_messages():
    assert render_message({"role": "developer", "content": "Be brief about {{item.q}}"},
                          CONTEXT) == {"role": "system", "content": "Be brief about 2+2?"}
    parts = {"role": "user", "type": "message",
             "content": [{"type": "input_text", "text": "{{item.q}}"},
                         {"type": "input_image", "image_url": "http://x/{{item.answer}}.png"}]}
    assert render_message(parts, CONTEXT) == {"role": "user", "content": [
        {"type": "text", "text": "2+2?"},
        {"type": "image_url", "image_url": {"url": "http://x/4.png"}}]}


# -- string_check --------------------------------------------------------------------------

@pytest.mark.parametrize(("operation", "text", "reference", "passed"), [
    ("eq", "Paris", "Paris", True), ("eq", "Paris", "paris", False),
    ("ne", "Paris", "London", True), ("ne", "Paris", "Paris", False),
    ("like", "It is Paris.", "Paris", True), ("like", "It is paris.", "Paris", False),
    ("ilike", "It is PARIS.", "paris", True), ("ilike", "It is Rome.", "paris", False),
])
def test_string_check(operation, text, reference, passed):
    assert string_check(operation, text, reference) is passed


def test_string_check_criterion_renders_both_sides():
    criterion = {"type": "string_check", "name": "has 4", "operation": "like",
                 "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}
    result = grade_text(criterion, CONTEXT)
    assert (result.passed, result.score, result.public()["type"]) == (True, 1.0,
                                                                       "string-check-grader")
    result = grade_text({**criterion, "operation": "eq"}, CONTEXT)
    assert (result.passed, result.score) == (False, 0.0)


# -- text_similarity -----------------------------------------------------------------------

@pytest.mark.parametrize("metric", SIMILARITY_METRICS)
def test_identical_texts_score_one_and_unrelated_ones_low(metric):
    text = "the quick brown fox jumps over the lazy dog"
    assert text_similarity(metric, text, text) == pytest.approx(1.0)
    unrelated = text_similarity(metric, "completely different words here", text)
    assert 0.0 <= unrelated < 0.5


@pytest.mark.parametrize(("metric", "text", "reference", "expected"), [
    ("fuzzy_match", "hello wrld", "hello world", 20 / 21),
    ("rouge_1", "the quick fox", "the quick brown fox", 6 / 7),
    ("rouge_2", "the quick fox", "the quick brown fox", 0.4),
    ("rouge_l", "the quick fox", "the quick brown fox", 6 / 7),
    ("gleu", "the quick fox", "the quick brown fox", 0.4),
])
def test_known_similarity_values(metric, text, reference, expected):
    assert text_similarity(metric, text, reference) == pytest.approx(expected, abs=1e-6)


def test_bleu_rewards_overlap_in_order():
    reference = "the cat sat on the mat today"
    close = text_similarity("bleu", "the cat sat on the mat", reference)
    shuffled = text_similarity("bleu", "mat the on sat cat the", reference)
    assert 0.5 < close < 1.0 and shuffled < close


def test_pass_threshold_is_inclusive():
    criterion = {"type": "text_similarity", "name": "close", "evaluation_metric": "rouge_1",
                 "input": "the quick fox", "reference": "the quick brown fox",
                 "pass_threshold": 6 / 7}
    assert grade_text(criterion, CONTEXT).passed
    assert not grade_text({**criterion, "pass_threshold": 0.9}, CONTEXT).passed


def test_unknown_metric_is_an_error():
    with pytest.raises(ValueError, match="cosine"):
        text_similarity("cosine", "a", "b")


# -- label_model ---------------------------------------------------------------------------

LABELS = ["relevant", "not relevant", "unsure"]


@pytest.mark.parametrize(("answer", "label"), [
    ('{"label": "unsure"}', "unsure"),
    ("Relevant.", "relevant"),
    ('  "not relevant"  ', "not relevant"),
    ("I think this is not relevant, because...", "not relevant"),
    ("relevant? maybe unsure", "relevant"),
    ("UNSURE", "unsure"),
    ("irrelevant", None),        # whole words only
    ("", None),
    ('{"label": "great"}', None),
])
def test_match_label(answer, label):
    assert match_label(answer, LABELS) == label


def test_grade_label_passes_on_passing_labels_only():
    criterion = {"type": "label_model", "name": "judge", "model": "m", "labels": LABELS,
                 "passing_labels": ["relevant"], "input": []}
    assert grade_label(criterion, "relevant").passed
    failed = grade_label(criterion, "not relevant")
    assert (failed.passed, failed.score, failed.sample["label"]) == (False, 0.0, "not relevant")
    nothing = grade_label(criterion, "no idea", {"model": "m"})
    assert not nothing.passed and nothing.sample == {"model": "m", "label": None}
    assert nothing.error is None  # judged, not broken


def test_judge_request_renders_the_prompt_and_asks_for_a_label():
    criterion = {"type": "label_model", "name": "judge", "model": "sim/judge",
                 "labels": LABELS, "passing_labels": ["relevant"],
                 "input": [{"role": "system", "content": "Label it."},
                           {"role": "user", "content": "Q: {{item.q}} A: {{sample.output_text}}"}]}
    body = judge_request(criterion, CONTEXT)
    assert body["model"] == "sim/judge" and body["max_tokens"] == JUDGE_MAX_TOKENS
    assert body["messages"][1] == {"role": "user", "content": "Q: 2+2? A: The answer is 4."}
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["label"]["enum"] == LABELS
    tuned = judge_request({**criterion, "sampling_params": {"max_completion_tokens": 1,
                                                            "seed": 7}}, CONTEXT)
    assert (tuned["max_tokens"], tuned["seed"], tuned["temperature"]) == (1, 7, 0)
    json.dumps(body)  # sent as JSON as it is


def test_messages_from_the_data_are_not_templates():
    # item_reference messages come from the dataset: braces in them are text, not placeholders.
    from jobs.eval_templates import render_messages

    messages = [{"role": "user", "content": "literal {{item.q}}"},
                {"role": "developer", "content": [{"type": "text", "text": "chat part"}]}]
    assert render_messages(messages, None) == [
        {"role": "user", "content": "literal {{item.q}}"},
        {"role": "system", "content": "chat part"}]


@pytest.mark.parametrize(("answer", "score"), [
    ('{"score": 7.5}', 7.5), ("8", 8.0), ("I would say 6 out of 10.", 6.0),
    ("no number here", None), ('{"score": "high"}', None),
])
def test_read_score(answer, score):
    assert read_score(answer) == score


def test_grade_score_holds_the_range_and_passes_at_the_threshold():
    criterion = {"type": "score_model", "name": "s", "range": [1, 10], "pass_threshold": 6}
    assert grade_score(criterion, '{"score": 7}').passed
    low = grade_score(criterion, '{"score": 5.9}')
    assert (low.score, low.passed) == (5.9, False)
    high = grade_score(criterion, "42")
    assert (high.score, high.passed, high.sample["score"]) == (10.0, True, 42.0)
    none = grade_score(criterion, "cannot say")
    assert (none.score, none.passed, none.sample["score"]) == (1.0, False, None)
    # No threshold: the middle of the range.
    assert grade_score({"name": "s", "range": [0, 1]}, "0.5").passed
    assert not grade_score({"name": "s"}, "0.49").passed


def test_score_judge_asks_for_a_number_in_the_range():
    criterion = {"type": "score_model", "name": "s", "model": "m", "range": [1, 10],
                 "input": [{"role": "user", "content": "{{item.q}}"}]}
    body = judge_request(criterion, {"item": {"q": "how good?"}, "sample": {}})
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["score"] == {"type": "number", "minimum": 1.0, "maximum": 10.0}
    assert body["messages"] == [{"role": "user", "content": "how good?"}]
