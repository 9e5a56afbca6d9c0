"""gunicorn settings for the web process: gevent workers, fit for many long streams.

Environment: WEB_BIND (default 0.0.0.0:8000), WEB_CONCURRENCY (worker processes, default 2),
WEB_WORKER_CONNECTIONS (concurrent calls per worker, default 2000).
"""

import os

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
