"""Graders of evals, as pure functions: a testing criterion and an item's data in, a result out.

- `string_check`: `eq`, `ne`, `like` (the input contains the reference), `ilike` (the same,
  ignoring case). Score 1 or 0.
- `text_similarity`: a score from 0 to 1, passing at `pass_threshold`: `fuzzy_match`
  (rapidfuzz's normalized Indel similarity), `bleu` (sacrebleu's sentence BLEU, exponential
  smoothing), `gleu` (NLTK's sentence GLEU), `rouge_1` to `rouge_5` and `rouge_l` (the F-measure
  of Google's rouge-score, stemmed). `cosine` (needs an embedding model) and `meteor` (needs
  NLTK's WordNet data) are not offered.
- `label_model`: the two pure halves of a judge: the chat request the judge model is sent, and
  the matching of its answer to a label. The engine call between them belongs to the runner.
- `score_model`: the same for a judge that answers a number within `range` (default 0 to 1);
  the item passes at `pass_threshold` (default: the middle of the range).

The similarity libraries are imported on first use: NLTK alone takes a second or two to import,
which the web app, which only checks definitions, should not pay.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

from jobs.eval_templates import render, render_messages

STRING_CHECK_OPERATIONS = ("eq", "ne", "like", "ilike")
ROUGE_METRICS = {f"rouge_{n}": f"rouge{n}" for n in range(1, 6)} | {"rouge_l": "rougeL"}
SIMILARITY_METRICS = ("fuzzy_match", "bleu", "gleu", *ROUGE_METRICS)
UNSUPPORTED_METRICS = {
    "cosine": "it needs an embedding model",
    "meteor": "it needs NLTK's WordNet data, which this gateway does not ship",
}
GRADER_TYPES = ("string_check", "text_similarity", "label_model", "score_model")
# Graders that ask a judge model.
JUDGE_TYPES = ("label_model", "score_model")
# The judge answers with a label, or with {"label": ...} where the engine honours the schema;
# this leaves room for either, and for a short reason after a bare label.
JUDGE_MAX_TOKENS = 64


@dataclass(frozen=True)
class GraderResult:
    """One criterion's verdict on one item, as the output item's `results` entry."""

    name: str
    type: str
    score: float
    passed: bool
    sample: dict | None = None
    error: str | None = None

    def public(self) -> dict:
        result = {"name": self.name, "type": f"{self.type.replace('_', '-')}-grader",
                  "score": self.score, "passed": self.passed, "sample": self.sample}
        if self.error is not None:
            result["error"] = self.error
        return result


def string_check(operation: str, text: str, reference: str) -> bool:
    if operation == "eq":
        return text == reference
    if operation == "ne":
        return text != reference
    if operation == "like":
        return reference in text
    if operation == "ilike":
        return reference.casefold() in text.casefold()
    raise ValueError(f"unknown string_check operation {operation!r}")


def text_similarity(metric: str, text: str, reference: str) -> float:
    """How alike `text` is to `reference`, from 0 to 1."""
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        score = fuzz.ratio(text, reference) / 100
    elif metric == "bleu":
        import sacrebleu

        score = sacrebleu.sentence_bleu(text, [reference]).score / 100
    elif metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        score = sentence_gleu([reference.split()], text.split()) if text.split() else 0.0
    elif metric in ROUGE_METRICS:
        score = _rouge(ROUGE_METRICS[metric]).score(reference, text)[ROUGE_METRICS[metric]].fmeasure
    else:
        raise ValueError(f"unknown text_similarity metric {metric!r}")
    # Floating point sums may land a hair outside [0, 1] (sacrebleu gives 100.00000000000004).
    return min(1.0, max(0.0, float(score)))


@lru_cache(maxsize=8)
def _rouge(name: str):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([name], use_stemmer=True)


def grade_text(criterion: dict, context: dict) -> GraderResult:
    """A `string_check` or `text_similarity` criterion on an item ({"item", "sample"}).
    Raises TemplateError when the item lacks what the criterion refers to."""
    text = render(criterion["input"], context)
    reference = render(criterion["reference"], context)
    if criterion["type"] == "string_check":
        passed = string_check(criterion["operation"], text, reference)
        return GraderResult(criterion["name"], "string_check", 1.0 if passed else 0.0, passed)
    score = text_similarity(criterion["evaluation_metric"], text, reference)
    return GraderResult(criterion["name"], "text_similarity", score,
                        score >= float(criterion["pass_threshold"]))


# -- label_model ---------------------------------------------------------------------------

def score_range(criterion: dict) -> tuple[float, float]:
    low, high = criterion.get("range") or (0, 1)
    return float(low), float(high)


def judge_request(criterion: dict, context: dict) -> dict:
    """The chat completion request a `label_model` or `score_model` criterion sends its judge
    for one item.

    It asks for structured output ({"label": one of the labels} or {"score": a number in the
    range}), which vLLM and SGLang enforce with guided decoding; an engine that ignores it still
    has its text matched to a label, or read for a number.
    """
    params = criterion.get("sampling_params") or {}
    if criterion["type"] == "score_model":
        low, high = score_range(criterion)
        field = "score"
        value: dict = {"type": "number", "minimum": low, "maximum": high}
    else:
        field = "label"
        value = {"type": "string", "enum": list(criterion["labels"])}
    body = {
        "model": criterion["model"],
        "messages": render_messages(criterion["input"], context),
        "max_tokens": params.get("max_completion_tokens") or JUDGE_MAX_TOKENS,
        "temperature": params.get("temperature", 0),
        "response_format": {"type": "json_schema", "json_schema": {
            "name": field, "strict": True,
            "schema": {"type": "object", "additionalProperties": False, "required": [field],
                       "properties": {field: value}},
        }},
    }
    for name in ("top_p", "seed"):
        if params.get(name) is not None:
            body[name] = params[name]
    return body


_EDGES = " \t\r\n\"'`*.,;:!?()[]{}"


def match_label(answer: str, labels: list[str]) -> str | None:
    """The label a judge's answer names, or None.

    In order: {"label": X} (structured output); the whole answer being a label, ignoring case,
    quotes and punctuation around it; else the label that appears first as a whole word (the
    longer one when two start at the same place, so "not relevant" beats "relevant").
    """
    text = answer.strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("label"), str):
        text = parsed["label"]
    core = text.strip(_EDGES).casefold()
    for label in labels:
        if label.strip(_EDGES).casefold() == core:
            return label
    best: tuple[int, int, str] | None = None
    for label in labels:
        found = re.search(rf"(?<!\w){re.escape(label.strip())}(?!\w)", text, re.IGNORECASE)
        if found is not None and label.strip():
            candidate = (found.start(), -len(label), label)
            best = candidate if best is None or candidate < best else best
    return best[2] if best else None


def grade_label(criterion: dict, answer: str, judge_sample: dict | None = None) -> GraderResult:
    """A `label_model` criterion, given its judge's answer: passed when the label is passing."""
    # A judge that names no label fails the item (`label` is null in the result's sample): the
    # item was judged, just not favourably.
    label = match_label(answer, criterion["labels"])
    passed = label is not None and label in criterion["passing_labels"]
    sample = {**(judge_sample or {}), "label": label}
    return GraderResult(criterion["name"], "label_model", 1.0 if passed else 0.0, passed, sample)


# -- score_model ---------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def read_score(answer: str) -> float | None:
    """The number a judge's answer gives: {"score": X} (structured output), else the first
    number in its text; None when there is none."""
    text = answer.strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("score"), int | float) \
            and not isinstance(parsed.get("score"), bool):
        return float(parsed["score"])
    if isinstance(parsed, int | float) and not isinstance(parsed, bool):
        return float(parsed)
    found = _NUMBER.search(text)
    return float(found.group()) if found else None


def grade_score(criterion: dict, answer: str, judge_sample: dict | None = None) -> GraderResult:
    """A `score_model` criterion, given its judge's answer: the score (held within the range)
    passes at `pass_threshold`. A judge that gives no number fails the item with the lowest
    score (`score` is null in the result's sample)."""
    low, high = score_range(criterion)
    raw = read_score(answer)
    score = low if raw is None else min(max(raw, low), high)
    threshold = criterion.get("pass_threshold")
    threshold = (low + high) / 2 if threshold is None else float(threshold)
    passed = raw is not None and score >= threshold
    sample = {**(judge_sample or {}), "score": raw}
    return GraderResult(criterion["name"], "score_model", score, passed, sample)
