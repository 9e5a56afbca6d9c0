#!/usr/bin/env bash
# `make run`: the whole orchestrator in the foreground on this machine.
#   web (gunicorn + gevent, 127.0.0.1:8000), Celery workers (control + downloads, batch), Celery
#   beat, Flower (127.0.0.1:5555). Ctrl-C or SIGTERM stops every child; then the runtimes the
#   stack started are stopped too, unless KEEP_RUNTIMES_ON_EXIT=true leaves them for the next
#   start to adopt; then the Redis it started. More signals during that stop change nothing: the
#   clean-up runs once, to its end.
# With no .env (or $ENV_FILE), it runs on config/checkout.env: the sim engine through the process
# backend with the example keys (config/settings.py reads that file in the same case).
# Both listen on loopback unless WEB_BIND / FLOWER_BIND say otherwise; Flower is not bound beyond
# loopback without FLOWER_BASIC_AUTH.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export VAR_DIR="${VAR_DIR:-var}"  # pid, log and data files of what this script starts

ENV_FILE="${ENV_FILE:-.env}"
export ENV_FILE
settings_file=$ENV_FILE
if [ ! -f "$ENV_FILE" ]; then
  settings_file=config/checkout.env
  echo "WARNING: no $ENV_FILE: using $settings_file (the sim engine and config/example.keys.json)." >&2
  echo "WARNING: the example tokens (example-realtime-token, ...) are public; do not expose this port." >&2
fi
# Like the settings loader: the environment wins over the file.
while IFS='=' read -r key value; do
  [[ $key =~ ^[A-Z_][A-Z0-9_]*$ ]] || continue
  [ -n "${!key+x}" ] || export "$key=$value"
done < "$settings_file"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"

# Loopback unless told otherwise: the example tokens are public, and Flower (no auth by default)
# can revoke tasks and shut workers down.
WEB_BIND="${WEB_BIND:-127.0.0.1:${WEB_PORT:-8000}}"
FLOWER_BIND="${FLOWER_BIND:-127.0.0.1}"
case "$FLOWER_BIND" in
  127.*|localhost|::1) ;;
  *)
    if [ -z "${FLOWER_BASIC_AUTH:-}" ]; then
      echo "error: FLOWER_BIND=$FLOWER_BIND would expose Flower, which can revoke tasks and shut" \
           "workers down, with no password: set FLOWER_BASIC_AUTH=user:password first, or leave" \
           "FLOWER_BIND unset (127.0.0.1)." >&2
      exit 2
    fi ;;
esac

# Prometheus values of every process (web workers, Celery workers), summed by /metrics. Set
# before any process starts; emptied so counts of an earlier run are not added again.
export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-$VAR_DIR/prometheus}"
mkdir -p "$PROMETHEUS_MULTIPROC_DIR" && rm -f "$PROMETHEUS_MULTIPROC_DIR"/*.db

# Check the settings once, up front: a missing or bad value stops here with its name.
$BIN/python -c "from config.settings import load_settings; from webapp.keystore import read_keys_file; \
from runtimes.catalog import ModelCatalog; s = load_settings(); read_keys_file(s.auth_keys_file); \
ModelCatalog.from_file(s.model_catalog_file, s.runtime_type)" || exit 2

scripts/ensure-redis.sh || exit 1

pids=() names=()
start() {  # name, command...: each child leads its own session, out of reach of our group's signals
  local name=$1; shift
  # The prefixer ignores INT and TERM, as its child does, so the child's last lines (its shutdown)
  # still get through; it ends when the child's output does.
  setsid "$@" > >(trap '' INT TERM; exec sed -u "s/^/[$name] /") 2>&1 &
  pids+=($!) names+=("$name")
}

# The stop runs once and to its end, however many signals come meanwhile (a second Ctrl-C, or a
# `kill` of our whole process group): they are only counted. What stops the engines and Redis
# runs in a session of its own, so such a signal cannot cut it short either.
late_signals=0
stop_all() {
  trap 'late_signals=$((late_signals + 1))' INT TERM
  echo "stopping the stack: web and workers, then engines, then Redis (more signals are ignored until done)"
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
  for _ in $(seq 100); do
    alive=0; for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    # A background sleep: one in the foreground, killed by a signal to our group, would have
    # bash print "Terminated".
    [ $alive = 0 ] && break; sleep 0.1 & wait $!
  done
  for i in "${!pids[@]}"; do
    kill -0 "${pids[$i]}" 2>/dev/null && echo "${names[$i]} did not stop within 10 s: killing it" >&2
    kill -KILL -- "-${pids[$i]}" 2>/dev/null
    wait "${pids[$i]}" 2>/dev/null  # reaped here, so bash does not report it as "Killed"
  done
  setsid -w $BIN/python -m runtimes stop-all --unless-kept
  if [ -f "$VAR_DIR/redis/started-by-run" ]; then
    setsid -w redis-cli -u "$REDIS_URL" shutdown >/dev/null 2>&1 \
      && echo "redis: stopped (its data stays in $VAR_DIR/redis)"
    rm -f "$VAR_DIR/redis/started-by-run"
  fi
  [ "$late_signals" = 0 ] || echo "($late_signals signal(s) during the stop were ignored)"
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

mkdir -p "$VAR_DIR"
level="${LOG_LEVEL:-INFO}"
WEB_BIND="$WEB_BIND" start web $BIN/gunicorn -c webapp/gunicorn_conf.py webapp.wsgi:app
start control $BIN/celery -A tasks.worker worker -Q control,downloads -P threads -c 8 -n control@%h -l "$level"
start batch $BIN/celery -A tasks.worker worker -Q batch -P gevent -c "${BATCH_WORKER_CONCURRENCY:-64}" -n batch@%h -l "$level"
start beat $BIN/celery -A tasks.worker beat --schedule "$VAR_DIR/celerybeat-schedule" -l "$level"
flower_auth=(); [ -n "${FLOWER_BASIC_AUTH:-}" ] && flower_auth=(--basic-auth="$FLOWER_BASIC_AUTH")
# Flower reads FLOWER_* variables itself: an empty FLOWER_BASIC_AUTH (as .env.vllm.example has it)
# would become one empty credential no one can give, so it gets its options from the command line
# only. It keeps its own metrics (on its /metrics): out of the gateway's directory.
start flower env -u FLOWER_BASIC_AUTH -u FLOWER_PORT -u PROMETHEUS_MULTIPROC_DIR \
  $BIN/celery -A tasks.worker flower --address="$FLOWER_BIND" --port="${FLOWER_PORT:-5555}" "${flower_auth[@]}"

echo "orchestrator: http://$WEB_BIND  flower: http://$FLOWER_BIND:${FLOWER_PORT:-5555}"
# If any child dies, stop the rest: a half-running stack is worse than a stopped one.
wait -n "${pids[@]}"
echo "a process of the stack exited; stopping the others" >&2
stop_all
exit 1
