"""gunicorn settings for the web process: gevent workers, fit for many long streams.

Environment: WEB_BIND (default 0.0.0.0:8000), WEB_CONCURRENCY (worker processes, default 2),
WEB_WORKER_CONNECTIONS (concurrent calls per worker, default 2000).
"""

import logging
import os
import re
import resource
import socket

# Each stream holds two sockets (client and engine): lift the soft limit on open files to the
# hard one, since distributions default to 1024, too few for a thousand streams.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))

bind = os.environ.get("WEB_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gevent"
worker_connections = int(os.environ.get("WEB_WORKER_CONNECTIONS", "2000"))
# Streams may last minutes; the gevent worker heartbeats independently of requests.
timeout = 60
graceful_timeout = 30
keepalive = 75
# The request line's query string is left out on purpose: `/ui/api/...?key=` carries a token.
accesslog = "-" if os.environ.get("WEB_ACCESS_LOG", "1") == "1" else None
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms rid=%({x-request-id}o)s'
errorlog = "-"
# gunicorn's runtime control socket is one fixed path per user: several stacks on one machine
# (tests, benchmarks) would fight over it, and nothing here uses it.
control_socket_disable = True

# gunicorn's error log names the whole URI of a request it could not handle (or parse), query
# string and all; `/ui/api/...?key=` carries a token, so query strings are cut from its messages.
_QUERY = re.compile(r"\?[^\s'\"]*")


class _NoQueryStrings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message:
            record.msg, record.args = _QUERY.sub("?[query removed]", message), None
        return True


def on_starting(server):
    server.log.error_log.addFilter(_NoQueryStrings())


def post_worker_init(worker):
    # The usage reporter also samples queue depths for the dashboard's charts: run it from the
    # start, not from the first realtime call.
    usage = getattr(worker.wsgi, "extensions", {}).get("usage")
    if usage is not None:
        usage.start()


def child_exit(server, worker):
    # prometheus_client's multiprocess mode (webapp.metrics): a dead worker's files stop
    # counting as live. Its files are named `<pid>@<host>` (webapp.metrics.process_identifier).
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(f"{worker.pid}@{socket.gethostname()}")
