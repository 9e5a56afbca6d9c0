"""The model storage API (scope `upload`; reads also `monitor`): downloads, the cache, priming.

- `POST /v1/models/{model}/download`: fetch the model's weights into the shared HF cache; 202
  with the download's `status_url` (`GET` it for bytes done and total, rate and ETA). Asking
  again while it runs answers the same download.
- `GET /v1/models/cache`: the cached repos with size, revisions, last use, runtimes using them
  and how much of their weights is in RAM; `DELETE /v1/models/cache/{model}` removes one (409
  while a runtime or a download uses it).
- `POST /v1/models/{model}/prime`: read the weights into the page cache now (say, before the
  9 a.m. rush); 202 with its `status_url`.

Model ids hold a slash (`org/name`), hence the `path` converters; `{model}` is a catalog id (the
cache deletion also takes a repo id, for repos no catalog entry names any more).
"""

from __future__ import annotations

from flask import Blueprint, g, url_for

from runtimes.catalog import ModelSpec
from runtimes.storage import free_bytes, hub_dir
from runtimes.weight_cache import NotCached, WeightsInUse
from runtimes.weights import ModelWeights
from webapp.apidoc import documented
from webapp.auth import check_model_allowed, require_scope
from webapp.context import services
from webapp.errors import APIError

bp = Blueprint("models", __name__)


def _weights() -> ModelWeights:
    return services().weights


def _spec(model: str) -> ModelSpec:
    spec = services().catalog.get(model)
    if spec is None:
        raise APIError(404, f"The model '{model}' does not exist.", code="model_not_found",
                       param="model")
    check_model_allowed(g.api_key, spec.id)
    return spec


def _download_view(spec: ModelSpec, state: dict) -> dict:
    total, done = state.get("bytes_total"), state.get("bytes_done")
    return {
        "object": "model.download",
        "model": spec.id,
        "repo_id": spec.repo_id,
        "revision": state.get("revision") or spec.revision or "main",
        "commit": state.get("commit"),
        "status": state.get("status"),
        "bytes_done": done,
        "bytes_total": total,
        "progress": round(done / total, 4) if total and done is not None else None,
        "rate_bytes_per_second": state.get("rate_bytes_per_second"),
        "eta_seconds": state.get("eta_seconds"),
        "files_total": state.get("files_total"),
        "error": state.get("error"),
        "requested_at": state.get("requested_at"),
        "started_at": state.get("started_at"),
        "finished_at": state.get("finished_at"),
        "status_url": url_for("models.download_status", model=spec.id),
    }


@bp.post("/v1/models/<path:model>/download")
@require_scope("upload")
@documented("Fetch a model's weights into the shared cache",
            responses={202: "Asked for: the download, with its status_url."})
def download(model: str):
    spec = _spec(model)
    state, _ = _weights().downloads.ask_download(spec)
    view = _download_view(spec, state)
    return view, 202, {"Location": view["status_url"]}


@bp.get("/v1/models/<path:model>/download")
@require_scope("upload", "monitor")
@documented("A download's progress")
def download_status(model: str):
    spec = _spec(model)
    state = _weights().downloads.download_state(spec)
    if state is None:
        raise APIError(404, f"No download of '{spec.id}' was asked for.",
                       code="download_not_found", param="model")
    return _download_view(spec, state)


@bp.get("/v1/models/cache")
@require_scope("upload", "monitor")
@documented("The cached repos, their size and residency")
def list_cache():
    weights = _weights()
    return {"object": "list", "data": weights.disk.cached(weights.pages.seen_residency),
            "free_bytes": free_bytes(hub_dir(weights.disk.hf_home))}


@bp.delete("/v1/models/cache/<path:model>")
@require_scope("upload")
@documented("Remove a model from the cache (409 while in use)")
def delete_cached(model: str):
    spec = services().catalog.get(model)
    if spec is not None:
        check_model_allowed(g.api_key, spec.id)
    try:
        deleted = _weights().disk.delete(model)
    except NotCached as exc:
        raise APIError(404, str(exc), code="model_not_cached", param="model") from None
    except WeightsInUse as exc:
        raise APIError(409, str(exc), code="model_in_use", param="model") from None
    return {"object": "model.cache.deleted", "deleted": True, **deleted}


def _prime_view(spec: ModelSpec, state: dict) -> dict:
    return {"object": "model.prime", "model": spec.id, "repo_id": spec.repo_id, **{
        k: state.get(k) for k in ("status", "read_bytes", "seconds", "gb_per_second",
                                  "files_read", "files_skipped", "budget_bytes", "before",
                                  "after", "error", "requested_at", "started_at", "finished_at")
    }, "status_url": url_for("models.prime_status", model=spec.id)}


@bp.post("/v1/models/<path:model>/prime")
@require_scope("upload")
@documented("Read a model's weights into the page cache",
            responses={202: "Asked for: the priming, with its status_url."})
def prime(model: str):
    spec = _spec(model)
    try:
        state, _ = _weights().pages.ask_prime(spec, services().queue.send_prime)
    except NotCached as exc:
        raise APIError(409, str(exc), code="model_not_cached", param="model") from None
    view = _prime_view(spec, state)
    return view, 202, {"Location": view["status_url"]}


@bp.get("/v1/models/<path:model>/prime")
@require_scope("upload", "monitor")
@documented("A priming's report")
def prime_status(model: str):
    spec = _spec(model)
    state = _weights().pages.prime_state(spec)
    if state is None:
        raise APIError(404, f"No priming of '{spec.id}' was asked for.", code="prime_not_found",
                       param="model")
    view = _prime_view(spec, state)
    # As the workers last measured it (runtimes.page_cache.PageCache.note_residency): never
    # a mincore over the weights in a web worker.
    view["residency"] = _weights().pages.seen_residency(spec.repo_id)
    return view
