"""The job domain's records as OpenAI's objects: `Batch`, `Eval` and `EvalRun`.

The stores keep what the jobs need (owners, projects, chunks, snapshots of criteria); these
functions say what a client sees of it. The web API's alone.
"""

from __future__ import annotations

EVAL_FIELDS = ("object", "id", "name", "created_at", "metadata", "data_source_config",
               "testing_criteria")
USAGE_FIELDS = ("invocation_count", "prompt_tokens", "completion_tokens", "total_tokens",
                "cached_tokens")


def batch_object(job: dict) -> dict:
    """A stored batch job as OpenAI's `Batch` object."""
    status = job["status"]
    if status == "expiring":
        status = "finalizing"
    return {
        "id": job["id"], "object": "batch", "endpoint": job["endpoint"],
        "errors": job.get("errors"), "input_file_id": job["input_file_id"],
        "completion_window": job["completion_window"], "status": status,
        "output_file_id": job.get("output_file_id"), "error_file_id": job.get("error_file_id"),
        "created_at": job["created_at"], "in_progress_at": job.get("in_progress_at"),
        "expires_at": job.get("expires_at"), "finalizing_at": job.get("finalizing_at"),
        "completed_at": job.get("completed_at"), "failed_at": job.get("failed_at"),
        "expired_at": job.get("expired_at"), "cancelling_at": job.get("cancelling_at"),
        "cancelled_at": job.get("cancelled_at"),
        "request_counts": {"total": job.get("total") or 0, "completed": job.get("completed") or 0,
                           "failed": job.get("failed") or 0},
        "metadata": job.get("metadata"),
        # Not OpenAI's: why a batch in progress runs no lines now (its owner's daily budget).
        "waiting_reason": job.get("waiting_reason"),
    }


def public_eval(record: dict) -> dict:
    """A stored eval as OpenAI's `Eval` object."""
    return {name: record.get(name) for name in EVAL_FIELDS}


def run_object(job: dict, tally: dict[str, int]) -> dict:
    """A stored run as OpenAI's `EvalRun` (`report_url` is the web app's to fill in)."""
    errored = job.get("failed") or 0
    passed, failed = tally.get("passed", 0), tally.get("failed", 0)
    usage: dict[str, dict] = {}
    for field, value in tally.items():
        if field.startswith("usage:"):
            model, _, name = field.removeprefix("usage:").rpartition(":")
            usage.setdefault(model, dict.fromkeys(USAGE_FIELDS, 0))[name] = value
    return {
        "object": "eval.run", "id": job["id"], "eval_id": job["eval_id"], "name": job["name"],
        "model": job.get("model"), "status": job["status"], "created_at": job["created_at"],
        "data_source": job["data_source"], "metadata": job.get("metadata"),
        "error": job.get("error"),
        "result_counts": {"total": passed + failed + errored, "passed": passed,
                          "failed": failed, "errored": errored},
        "per_testing_criteria_results": [
            {"testing_criteria": criterion["name"],
             "passed": tally.get(f"criterion:{index}:passed", 0),
             "failed": tally.get(f"criterion:{index}:failed", 0)}
            for index, criterion in enumerate(job["testing_criteria"])
        ],
        "per_model_usage": [{"model_name": model, **counts}
                            for model, counts in sorted(usage.items())],
        "report_url": None,
    }
