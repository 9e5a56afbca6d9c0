"""Checking eval definitions and run data sources before they are accepted.

What a run would trip over is refused when the eval (or the run) is created, with a
`DefinitionError` naming the field as OpenAI's `param` does (`testing_criteria[1].labels`): an
unknown grader type or metric, a template naming a field that `item_schema` does not define (or
`sample.*` when the eval has no sample schema), an invalid JSON schema, a model the catalog does
not serve, labels missing or passing labels that are not labels. Pure: the catalog comes in as a
container of model ids. Items themselves are checked against the schema with `item_checker`.
"""

from __future__ import annotations

from collections.abc import Callable, Container

import jsonschema

from jobs.eval_templates import (
    ROLES,
    TEXT_PARTS,
    TemplateError,
    message_templates,
    parse_reference,
    references,
    schema_allows,
)
from jobs.graders import (
    GRADER_TYPES,
    JUDGE_TYPES,
    SIMILARITY_METRICS,
    STRING_CHECK_OPERATIONS,
    UNSUPPORTED_METRICS,
)

# What a run's `sample` namespace holds: the model's answer (completions runs), or what a jsonl
# item brought along under "sample".
SAMPLE_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object"}},
        "output_text": {"type": "string"},
        "output_json": {"type": "object"},
        "output_tools": {"type": "array", "items": {"type": "object"}},
        "finish_reason": {"type": "string"},
        "usage": {"type": "object"},
    },
    "required": ["output_text"],
}
SOURCE_TYPES = ("file_content", "file_id")
SAMPLING_FIELDS = ("max_completion_tokens", "temperature", "top_p", "seed", "response_format",
                   "tools")


class DefinitionError(ValueError):
    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.message = message
        self.param = param


def _require(condition: bool, message: str, param: str | None) -> None:
    if not condition:
        raise DefinitionError(message, param)


def check_metadata(value, param: str = "metadata") -> dict | None:
    if value is None:
        return None
    _require(isinstance(value, dict) and len(value) <= 16
             and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                     for k, v in value.items()),
             f"'{param}' must be an object of at most 16 string values (keys up to 64 "
             "characters, values up to 512).", param)
    return value


def _optional_name(body: dict) -> str | None:
    name = body.get("name")
    _require(name is None or isinstance(name, str), "'name' must be a string.", "name")
    return name


# -- evals ---------------------------------------------------------------------------------

def parse_eval(body: dict, models: Container[str]) -> dict:
    """The checked parts of a `POST /v1/evals` body: name, metadata, item_schema,
    include_sample_schema and testing_criteria."""
    config = body.get("data_source_config")
    _require(isinstance(config, dict), "'data_source_config' must be an object.",
             "data_source_config")
    kind = config.get("type")
    _require(kind == "custom", f"data_source_config type {kind!r} is not supported here; use "
             "'custom' with an item_schema.", "data_source_config.type")
    item_schema = config.get("item_schema")
    param = "data_source_config.item_schema"
    _require(isinstance(item_schema, dict), f"'{param}' must be a JSON schema object.", param)
    try:
        jsonschema.validators.validator_for(item_schema).check_schema(item_schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise DefinitionError(f"'{param}' is not a valid JSON schema"
                              f"{f' at {where}' if where else ''}: {exc.message}",
                              param) from None
    with_sample = config.get("include_sample_schema", False)
    _require(isinstance(with_sample, bool), "'include_sample_schema' must be a boolean.",
             "data_source_config.include_sample_schema")
    criteria = body.get("testing_criteria")
    _require(isinstance(criteria, list) and criteria,
             "'testing_criteria' must be a non-empty list of graders.", "testing_criteria")
    return {
        "name": _optional_name(body),
        "metadata": check_metadata(body.get("metadata")),
        "item_schema": item_schema,
        "include_sample_schema": with_sample,
        "testing_criteria": [
            check_criterion(c, f"testing_criteria[{i}]", item_schema, with_sample, models)
            for i, c in enumerate(criteria)
        ],
    }


def full_schema(item_schema: dict, with_sample: bool) -> dict:
    """The eval's `data_source_config.schema`: the item namespace, and sample if asked for."""
    properties = {"item": item_schema}
    if with_sample:
        properties["sample"] = SAMPLE_SCHEMA
    return {"type": "object", "properties": properties, "required": list(properties)}


def check_criterion(criterion, param: str, item_schema: dict, with_sample: bool,
                    models: Container[str]) -> dict:
    _require(isinstance(criterion, dict), f"'{param}' must be an object.", param)
    kind = criterion.get("type")
    if kind in ("python", "multi"):
        raise DefinitionError(f"grader type {kind!r} is not supported by this gateway; use one "
                              f"of {', '.join(GRADER_TYPES)}.", f"{param}.type")
    _require(kind in GRADER_TYPES, f"unknown grader type {kind!r}; use one of "
             f"{', '.join(GRADER_TYPES)}.", f"{param}.type")
    name = criterion.get("name")
    _require(isinstance(name, str) and name.strip(), f"'{param}.name' must be a non-empty "
             "string.", f"{param}.name")

    def templates_ok(template, field: str, namespaces=("item", "sample")) -> None:
        _require(isinstance(template, str), f"'{param}.{field}' must be a string.",
                 f"{param}.{field}")
        check_template(template, f"{param}.{field}", item_schema, with_sample, namespaces)

    if kind in ("string_check", "text_similarity"):
        templates_ok(criterion.get("input"), "input")
        templates_ok(criterion.get("reference"), "reference")
    if kind == "string_check":
        _require(criterion.get("operation") in STRING_CHECK_OPERATIONS,
                 f"'{param}.operation' must be one of {', '.join(STRING_CHECK_OPERATIONS)}.",
                 f"{param}.operation")
    elif kind == "text_similarity":
        metric = criterion.get("evaluation_metric")
        if metric in UNSUPPORTED_METRICS:
            raise DefinitionError(f"evaluation_metric {metric!r} is not offered here: "
                                  f"{UNSUPPORTED_METRICS[metric]}.", f"{param}.evaluation_metric")
        _require(metric in SIMILARITY_METRICS, f"'{param}.evaluation_metric' must be one of "
                 f"{', '.join(SIMILARITY_METRICS)}.", f"{param}.evaluation_metric")
        threshold = criterion.get("pass_threshold")
        _require(isinstance(threshold, int | float) and not isinstance(threshold, bool)
                 and 0 <= threshold <= 1, f"'{param}.pass_threshold' must be a number from 0 "
                 "to 1.", f"{param}.pass_threshold")
    if kind in JUDGE_TYPES:
        model = criterion.get("model")
        _require(isinstance(model, str) and model in models,
                 f"'{param}.model': the model {model!r} is not served here.", f"{param}.model")
        check_messages(criterion.get("input"), f"{param}.input", item_schema, with_sample)
        check_sampling(criterion.get("sampling_params"), f"{param}.sampling_params")
    if kind == "score_model":
        check_score_range(criterion, param)
    elif kind == "label_model":
        labels = criterion.get("labels")
        _require(isinstance(labels, list) and labels
                 and all(isinstance(label, str) and label.strip() for label in labels)
                 and len(set(labels)) == len(labels),
                 f"'{param}.labels' must be a non-empty list of distinct, non-empty strings.",
                 f"{param}.labels")
        passing = criterion.get("passing_labels")
        _require(isinstance(passing, list) and passing
                 and all(label in labels for label in passing),
                 f"'{param}.passing_labels' must be a non-empty list of labels from "
                 f"'{param}.labels'.", f"{param}.passing_labels")
    return criterion


def check_score_range(criterion: dict, param: str) -> None:
    """`range` (default [0, 1]): two numbers, low first; `pass_threshold` (optional) within."""
    def number(value) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    bounds = criterion.get("range")
    if bounds is not None:
        _require(isinstance(bounds, list) and len(bounds) == 2 and all(map(number, bounds))
                 and bounds[0] < bounds[1], f"'{param}.range' must be two numbers, the lower "
                 "first.", f"{param}.range")
    low, high = bounds or (0, 1)
    threshold = criterion.get("pass_threshold")
    if threshold is not None:
        _require(number(threshold) and low <= threshold <= high,
                 f"'{param}.pass_threshold' must be a number within the range [{low}, {high}].",
                 f"{param}.pass_threshold")


def check_template(template: str, param: str, item_schema: dict, with_sample: bool,
                   namespaces=("item", "sample")) -> None:
    """Every placeholder of `template` must name a field the eval's schemas define."""
    try:
        paths = list(references(template))
    except TemplateError as exc:
        raise DefinitionError(f"'{param}': {exc}", param) from None
    for path in paths:
        shown = "{{" + ".".join(path) + "}}"
        _require(path[0] in namespaces, f"'{param}' refers to {shown}, but only "
                 f"{' and '.join(namespaces)} may be used here.", param)
        if path[0] == "item":
            _require(schema_allows(item_schema, path[1:]), f"'{param}' refers to {shown}, which "
                     "data_source_config.item_schema does not define.", param)
        else:
            _require(with_sample, f"'{param}' refers to {shown}, but the eval's "
                     "data_source_config does not set include_sample_schema.", param)
            _require(len(path) > 1 and schema_allows(SAMPLE_SCHEMA, path[1:]),
                     f"'{param}' refers to {shown}; the sample holds "
                     f"{', '.join(SAMPLE_SCHEMA['properties'])}.", param)


def check_messages(messages, param: str, item_schema: dict, with_sample: bool,
                   namespaces=("item", "sample")) -> None:
    _require(isinstance(messages, list) and messages,
             f"'{param}' must be a non-empty list of messages.", param)
    for index, message in enumerate(messages):
        where = f"{param}[{index}]"
        _require(isinstance(message, dict) and message.get("role") in ROLES,
                 f"'{where}' must be a message with a role of {', '.join(ROLES)}.", where)
        content = message.get("content")
        parts = content if isinstance(content, list) else [content]
        for part in parts:
            if isinstance(part, str):
                continue
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in TEXT_PARTS:
                _require(isinstance(part.get("text"), str), f"'{where}.content' text parts need "
                         "a 'text' string.", f"{where}.content")
            elif kind == "input_image":
                _require(isinstance(part.get("image_url"), str), f"'{where}.content' image "
                         "parts need an 'image_url' string.", f"{where}.content")
            else:
                raise DefinitionError(f"'{where}.content' must be a string or input_text, "
                                      "output_text or input_image parts.", f"{where}.content")
        for template in message_templates(message):
            check_template(template, f"{where}.content", item_schema, with_sample, namespaces)


def check_sampling(params, param: str) -> dict:
    if params is None:
        return {}
    _require(isinstance(params, dict), f"'{param}' must be an object.", param)
    for name, value in params.items():
        field = f"{param}.{name}"
        if name in ("max_completion_tokens", "seed"):
            _require(isinstance(value, int) and not isinstance(value, bool)
                     and (value >= 1 or name == "seed"), f"'{field}' must be "
                     f"{'a positive' if name != 'seed' else 'an'} integer.", field)
        elif name in ("temperature", "top_p"):
            top = 2 if name == "temperature" else 1
            _require(isinstance(value, int | float) and not isinstance(value, bool)
                     and 0 <= value <= top, f"'{field}' must be a number from 0 to {top}.",
                     field)
        elif name in ("response_format",):
            _require(isinstance(value, dict), f"'{field}' must be an object.", field)
        elif name == "tools":
            _require(isinstance(value, list), f"'{field}' must be a list.", field)
        elif name != "reasoning_effort":
            raise DefinitionError(f"'{field}' is not a sampling parameter; use "
                                  f"{', '.join(SAMPLING_FIELDS)}.", field)
    return params


# -- runs ----------------------------------------------------------------------------------

def parse_run(body: dict, definition: dict, models: Container[str]) -> dict:
    """The checked parts of a `POST /v1/evals/{id}/runs` body: name, metadata, the data source
    as given, and its model (None for a jsonl run, which only grades)."""
    source_param = "data_source"
    data_source = body.get("data_source")
    _require(isinstance(data_source, dict), "'data_source' must be an object.", source_param)
    kind = data_source.get("type")
    _require(kind in ("jsonl", "completions"), f"data_source type {kind!r} is not supported "
             "here; use 'jsonl' or 'completions'.", "data_source.type")
    source = data_source.get("source")
    _require(isinstance(source, dict) and source.get("type") in SOURCE_TYPES,
             "'data_source.source' must be a file_content or file_id source.",
             "data_source.source")
    if source["type"] == "file_id":
        _require(isinstance(source.get("id"), str) and source["id"],
                 "'data_source.source.id' must be a file id.", "data_source.source.id")
    else:
        _require(isinstance(source.get("content"), list),
                 "'data_source.source.content' must be a list of {item, sample} rows.",
                 "data_source.source.content")
    model = None
    if kind == "completions":
        model = data_source.get("model")
        _require(isinstance(model, str) and model in models,
                 f"'data_source.model': the model {model!r} is not served here.",
                 "data_source.model")
        check_input_messages(data_source.get("input_messages"), definition["item_schema"])
        check_sampling(data_source.get("sampling_params"), "data_source.sampling_params")
    return {"name": _optional_name(body), "metadata": check_metadata(body.get("metadata")),
            "data_source": data_source, "model": model}


def check_input_messages(spec, item_schema: dict) -> None:
    param = "data_source.input_messages"
    _require(isinstance(spec, dict), f"'{param}' must be a template or an item_reference.",
             param)
    if spec.get("type") == "template":
        # Only the item exists when the model is prompted: the sample is what it answers.
        check_messages(spec.get("template"), f"{param}.template", item_schema, False, ("item",))
    elif spec.get("type") == "item_reference":
        reference = spec.get("item_reference")
        _require(isinstance(reference, str), f"'{param}.item_reference' must be a string such "
                 "as 'item.messages'.", f"{param}.item_reference")
        try:
            path = parse_reference(reference)
        except TemplateError as exc:
            raise DefinitionError(f"'{param}.item_reference': {exc}",
                                  f"{param}.item_reference") from None
        _require(path[0] == "item" and len(path) > 1 and schema_allows(item_schema, path[1:]),
                 f"'{param}.item_reference' {reference!r} is not a field of "
                 "data_source_config.item_schema.", f"{param}.item_reference")
    else:
        raise DefinitionError(f"'{param}.type' must be 'template' or 'item_reference'.",
                              f"{param}.type")


# -- items ---------------------------------------------------------------------------------

def split_row(row) -> tuple[dict, dict | None]:
    """A data row as (item, sample): `{"item": {...}, "sample": {...}}`, or a bare item."""
    if isinstance(row, dict) and isinstance(row.get("item"), dict) and set(row) <= {"item",
                                                                                   "sample"}:
        sample = row.get("sample")
        if sample is not None and not isinstance(sample, dict):
            raise ValueError("'sample' must be an object")
        return row["item"], sample
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    return row, None


def item_checker(item_schema: dict) -> Callable[[dict], str | None]:
    """A function telling what is wrong with an item (None when it fits the schema)."""
    validator = jsonschema.validators.validator_for(item_schema)(item_schema)

    def check(item: dict) -> str | None:
        error = jsonschema.exceptions.best_match(validator.iter_errors(item))
        if error is None:
            return None
        where = ".".join(str(p) for p in error.absolute_path)
        return f"item{'.' + where if where else ''}: {error.message}"

    return check
