"""Download and priming tasks (queue `downloads`): fetch a model's weights, read them into RAM.

Thin: each takes a model id and calls `runtimes.weights.ModelWeights`. Both are deduplicated
before they are sent (a Redis `SET NX` per repo and revision) and again when they run (a Redis
lock), so a redelivered or repeated message does no harm.
"""

from __future__ import annotations

import logging

from celery import shared_task
from flask import current_app

from runtimes.downloads import DownloadError

log = logging.getLogger(__name__)


@shared_task(name="downloads.download_model_async", ignore_result=True)
def download_model_async(model: str, for_start: bool = False) -> None:
    ext = current_app.extensions
    weights = ext["weights"]
    try:
        state = weights.download(model, for_start=for_start)
    except DownloadError:
        return  # the reason is in the download's state (and the model's failed start)
    if state.get("status") == "done" and weights.start_wanted(model):
        # A caller is waiting: start now rather than on the autoscaler's next look.
        ext["request_start"](model)


@shared_task(name="downloads.prime_model", ignore_result=True)
def prime_model(model: str) -> None:
    try:
        current_app.extensions["weights"].prime(model)
    except (OSError, RuntimeError) as exc:
        log.error("priming %s failed: %s", model, exc)


def download_requester():
    """A function that sends one download task (ModelWeights deduplicates before calling it)."""

    def request_download(model: str, for_start: bool = False) -> None:
        download_model_async.apply_async(args=[model, for_start], queue="downloads")

    return request_download


def enqueue_prime(model: str) -> None:
    prime_model.apply_async(args=[model], queue="downloads")
