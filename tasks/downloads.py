"""Download and priming tasks (queue `downloads`): fetch a model's weights, read them into RAM.

Thin: each takes a model id and calls one part of `runtimes.weights.ModelWeights` (`downloads`,
`pages`). Both are deduplicated before they are sent (a Redis `SET NX` per repo and revision) and
again when they run (a Redis lock), so a redelivered or repeated message does no harm.
"""

from __future__ import annotations

import logging

from celery import shared_task

from runtimes.downloads import DownloadError

log = logging.getLogger(__name__)


@shared_task(name="downloads.download_model_async", bind=True, ignore_result=True)
def download_model_async(self, model: str, for_start: bool = False) -> None:
    services = self.app.services
    try:
        state = services.weights.downloads.download(model, for_start=for_start)
    except DownloadError:
        return  # the reason is in the download's state (and the model's failed start)
    if state.get("status") == "done" and services.weights.downloads.start_wanted(model):
        # A caller is waiting: start now rather than on the autoscaler's next look.
        services.request_start(model)


@shared_task(name="downloads.prime_model", bind=True, ignore_result=True)
def prime_model(self, model: str) -> None:
    try:
        self.app.services.weights.pages.prime(model)
    except (OSError, RuntimeError) as exc:
        log.error("priming %s failed: %s", model, exc)
