"""The Evals API through the real stack, with the official openai SDK's `client.evals`.

The sim engine's text is a function of the prompt, so each test first asks the engine (through
the realtime API) what it will answer, then builds a dataset whose passes and fails are known.
"""

from __future__ import annotations

import io
import json
import signal
import time

import openai
import pytest

from jobs.graders import judge_request, match_label, read_score
from runtimes.sim.textgen import VOCABULARY
from tests.conftest import TOKENS, sdk, warm
from tests.harness import wait_for

SYSTEM = "Answer in a few words."
FINAL = ("completed", "failed", "canceled")


def _client(stack) -> openai.OpenAI:
    return sdk(stack, TOKENS["eval"])


def _answer(stack, model: str, messages: list[dict], max_tokens: int) -> str:
    """What the engine answers these messages: the same text a run will get."""
    reply = sdk(stack, TOKENS["realtime"]).chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens)
    return reply.choices[0].message.content


def _wait_run(client, eval_id: str, run_id: str, statuses=FINAL, timeout: float = 120):
    return wait_for(lambda: (r := client.evals.runs.retrieve(run_id, eval_id=eval_id)).status
                    in statuses and r, timeout, interval=0.3, what=f"run {run_id}")


def _items(client, eval_id: str, run_id: str, **kwargs) -> list:
    """Every output item, the SDK following the pages."""
    return list(client.evals.runs.output_items.list(run_id, eval_id=eval_id, **kwargs))


def _schema(*fields: str) -> dict:
    return {"type": "object", "properties": {f: {"type": "string"} for f in fields},
            "required": list(fields)}


def _upload(stack, rows: list[dict]) -> str:
    data = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    uploaded = sdk(stack, TOKENS["upload"]).files.create(
        file=("items.jsonl", io.BytesIO(data)), purpose="evals")
    return uploaded.id


def _completions(model: str, rows: list[dict], max_tokens: int, user: str = "{{item.question}}"):
    return {"type": "completions", "model": model,
            "input_messages": {"type": "template", "template": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": user}]},
            "sampling_params": {"max_completion_tokens": max_tokens},
            "source": {"type": "file_content", "content": rows}}


def test_string_check_and_text_similarity_on_a_completions_run(stack):
    warm(stack, "sim/fast")
    questions = [f"What is item number {i}?" for i in range(10)]
    answers = [_answer(stack, "sim/fast", [{"role": "system", "content": SYSTEM},
                                           {"role": "user", "content": q}], 4)
               for q in questions]
    right = {0, 3, 6, 9}  # these items expect exactly the model's answer
    rows = [{"item": {"question": q, "answer": a if i in right else f"wrong {i}",
                      "word": a.split()[1].upper()}}
            for i, (q, a) in enumerate(zip(questions, answers, strict=True))]
    client = _client(stack)
    same = {"input": "{{sample.output_text}}", "reference": "{{item.answer}}"}
    created = client.evals.create(
        name="qa", metadata={"team": "search"},
        data_source_config={"type": "custom", "item_schema": _schema("question", "answer",
                                                                      "word"),
                            "include_sample_schema": True},
        testing_criteria=[
            {"type": "string_check", "name": "exact", "operation": "eq", **same},
            {"type": "string_check", "name": "says the word", "operation": "ilike",
             "input": "{{sample.output_text}}", "reference": "{{item.word}}"},
            {"type": "text_similarity", "name": "fuzzy", "evaluation_metric": "fuzzy_match",
             "pass_threshold": 0.9, **same},
            {"type": "text_similarity", "name": "bleu", "evaluation_metric": "bleu",
             "pass_threshold": 0.99, **same},
            {"type": "text_similarity", "name": "rouge", "evaluation_metric": "rouge_l",
             "pass_threshold": 0.99, **same},
        ])
    assert created.object == "eval" and created.id.startswith("eval_")
    assert created.data_source_config.schema_["properties"]["item"]["required"] == [
        "question", "answer", "word"]
    assert [c.name for c in created.testing_criteria] == ["exact", "says the word", "fuzzy",
                                                          "bleu", "rouge"]
    run = client.evals.runs.create(created.id, name="first",
                                   data_source=_completions("sim/fast", rows, 4))
    assert run.object == "eval.run" and run.status == "queued" and run.model == "sim/fast"
    done = _wait_run(client, created.id, run.id)
    assert done.status == "completed", done
    counts = done.result_counts
    assert (counts.total, counts.passed, counts.failed, counts.errored) == (10, 4, 6, 0)
    assert [(r.testing_criteria, r.passed, r.failed) for r in
            done.per_testing_criteria_results] == [
        ("exact", 4, 6), ("says the word", 10, 0), ("fuzzy", 4, 6), ("bleu", 4, 6),
        ("rouge", 4, 6)]
    usage = {u.run_model_name: u for u in done.per_model_usage}
    assert usage["sim/fast"].invocation_count == 10
    assert usage["sim/fast"].completion_tokens == 40
    assert done.report_url.startswith(stack.base_url)

    passed = _items(client, created.id, run.id, status="pass", limit=3)
    assert sorted(i.datasource_item_id for i in passed) == sorted(right)
    failed = _items(client, created.id, run.id, status="fail", limit=2)
    assert sorted(i.datasource_item_id for i in failed) == sorted(set(range(10)) - right)
    # Pages by hand: ascending by default, then descending.
    first = client.evals.runs.output_items.list(run.id, eval_id=created.id, limit=4)
    assert [i.datasource_item_id for i in first.data] == [0, 1, 2, 3] and first.has_more
    second = client.evals.runs.output_items.list(run.id, eval_id=created.id, limit=4,
                                                 after=first.data[-1].id)
    assert [i.datasource_item_id for i in second.data] == [4, 5, 6, 7]
    backwards = client.evals.runs.output_items.list(run.id, eval_id=created.id, limit=3,
                                                    order="desc")
    assert [i.datasource_item_id for i in backwards.data] == [9, 8, 7]

    one = client.evals.runs.output_items.retrieve(passed[0].id, eval_id=created.id,
                                                  run_id=run.id)
    assert one.status == "pass" and one.datasource_item == rows[0]["item"]
    assert one.sample.output[0].content == answers[0]
    assert one.sample.input[1].content == questions[0]
    assert [(r.name, r.passed) for r in one.results] == [
        ("exact", True), ("says the word", True), ("fuzzy", True), ("bleu", True),
        ("rouge", True)]
    miss = client.evals.runs.output_items.retrieve(failed[0].id, eval_id=created.id,
                                                   run_id=run.id)
    assert miss.status == "fail" and miss.results[0].score == 0.0


def _judge_answer(stack, criterion: dict, row: dict) -> str:
    """What the judge answers this criterion for this row: the same request a run sends (the
    sim engine follows its response_format as vLLM's guided decoding does)."""
    body = judge_request(criterion, {"item": row["item"], "sample": row.get("sample", {})})
    reply = sdk(stack, TOKENS["realtime"]).chat.completions.create(**body)
    return reply.choices[0].message.content


def test_label_model_judges_a_jsonl_file_with_its_own_samples(stack):
    warm(stack, "sim/batch")
    template = "Is '{{sample.output_text}}' a good answer to '{{item.question}}'? Label it."
    rows = [{"item": {"question": f"question {i}"}, "sample": {"output_text": f"reply {i}"}}
            for i in range(12)]
    judge = {"type": "label_model", "name": "judge", "model": "sim/batch",
             "input": [{"role": "user", "content": template}], "labels": list(VOCABULARY)}
    answers = [_judge_answer(stack, judge, r) for r in rows]
    assert all(json.loads(a).keys() == {"label"} for a in answers)  # structured output
    verdicts = [match_label(a, judge["labels"]) for a in answers]
    passing = sorted(set(verdicts[:3]))
    expected_pass = {i for i, v in enumerate(verdicts) if v in passing}
    assert 3 <= len(expected_pass) < 12, verdicts  # the data has both outcomes
    client = _client(stack)
    created = client.evals.create(
        name="judged",
        data_source_config={"type": "custom", "item_schema": _schema("question"),
                            "include_sample_schema": True},
        testing_criteria=[{**judge, "passing_labels": passing}])
    file_id = _upload(stack, rows)
    run = client.evals.runs.create(created.id, data_source={
        "type": "jsonl", "source": {"type": "file_id", "id": file_id}})
    done = _wait_run(client, created.id, run.id)
    assert done.status == "completed", done
    counts = done.result_counts
    assert (counts.total, counts.passed, counts.failed, counts.errored) == (
        12, len(expected_pass), 12 - len(expected_pass), 0)
    usage = {u.run_model_name: u for u in done.per_model_usage}
    assert set(usage) == {"sim/batch"} and usage["sim/batch"].invocation_count == 12
    items = _items(client, created.id, run.id, limit=5)
    assert {i.datasource_item_id for i in items if i.status == "pass"} == expected_pass
    labels = {i.datasource_item_id: i.results[0].sample["label"] for i in items}
    assert labels == dict(enumerate(verdicts))
    assert items[0].results[0].sample["input"][0]["content"].startswith("Is 'reply 0'")


def test_score_model_scores_each_item_and_passes_at_the_threshold(stack):
    warm(stack, "sim/batch")
    rows = [{"item": {"question": f"question {i}"}, "sample": {"output_text": f"reply {i}"}}
            for i in range(10)]
    judge = {"type": "score_model", "name": "grade", "model": "sim/batch",
             "input": [{"role": "system", "content": "Score the answer from 1 to 10."},
                       {"role": "user", "content": "{{item.question}}: {{sample.output_text}}"}],
             "range": [1, 10], "pass_threshold": 5.5}
    scores = [read_score(_judge_answer(stack, judge, r)) for r in rows]
    assert all(s is not None and 1 <= s <= 10 for s in scores), scores
    expected_pass = {i for i, score in enumerate(scores) if score >= 5.5}
    assert 0 < len(expected_pass) < 10, scores  # the data has both outcomes
    client = _client(stack)
    created = client.evals.create(
        data_source_config={"type": "custom", "item_schema": _schema("question"),
                            "include_sample_schema": True},
        testing_criteria=[judge])
    assert created.testing_criteria[0].type == "score_model"
    run = client.evals.runs.create(created.id, data_source={
        "type": "jsonl", "source": {"type": "file_content", "content": rows}})
    done = _wait_run(client, created.id, run.id)
    assert done.status == "completed", done
    counts = done.result_counts
    assert (counts.total, counts.passed, counts.failed, counts.errored) == (
        10, len(expected_pass), 10 - len(expected_pass), 0)
    items = _items(client, created.id, run.id)
    got = {i.datasource_item_id: (i.results[0].score, i.results[0].passed) for i in items}
    assert got == {i: (pytest.approx(s), i in expected_pass) for i, s in enumerate(scores)}
    assert done.per_model_usage[0].invocation_count == 10


@pytest.mark.parametrize(("change", "param"), [
    ({"range": [10, 1]}, "testing_criteria[0].range"),
    ({"range": [0, "ten"]}, "testing_criteria[0].range"),
    ({"pass_threshold": 11}, "testing_criteria[0].pass_threshold"),
    ({"model": "no/such"}, "testing_criteria[0].model"),
])
def test_bad_score_model_criteria_are_400(stack, change, param):
    criterion = {"type": "score_model", "name": "grade", "model": "sim/batch",
                 "input": [{"role": "user", "content": "{{item.question}}"}],
                 "range": [0, 10], **change}
    with pytest.raises(openai.BadRequestError) as error:
        _client(stack).evals.create(
            data_source_config={"type": "custom", "item_schema": _schema("question")},
            testing_criteria=[criterion])
    assert error.value.body["param"] == param


def test_grading_only_from_item_fields(stack):
    client = _client(stack)
    created = client.evals.create(
        data_source_config={"type": "custom", "item_schema": _schema("output", "expected")},
        testing_criteria=[{"type": "string_check", "name": "same", "operation": "eq",
                           "input": "{{item.output}}", "reference": "{{item.expected}}"}])
    rows = [{"item": {"output": "4", "expected": "4"}}, {"item": {"output": "5", "expected": "4"}},
            {"item": {"output": "x", "expected": "x"}}]
    run = client.evals.runs.create(created.id, data_source={
        "type": "jsonl", "source": {"type": "file_content", "content": rows}})
    done = _wait_run(client, created.id, run.id, timeout=60)
    assert done.status == "completed" and done.model is None
    assert (done.result_counts.passed, done.result_counts.failed) == (2, 1)
    assert done.per_model_usage == []
    assert [i.status for i in _items(client, created.id, run.id)] == ["pass", "fail", "pass"]


BASE = {"data_source_config": {"type": "custom", "item_schema": _schema("question", "answer"),
                               "include_sample_schema": True},
        "testing_criteria": [{"type": "string_check", "name": "exact", "operation": "eq",
                              "input": "{{sample.output_text}}",
                              "reference": "{{item.answer}}"}]}
JUDGE = {"type": "label_model", "name": "judge", "model": "sim/batch",
         "input": [{"role": "user", "content": "{{sample.output_text}}"}],
         "labels": ["good", "bad"], "passing_labels": ["good"]}


@pytest.mark.parametrize(("criterion", "config", "param"), [
    ({"type": "regex", "name": "x"}, None, "testing_criteria[0].type"),
    ({**BASE["testing_criteria"][0], "reference": "{{item.answr}}"}, None,
     "testing_criteria[0].reference"),
    ({**JUDGE, "model": "no/such"}, None, "testing_criteria[0].model"),
    ({key: value for key, value in JUDGE.items() if key != "labels"}, None,
     "testing_criteria[0].labels"),
    ({**JUDGE, "passing_labels": ["fine"]}, None, "testing_criteria[0].passing_labels"),
    (None, {"type": "custom", "item_schema": {"type": "objekt"}},
     "data_source_config.item_schema"),
])
def test_bad_definitions_are_400_naming_the_field(stack, criterion, config, param):
    with pytest.raises(openai.BadRequestError) as caught:
        _client(stack).evals.create(
            data_source_config=config or BASE["data_source_config"],
            testing_criteria=[criterion or BASE["testing_criteria"][0]])
    assert caught.value.body["param"] == param
    assert caught.value.body["code"] == "invalid_value"
    assert param.rsplit(".", 1)[-1].split("[")[0] in caught.value.body["message"]


def test_bad_runs_are_refused_or_fail(stack):
    client = _client(stack)
    created = client.evals.create(**BASE)
    good_row = {"item": {"question": "q", "answer": "a"}}
    cases = [
        ({**_completions("no/such", [good_row], 2)}, "data_source.model"),
        (_completions("sim/fast", [good_row], 2, user="{{item.missing}}"),
         "data_source.input_messages.template[1].content"),
        (_completions("sim/fast", [good_row, {"item": {"question": "q"}}], 2),
         "data_source.source.content"),
        ({"type": "jsonl", "source": {"type": "file_id", "id": "file-nope"}},
         "data_source.source.id"),
    ]
    for data_source, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.evals.runs.create(created.id, data_source=data_source)
        assert caught.value.body["param"] == param, caught.value.body
    # A file is read by a worker: a bad line fails the run, with the line named.
    file_id = _upload(stack, [good_row, good_row, {"item": {"question": 3, "answer": "a"}}])
    run = client.evals.runs.create(created.id, data_source={
        "type": "jsonl", "source": {"type": "file_id", "id": file_id}})
    failed = _wait_run(client, created.id, run.id, timeout=60)
    assert failed.status == "failed"
    assert failed.error.code == "invalid_item" and "line 3" in failed.error.message


def test_evals_are_listed_paged_updated_and_deleted(stack):
    client = _client(stack)
    made = [client.evals.create(name=f"paged {i}", **BASE) for i in range(3)]
    ids = [e.id for e in made]
    listed = [e.id for e in client.evals.list(limit=2) if e.id in ids]  # all pages
    assert listed == ids
    newest = client.evals.list(limit=1, order="desc")
    assert newest.data[0].id == ids[-1] and newest.has_more
    assert client.evals.update(ids[0], name="renamed").name == "renamed"
    assert client.evals.retrieve(ids[0]).name == "renamed"
    deleted = client.evals.delete(ids[1])
    assert deleted.deleted and deleted.eval_id == ids[1]
    with pytest.raises(openai.NotFoundError):
        client.evals.retrieve(ids[1])
    with pytest.raises(openai.PermissionDeniedError):
        sdk(stack, TOKENS["realtime"]).evals.list()
    with pytest.raises(openai.NotFoundError):
        client.evals.retrieve("eval_nope")


def _slow_run(stack, client, count: int, expect_every: int = 4):
    """A run on the slow engine (4 at a time, 300 ms each) graded on the items alone, so its
    counts are known whatever the engine says: every `expect_every`-th item passes."""
    created = client.evals.create(
        data_source_config={"type": "custom", "item_schema": _schema("question", "expect"),
                            "include_sample_schema": True},
        testing_criteria=[{"type": "string_check", "name": "marked", "operation": "eq",
                           "input": "{{item.expect}}", "reference": "x"}])
    rows = [{"item": {"question": f"slow {i}", "expect": "x" if i % expect_every == 0 else "y"}}
            for i in range(count)]
    run = client.evals.runs.create(created.id, data_source=_completions("sim/slowbatch", rows, 1))
    return created, run


def test_cancel_a_run_keeps_what_was_graded(stack):
    warm(stack, "sim/slowbatch")
    client = _client(stack)
    created, run = _slow_run(stack, client, 200)
    wait_for(lambda: client.evals.runs.retrieve(run.id, eval_id=created.id).result_counts.total
             >= 8, 60, interval=0.1, what="some items graded")
    cancelled = client.evals.runs.cancel(run.id, eval_id=created.id)
    assert cancelled.status == "canceled"
    time.sleep(2)  # lines already at the engine land; no new ones start
    settled = client.evals.runs.retrieve(run.id, eval_id=created.id)
    assert settled.status == "canceled"
    assert 8 <= settled.result_counts.total < 200
    items = _items(client, created.id, run.id, limit=100)
    assert len(items) == settled.result_counts.total
    assert len({i.datasource_item_id for i in items}) == len(items)
    listed = client.evals.runs.list(created.id, status="canceled")
    assert [r.id for r in listed.data] == [run.id]
    assert client.evals.runs.delete(run.id, eval_id=created.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve(run.id, eval_id=created.id)


def test_a_killed_worker_grades_every_item_once(stack):
    warm(stack, "sim/slowbatch")
    client = _client(stack)
    created, run = _slow_run(stack, client, 120)
    wait_for(lambda: client.evals.runs.retrieve(run.id, eval_id=created.id).result_counts.total
             >= 20, 60, interval=0.1, what="the run to be under way")
    stack.stop_process("batch", sig=signal.SIGKILL)
    stopped_at = client.evals.runs.retrieve(run.id, eval_id=created.id).result_counts.total
    assert stopped_at < 120, "the run finished before the worker could be killed"
    stack.start_batch_worker("batch")  # takes over the unacknowledged chunks
    done = _wait_run(client, created.id, run.id, timeout=180)
    assert done.status == "completed"
    counts = done.result_counts
    assert (counts.total, counts.passed, counts.failed, counts.errored) == (120, 30, 90, 0)
    usage = {u.run_model_name: u for u in done.per_model_usage}
    assert usage["sim/slowbatch"].invocation_count == 120  # counted with the item, once
    items = _items(client, created.id, run.id, limit=100)
    assert sorted(i.datasource_item_id for i in items) == list(range(120))
