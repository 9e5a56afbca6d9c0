"""Eval definitions and run data sources are refused with the field named, before anything runs."""

from __future__ import annotations

import copy

import pytest

from jobs.eval_definitions import (
    DefinitionError,
    item_checker,
    parse_eval,
    parse_run,
    split_row,
)

MODELS = {"sim/fast", "sim/judge"}
ITEM_SCHEMA = {"type": "object", "required": ["question", "answer"],
               "properties": {"question": {"type": "string"}, "answer": {"type": "string"},
                              "meta": {"type": "object",
                                       "properties": {"lang": {"type": "string"}}}}}
GOOD = {
    "name": "qa",
    "data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA,
                           "include_sample_schema": True},
    "testing_criteria": [
        {"type": "string_check", "name": "exact", "operation": "eq",
         "input": "{{sample.output_text}}", "reference": "{{item.answer}}"},
        {"type": "text_similarity", "name": "close", "evaluation_metric": "rouge_l",
         "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
         "pass_threshold": 0.5},
        {"type": "label_model", "name": "judge", "model": "sim/judge",
         "input": [{"role": "user", "content": "{{item.meta.lang}}: {{sample.output_text}}"}],
         "labels": ["good", "bad"], "passing_labels": ["good"]},
    ],
}


def _with(path: str, value):
    body = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = body
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is _DELETE:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return body


_DELETE = object()


def test_a_good_definition_is_accepted():
    parsed = parse_eval(GOOD, MODELS)
    assert parsed["name"] == "qa" and parsed["include_sample_schema"] is True
    assert [c["type"] for c in parsed["testing_criteria"]] == [
        "string_check", "text_similarity", "label_model"]


@pytest.mark.parametrize(("path", "value", "param", "words"), [
    ("testing_criteria.0.type", "regex_check", "testing_criteria[0].type", "unknown grader"),
    ("testing_criteria.0.type", "python", "testing_criteria[0].type", "not supported"),
    ("testing_criteria.0.operation", "startswith", "testing_criteria[0].operation", "eq, ne"),
    ("testing_criteria.0.reference", "{{item.answr}}", "testing_criteria[0].reference",
     "item.answr"),
    ("testing_criteria.0.input", "{{ item.answer | upper }}", "testing_criteria[0].input",
     "not supported"),
    ("testing_criteria.0.input", "{{sample.text}}", "testing_criteria[0].input", "sample.text"),
    ("testing_criteria.1.evaluation_metric", "cosine", "testing_criteria[1].evaluation_metric",
     "embedding"),
    ("testing_criteria.1.evaluation_metric", "wer", "testing_criteria[1].evaluation_metric",
     "fuzzy_match"),
    ("testing_criteria.1.pass_threshold", _DELETE, "testing_criteria[1].pass_threshold", "0 to 1"),
    ("testing_criteria.2.model", "no/such", "testing_criteria[2].model", "no/such"),
    ("testing_criteria.2.labels", _DELETE, "testing_criteria[2].labels", "non-empty"),
    ("testing_criteria.2.labels", [], "testing_criteria[2].labels", "non-empty"),
    ("testing_criteria.2.passing_labels", ["great"], "testing_criteria[2].passing_labels",
     "labels"),
    ("testing_criteria.2.input.0.content", "{{item.meta.country}}",
     "testing_criteria[2].input[0].content", "item.meta.country"),
    ("testing_criteria.2.input.0.role", "robot", "testing_criteria[2].input[0]", "role"),
    ("testing_criteria.2.sampling_params", {"max_completion_tokens": 0},
     "testing_criteria[2].sampling_params.max_completion_tokens", "positive"),
    ("testing_criteria", [], "testing_criteria", "non-empty"),
    ("data_source_config.item_schema", {"type": "objekt"}, "data_source_config.item_schema",
     "not a valid JSON schema"),
    ("data_source_config.item_schema", "a string", "data_source_config.item_schema",
     "JSON schema"),
    ("data_source_config.type", "logs", "data_source_config.type", "custom"),
    ("data_source_config.include_sample_schema", False, "testing_criteria[0].input",
     "include_sample_schema"),
    ("metadata", {"k": 1}, "metadata", "string values"),
])
def test_bad_definitions_name_the_field(path, value, param, words):
    with pytest.raises(DefinitionError) as caught:
        parse_eval(_with(path, value), MODELS)
    assert caught.value.param == param
    assert words in caught.value.message


DEFINITION = {"id": "eval_x", **parse_eval(GOOD, MODELS)}
RUN = {"data_source": {
    "type": "completions", "model": "sim/fast",
    "input_messages": {"type": "template",
                       "template": [{"role": "user", "content": "{{item.question}}"}]},
    "sampling_params": {"max_completion_tokens": 8},
    "source": {"type": "file_content", "content": [{"item": {"question": "q", "answer": "a"}}]},
}}


def _run_with(**changes):
    body = copy.deepcopy(RUN)
    body["data_source"].update(changes)
    return body


def test_a_good_run_is_accepted():
    parsed = parse_run(RUN, DEFINITION, MODELS)
    assert parsed["model"] == "sim/fast" and parsed["data_source"] == RUN["data_source"]
    jsonl = parse_run({"data_source": {"type": "jsonl", "source": {"type": "file_id",
                                                                   "id": "file-1"}}},
                      DEFINITION, MODELS)
    assert jsonl["model"] is None


@pytest.mark.parametrize(("changes", "param"), [
    ({"type": "responses"}, "data_source.type"),
    ({"model": "no/such"}, "data_source.model"),
    ({"input_messages": None}, "data_source.input_messages"),
    ({"input_messages": {"type": "template",
                         "template": [{"role": "user", "content": "{{item.questoin}}"}]}},
     "data_source.input_messages.template[0].content"),
    # The model has not answered yet when it is prompted: no sample in its prompt.
    ({"input_messages": {"type": "template",
                         "template": [{"role": "user", "content": "{{sample.output_text}}"}]}},
     "data_source.input_messages.template[0].content"),
    ({"input_messages": {"type": "item_reference", "item_reference": "item.history"}},
     "data_source.input_messages.item_reference"),
    ({"sampling_params": {"temperature": 3}}, "data_source.sampling_params.temperature"),
    ({"sampling_params": {"frequency": 1}}, "data_source.sampling_params.frequency"),
    ({"source": {"type": "stored_completions"}}, "data_source.source"),
    ({"source": {"type": "file_id"}}, "data_source.source.id"),
])
def test_bad_runs_name_the_field(changes, param):
    with pytest.raises(DefinitionError) as caught:
        parse_run(_run_with(**changes), DEFINITION, MODELS)
    assert caught.value.param == param


def test_rows_and_items():
    assert split_row({"item": {"a": 1}, "sample": {"output_text": "x"}}) == (
        {"a": 1}, {"output_text": "x"})
    assert split_row({"a": 1, "item": 2}) == ({"a": 1, "item": 2}, None)  # a bare item
    with pytest.raises(ValueError, match="object"):
        split_row([1, 2])
    check = item_checker(ITEM_SCHEMA)
    assert check({"question": "q", "answer": "a"}) is None
    assert "answer" in check({"question": "q"})
    assert check({"question": "q", "answer": 4}).startswith("item.answer:")
