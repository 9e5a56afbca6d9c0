"""The operator's dashboard: the page `/dashboard` (public) and its data API `/ui/api/...`.

The page holds no data and no secret; it asks for a token and calls the API with it as a Bearer
header. The API needs the `monitor` scope, as Bearer or as `?key=` (these endpoints only: a link
with the key is how an operator opens the page; the page then drops the key from its address).

- `GET /ui/api/overview`: runtimes and GPUs, starts and failures, queues, jobs, downloads,
  the autoscaler's decisions (webapp.overview); polled every few seconds.
- `GET /ui/api/series?minutes=60`: the charts' time series (services.timeseries).
- `POST /ui/api/models/<model>/reset`: clear a model marked failed after failed starts, so the
  next call starts it again. A `monitor` key may do this: it is the one operator action, it
  only lets the autoscaler try again (as `python -m runtimes reset MODEL` does), and it is
  recorded among the decisions with the key's name.
"""

from __future__ import annotations

import logging
import time

from flask import Blueprint, g, render_template

from webapp import overview
from webapp.apidoc import accepts, documented
from webapp.arguments import SeriesQuery
from webapp.auth import require_scope
from webapp.context import gateway, services
from webapp.errors import APIError

log = logging.getLogger(__name__)

bp = Blueprint("dashboard", __name__)

# The page loads only its own script, styles and the vendored chart library: it works on a
# network without Internet access, and an injected script from elsewhere would not run.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    # The address may hold `?key=` until the script drops it: never send it elsewhere.
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


@bp.get("/dashboard")
@documented("The operator's page (public; its data needs `monitor`)", content_type="text/html")
def page():
    settings = services().settings
    html = render_template("dashboard.html", flower_url=settings.flower_url or "",
                           flower_port=settings.flower_port)
    return html, 200, PAGE_HEADERS


@bp.get("/ui/api/overview")
@require_scope("monitor", allow_query_key=True)
@documented("Runtimes, GPUs, queues, jobs, downloads and decisions (status and counts)")
def overview_data():
    return overview.overview(gateway(), project=g.api_key.project)


@bp.get("/ui/api/series")
@require_scope("monitor", allow_query_key=True)
@accepts(query=SeriesQuery(), summary="The charts' time series, 10-second buckets")
def series_data(args: dict):
    return services().series.read(args["minutes"] * 60)


@bp.post("/ui/api/models/<path:model>/reset")
@require_scope("monitor", allow_query_key=True)
@documented("Clear a model marked failed, so it may be started again")
def reset_model(model: str):
    if model not in services().catalog:
        raise APIError(404, f"The model '{model}' does not exist.", code="model_not_found",
                       param="model")
    registry = services().registry
    before = registry.failed_starts().get(model, 0)
    registry.reset_model(model)
    who = g.api_key.name
    registry.record_decisions([{
        "at": time.time(), "action": "reset", "model": model, "instance": "",
        "reason": f"reset by an operator (key '{who}') after {before} failed starts",
    }])
    log.info("model %s reset by key %s (%d failed starts)", model, who, before)
    return {"model": model, "reset": True, "failed_starts_before": before}
