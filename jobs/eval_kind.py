"""Eval runs on the batch machinery: the `JobKind` that turns a run's items into graded lines.

A run's items are in its items file (one `{"item", "sample"}` JSON per line, written when the run
was prepared), so a chunk reads its lines by byte offset as a batch chunk does. A line of a
`completions` run carries the chat request rendered from the run's `input_messages`; the batch
service sends it, and `finish_line` turns the answer into the sample, grades it with every testing
criterion (a `label_model` or `score_model` criterion calls its judge model through the same
admission leases) and returns the output item to store with the line's tally: pass or fail, the
passes and fails per criterion, and the tokens per model. A `jsonl` run has no request: its items
bring their own sample, and grading is all there is.

An item whose sample could not be made (the engine refused, a template names a field the item
lacks) or that a grader could not grade is stored as `error`; a judge that could not be reached
makes the line be retried like an engine failure.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from jobs.eval_templates import TemplateError, lookup, parse_reference, render_messages
from jobs.graders import (
    JUDGE_TYPES,
    GraderResult,
    grade_label,
    grade_score,
    grade_text,
    judge_request,
)
from jobs.kinds import EngineRequest, JobStopped
from jobs.store import JobStore

CHAT_URL = "/v1/chat/completions"


def run_models(job: dict) -> list[str]:
    """Every model a run's lines need: the sampled model first, then the judges."""
    models = [job["model"]] if job.get("model") else []
    for criterion in job["testing_criteria"]:
        if criterion["type"] in JUDGE_TYPES and criterion["model"] not in models:
            models.append(criterion["model"])
    return models


def output_item_id(run_id: str, number: int) -> str:
    return f"outputitem_{run_id.removeprefix('evalrun_')}_{number}"


def line_of(run_id: str, item_id: str) -> int | None:
    """The line number an output item id of this run stands for."""
    prefix = f"outputitem_{run_id.removeprefix('evalrun_')}_"
    tail = item_id.removeprefix(prefix)
    return int(tail) if tail != item_id and tail.isdigit() else None


def sample_request(data_source: dict, item: dict) -> dict:
    """The chat completion request that samples the run's model for one item."""
    spec = data_source["input_messages"]
    context = {"item": item}
    if spec["type"] == "item_reference":
        messages = lookup(parse_reference(spec["item_reference"]), context)
        if not (isinstance(messages, list) and messages
                and all(isinstance(m, dict) and m.get("role") for m in messages)):
            raise TemplateError(f"'{spec['item_reference']}' is not a list of messages")
        messages = render_messages(messages, None)
    else:
        messages = render_messages(spec["template"], context)
    params = data_source.get("sampling_params") or {}
    body = {"model": data_source["model"], "messages": messages}
    if params.get("max_completion_tokens") is not None:
        # `max_tokens` is the name every engine of the catalog knows.
        body["max_tokens"] = params["max_completion_tokens"]
    for name in ("temperature", "top_p", "seed", "response_format", "tools"):
        if params.get(name) is not None:
            body[name] = params[name]
    return body


def sample_from_answer(answer: dict) -> dict:
    """The `sample` namespace from a chat completion."""
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    text = message.get("content") or ""
    sample = {"model": answer.get("model"), "choices": answer.get("choices") or [],
              "output_text": text, "output_tools": message.get("tool_calls") or [],
              "finish_reason": choice.get("finish_reason"), "usage": answer.get("usage") or {}}
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        sample["output_json"] = parsed
    return sample


def _usage(usage: dict | None) -> dict:
    usage = usage or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"prompt_tokens": usage.get("prompt_tokens") or 0,
            "completion_tokens": usage.get("completion_tokens") or 0,
            "total_tokens": usage.get("total_tokens") or 0, "cached_tokens": cached}


def _as_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class EvalRunKind:
    """The job kind `eval_run`: its lines are the run's items; each line's answer is graded
    (judges are engine calls of their own) into an output item."""

    name = "eval_run"

    def __init__(self, jobs: JobStore, items_dir: Path):
        self.jobs = jobs
        self.items_dir = Path(items_dir)

    def started(self, job: dict) -> None:
        return None

    # -- JobKind ---------------------------------------------------------------------------

    def lines(self, job: dict, first: int, end: int, offset: int) -> list[tuple[int, dict]]:
        models = run_models(job)
        lines = []
        with open(self.items_dir / job["items_file"], "rb") as fh:
            fh.seek(offset)
            for number in range(first + 1, end + 1):
                row = json.loads(fh.readline())
                line = {"custom_id": output_item_id(job["id"], number), "item": row["item"],
                        "sample": row.get("sample"), "models": models, "url": None,
                        "body": None}
                if job.get("model"):
                    try:
                        line["body"] = sample_request(job["data_source"], row["item"])
                        line["url"] = CHAT_URL
                    except TemplateError as exc:
                        line["error"] = {"code": "invalid_item", "message": str(exc)}
                lines.append((number, line))
        return lines

    def finish_line(self, job: dict, number: int, line: dict, ok: bool, payload: dict | None,
                    request: EngineRequest) -> tuple[bool, dict, dict[str, int]]:
        tally: Counter = Counter()
        sample: dict | None = line.get("sample")
        error = line.get("error")
        if error is None and not ok:
            error = _engine_error(payload or {})
        elif error is None and line["body"] is not None:
            sample = sample_from_answer(payload["response"]["body"])
            self._count_usage(tally, job["model"], sample["usage"])
        results: list[GraderResult] = []
        if error is None:
            context = {"item": line["item"], "sample": sample or {}}
            results = [self._grade(job, c, context, tally, request)
                       for c in job["testing_criteria"]]
            broken = [r.error for r in results if r.error is not None]
            if broken:
                error = {"code": "grader_error", "message": broken[0]}
        for index, result in enumerate(results):
            if result.error is None:
                tally[f"criterion:{index}:{'passed' if result.passed else 'failed'}"] += 1
        if error is not None:
            status = "error"
        else:
            status = "pass" if all(r.passed for r in results) else "fail"
            tally["passed" if status == "pass" else "failed"] += 1
        if ok and not self.jobs.exists(job["id"]):
            # The run was deleted while this line was at the engine: storing its result would
            # bring back a part of the run.
            raise JobStopped(job["id"])
        item = self._output_item(job, number, line, status, sample, results, error)
        return error is None, item, dict(tally)

    def finalize(self, job: dict) -> None:
        if self.jobs.transition(job["id"], ("in_progress",), "completed", "completed_at"):
            self.jobs.close(job["id"])

    # -- grading ---------------------------------------------------------------------------

    def _grade(self, job: dict, criterion: dict, context: dict, tally: Counter,
               request: EngineRequest) -> GraderResult:
        try:
            if criterion["type"] not in JUDGE_TYPES:
                return grade_text(criterion, context)
            judge = judge_request(criterion, context)
        except TemplateError as exc:
            return GraderResult(criterion["name"], criterion["type"], 0.0, False, None, str(exc))
        # Transient and JobStopped go up: the whole line is tried again later.
        answer = request(job, criterion["model"], CHAT_URL, judge)
        if answer.status >= 400:
            message = (answer.body.get("error") or {}).get("message") or f"HTTP {answer.status}"
            return GraderResult(criterion["name"], criterion["type"], 0.0, False, None,
                                f"the judge {criterion['model']} refused: {message}")
        judged = sample_from_answer(answer.body)
        self._count_usage(tally, criterion["model"], judged["usage"])
        judge_sample = {"input": judge["messages"],
                        "output": [{"role": "assistant", "content": judged["output_text"]}],
                        "model": criterion["model"], "finish_reason": judged["finish_reason"],
                        "usage": _usage(judged["usage"])}
        grade = grade_score if criterion["type"] == "score_model" else grade_label
        return grade(criterion, judged["output_text"], judge_sample)

    @staticmethod
    def _count_usage(tally: Counter, model: str, usage: dict | None) -> None:
        tally[f"usage:{model}:invocation_count"] += 1
        for name, value in _usage(usage).items():
            if value:
                tally[f"usage:{model}:{name}"] += int(value)

    # -- the stored output item ------------------------------------------------------------

    def _output_item(self, job: dict, number: int, line: dict, status: str,
                     sample: dict | None, results: list[GraderResult],
                     error: dict | None) -> dict:
        params = (job["data_source"].get("sampling_params") or {}) if job.get("model") else {}
        body = line.get("body") or {}
        sample = sample or {}
        text = sample.get("output_text")
        return {
            "object": "eval.run.output_item",
            "id": output_item_id(job["id"], number),
            "run_id": job["id"],
            "eval_id": job["eval_id"],
            "created_at": int(time.time()),
            "status": status,
            "datasource_item_id": number - 1,
            "datasource_item": line["item"],
            "results": [r.public() for r in results],
            "sample": {
                "input": [{"role": m["role"], "content": _as_text(m.get("content"))}
                          for m in body.get("messages", [])],
                "output": [] if text is None else [{"role": "assistant", "content": text}],
                "finish_reason": sample.get("finish_reason"),
                "model": sample.get("model") or job.get("model"),
                "usage": _usage(sample.get("usage")),
                "error": error,
                "temperature": params.get("temperature"),
                "max_completion_tokens": params.get("max_completion_tokens"),
                "top_p": params.get("top_p"),
                "seed": params.get("seed"),
            },
        }


def _engine_error(payload: dict) -> dict:
    """The sample's error from a failed line: the batch line's error (retries used up), or the
    engine's refusal (a 4xx: the request itself is wrong, e.g. too long for the model)."""
    if payload.get("error"):
        code = payload["error"].get("code")
        return {"code": code if isinstance(code, str) and code else "engine_error",
                "message": payload["error"].get("message") or ""}
    response = payload.get("response") or {}
    answer = response.get("body")
    message = (answer.get("error") or {}).get("message") if isinstance(answer, dict) else None
    return {"code": "engine_error",
            "message": message or f"the engine answered {response.get('status_code')}"}
