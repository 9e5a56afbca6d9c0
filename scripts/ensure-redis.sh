#!/usr/bin/env bash
# Make sure a Redis answers at $REDIS_URL. If none does and the URL is local, start one
# (installing Debian's redis-server first when it is missing and we are root); otherwise say
# exactly what to do. A Redis it starts is marked by $VAR_DIR/redis/started-by-run, so that
# `make run` stops it again on the way out.
set -euo pipefail
VAR_DIR="${VAR_DIR:-var}"

url="${REDIS_URL:-redis://127.0.0.1:6379/0}"
hostport="${url#redis://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"
[ "$port" = "$hostport" ] && port=6379

ping() { (exec 9<>"/dev/tcp/$host/$port" && printf 'PING\r\n' >&9 && timeout 2 head -c 5 <&9 | grep -q PONG) 2>/dev/null; }

rm -f "$VAR_DIR/redis/started-by-run"
if ping; then
  echo "redis: answering at $host:$port"
  exit 0
fi
case "$host" in
  127.0.0.1|localhost) ;;
  *) echo "redis: nothing answers at $host:$port (REDIS_URL). Start that Redis, or point REDIS_URL at one." >&2; exit 1 ;;
esac
if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "redis: installing Debian's redis-server"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
  else
    echo "redis: redis-server is missing. Install it: sudo apt-get install -y redis-server" >&2
    exit 1
  fi
fi
mkdir -p "$VAR_DIR/redis"
data=$(cd "$VAR_DIR/redis" && pwd)
# Append-only: accepted batch work must survive a Redis restart.
redis-server --bind 127.0.0.1 --port "$port" --dir "$data" --appendonly yes --save "" \
  --daemonize yes --pidfile "$data/redis.pid" --logfile "$data/redis.log"
for _ in $(seq 50); do ping && break; sleep 0.1; done
ping || { echo "redis: started but not answering; see $VAR_DIR/redis/redis.log" >&2; exit 1; }
touch "$VAR_DIR/redis/started-by-run"
echo "redis: started on 127.0.0.1:$port (data in $VAR_DIR/redis)"
