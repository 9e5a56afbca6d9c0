#!/usr/bin/env bash
# Entrypoint of the orchestrator image (Dockerfile): the command names the role.
#
#   web             gunicorn (gevent) on $WEB_BIND (the image sets 0.0.0.0:8000)
#   worker-batch    Celery worker of the `batch` queue, gevent pool
#   worker-control  Celery worker of `control,downloads`, threads pool; starts and stops engines.
#                   Stopped (SIGTERM/SIGINT: docker-compose stop/down, Ctrl-C), it stops the
#                   engines it started, unless KEEP_RUNTIMES_ON_EXIT=true leaves them running for
#                   the next start to adopt.
#   beat            Celery beat (one per deployment)
#   flower          Flower on :5555, with basic auth when FLOWER_BASIC_AUTH (user:password) is set
#   anything else   run as given (e.g. `python -m runtimes status`)
#
# Meant to run under an init (compose's `init: true`), which passes signals on to this script.
set -uo pipefail
cd /app
level="${LOG_LEVEL:-INFO}"

# How long the control worker may finish its tasks after a stop request before it is told to quit
# at once. A task may be waiting minutes for an engine to load; the engines must still be stopped
# before compose's stop_grace_period runs out and the container is killed.
CONTROL_STOP_SECONDS="${CONTROL_STOP_SECONDS:-15}"

control_worker() {
  celery -A tasks.worker worker -Q control,downloads -P threads -c 8 -n "control@%h" -l "$level" &
  pid=$! stop_requested=0
  local status watchdog
  trap 'stop_requested=1; kill -TERM "$pid" 2>/dev/null' TERM INT
  wait "$pid"; status=$?
  if [ "$stop_requested" = 0 ]; then
    # Celery stopped by itself (a crash): keep the engines; the restarted worker adopts them.
    exit "$status"
  fi
  # The first wait was cut short by the signal; Celery is shutting down warm (finishing tasks).
  # Past the grace, SIGQUIT: a cold shutdown that gives the unfinished tasks' messages back to
  # the queue at once (the threads pool logs a traceback for the tasks it cannot kill: harmless).
  ( sleep "$CONTROL_STOP_SECONDS"; kill -QUIT "$pid" 2>/dev/null; sleep 5; kill -KILL "$pid" 2>/dev/null ) &
  watchdog=$!
  wait "$pid"; status=$?
  kill "$watchdog" 2>/dev/null
  # Engines are containers made through the Docker API, not compose services: compose would
  # leave them running. `--unless-kept` honours KEEP_RUNTIMES_ON_EXIT.
  python -m runtimes stop-all --unless-kept || echo "worker-control: stopping the engines failed" >&2
  exit "$status"
}

role="${1:-web}"
case "$role" in
  web)
    exec gunicorn -c webapp/gunicorn_conf.py webapp.wsgi:app ;;
  worker-batch)
    exec celery -A tasks.worker worker -Q batch -P gevent -c "${BATCH_WORKER_CONCURRENCY:-64}" \
      -n "batch@%h" -l "$level" ;;
  worker-control)
    control_worker ;;
  beat)
    # The schedule file only records last run times of interval tasks: a temporary file will do.
    exec celery -A tasks.worker beat --schedule /tmp/celerybeat-schedule -l "$level" ;;
  flower)
    # Flower reads every FLOWER_* variable itself: an empty FLOWER_BASIC_AUTH would become one
    # empty credential that no one can give, and FLOWER_PORT is the port published on the host.
    # Flower serves its own Prometheus metrics, which must not go to the shared directory (as in
    # scripts/run-stack.sh).
    auth="${FLOWER_BASIC_AUTH:-}"
    unset FLOWER_BASIC_AUTH FLOWER_PORT PROMETHEUS_MULTIPROC_DIR
    args=(--port=5555)
    [ -n "$auth" ] && args+=("--basic-auth=$auth")
    exec celery -A tasks.worker flower "${args[@]}" ;;
  *)
    exec "$@" ;;
esac
