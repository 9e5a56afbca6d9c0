"""gunicorn settings for the web process: gevent workers, fit for many long streams.

The worker class answers the requests gunicorn refuses itself (limits, malformed requests) in
the API's JSON envelope (webapp.gunicorn_worker); the logger class escapes what its access and
error logs write and cuts query strings from the error log (webapp.gunicorn_logger).

Environment: WEB_BIND (default 127.0.0.1:8000; compose sets 0.0.0.0:8000 inside its container),
WEB_CONCURRENCY (worker processes, default 2), WEB_WORKER_CONNECTIONS (concurrent calls per
worker, default 2000).
"""

import importlib
import os
import resource
import socket
import sys
import types
from pathlib import Path

# Each stream holds two sockets (client and engine): lift the soft limit on open files to the
# hard one, since distributions default to 1024, too few for a thousand streams.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


def _load_gunicorn_side(module: str) -> types.ModuleType:
    """webapp/<module>.py, loaded without running webapp/__init__.py.

    gunicorn's master loads the worker and logger classes before it forks; importing them as
    `webapp.<module>` would import the whole app there (Flask, Redis, urllib3, ssl), before the
    gevent workers monkey-patch, and leave those modules unpatched in every worker. They are
    loaded as modules of a stand-in package with this directory as its path, so their relative
    imports of one another work as they do within `webapp`.
    """
    package = sys.modules.get("_gateway_gunicorn")
    if package is None:
        package = types.ModuleType("_gateway_gunicorn")
        package.__path__ = [str(Path(__file__).resolve().parent)]
        sys.modules[package.__name__] = package
    return importlib.import_module(f"{package.__name__}.{module}")


bind = os.environ.get("WEB_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# gunicorn's gevent worker, answering the requests gunicorn refuses itself as JSON errors.
worker_class = _load_gunicorn_side("gunicorn_worker").GatewayWorker
worker_connections = int(os.environ.get("WEB_WORKER_CONNECTIONS", "2000"))
# Streams may last minutes; the gevent worker heartbeats independently of requests.
timeout = 60
graceful_timeout = 30
keepalive = 75
# The request line's query string is left out on purpose: `/ui/api/...?key=` carries a token.
accesslog = "-" if os.environ.get("WEB_ACCESS_LOG", "1") == "1" else None
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms rid=%({x-request-id}o)s'
errorlog = "-"
# Escapes every access-log atom (the path is the caller's), and cuts query strings from the
# error log's messages (gunicorn names whole URIs there) before escaping them.
logger_class = _load_gunicorn_side("gunicorn_logger").GatewayLogger
# gunicorn's runtime control socket is one fixed path per user: several stacks on one machine
# (tests, benchmarks) would fight over it, and nothing here uses it.
control_socket_disable = True


def post_worker_init(worker):
    # The usage reporter also samples queue depths for the dashboard's charts: run it from the
    # start, not from the first realtime call.
    gateway = getattr(worker.wsgi, "extensions", {}).get("gateway")
    if gateway is not None:
        gateway.usage.start()


def child_exit(server, worker):
    # prometheus_client's multiprocess mode (webapp.metrics): a dead worker's files stop
    # counting as live. Its files are named `<pid>@<host>` (webapp.metrics.process_identifier).
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(f"{worker.pid}@{socket.gethostname()}")
