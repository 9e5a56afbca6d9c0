#!/usr/bin/env bash
# `make run`: the whole orchestrator in the foreground on this machine.
#   web (gunicorn + gevent, :8000), Celery workers (control + downloads, batch), Celery beat,
#   Flower (:5555). Ctrl-C or SIGTERM stops every child; then the runtimes the stack started are
#   stopped too, unless KEEP_RUNTIMES_ON_EXIT=true leaves them for the next start to adopt.
# With no .env (or $ENV_FILE), it runs the sim engine through the process backend with the example keys.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export VAR_DIR="${VAR_DIR:-var}"  # pid, log and data files of what this script starts

ENV_FILE="${ENV_FILE:-.env}"
export ENV_FILE
if [ ! -f "$ENV_FILE" ]; then
  export RUNTIME_TYPE="${RUNTIME_TYPE:-sim}"
  export RUNTIME_BACKEND="${RUNTIME_BACKEND:-process}"
  export AUTH_KEYS_FILE="${AUTH_KEYS_FILE:-config/example.keys.json}"
  export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
  echo "WARNING: no .env: using the sim engine and config/example.keys.json." >&2
  echo "WARNING: the example tokens (example-realtime-token, ...) are public; do not expose this port." >&2
else
  # Like the settings loader: the environment wins over the file.
  while IFS='=' read -r key value; do
    [[ $key =~ ^[A-Z_][A-Z0-9_]*$ ]] || continue
    [ -n "${!key+x}" ] || export "$key=$value"
  done < "$ENV_FILE"
fi
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
# Prometheus values of every process (web workers, Celery workers), summed by /metrics. Set
# before any process starts; emptied so counts of an earlier run are not added again.
export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-$VAR_DIR/prometheus}"
mkdir -p "$PROMETHEUS_MULTIPROC_DIR" && rm -f "$PROMETHEUS_MULTIPROC_DIR"/*.db

# Check the settings once, up front: a missing or bad value stops here with its name.
$BIN/python -c "from config.settings import load_settings; from webapp.keystore import read_keys_file; \
from runtimes.catalog import ModelCatalog; s = load_settings(); read_keys_file(s.auth_keys_file); \
ModelCatalog.from_file(s.model_catalog_file, s.runtime_type)" || exit 2

scripts/ensure-redis.sh || exit 1

pids=()
start() {  # name, command...: each child leads its own process group
  local name=$1; shift
  setsid "$@" > >(sed -u "s/^/[$name] /") 2>&1 &
  pids+=($!)
}
stopping=0
stop_all() {
  [ $stopping = 1 ] && return; stopping=1
  echo "stopping the stack..."
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
  for _ in $(seq 100); do
    alive=0; for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
  $BIN/python -m runtimes stop-all --unless-kept
  if [ -f "$VAR_DIR/redis/started-by-run" ]; then
    redis-cli -u "$REDIS_URL" shutdown >/dev/null 2>&1 && echo "redis: stopped (its data stays in $VAR_DIR/redis)"
    rm -f "$VAR_DIR/redis/started-by-run"
  fi
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

mkdir -p "$VAR_DIR"
WEB_BIND="${WEB_BIND:-0.0.0.0:${WEB_PORT:-8000}}" start web $BIN/gunicorn -c webapp/gunicorn_conf.py webapp.wsgi:app
start control $BIN/celery -A tasks.worker worker -Q control,downloads -P threads -c 8 -n control@%h -l INFO
start batch $BIN/celery -A tasks.worker worker -Q batch -P gevent -c "${BATCH_WORKER_CONCURRENCY:-64}" -n batch@%h -l INFO
start beat $BIN/celery -A tasks.worker beat --schedule "$VAR_DIR/celerybeat-schedule" -l INFO
flower_auth=(); [ -n "${FLOWER_BASIC_AUTH:-}" ] && flower_auth=(--basic-auth="$FLOWER_BASIC_AUTH")
# Flower keeps its own metrics (on its /metrics): out of the gateway's directory.
start flower env -u PROMETHEUS_MULTIPROC_DIR $BIN/celery -A tasks.worker flower --port="${FLOWER_PORT:-5555}" "${flower_auth[@]}"

echo "orchestrator: http://localhost:${WEB_PORT:-8000}  flower: http://localhost:${FLOWER_PORT:-5555}"
# If any child dies, stop the rest: a half-running stack is worse than a stopped one.
wait -n "${pids[@]}"
echo "a process of the stack exited; stopping the others" >&2
stop_all
exit 1
