#!/usr/bin/env bash
# What `make test` and `make bench` need from Debian's apt on a fresh machine; installs only what is missing
# (nothing, and no root needed, when all is there). Run by `make test` (target system-deps).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v make >/dev/null || need+=(make)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
# The docker-marked tests: a Docker engine, compose (v1; Debian 12 has no v2 plugin) and
# debootstrap for the local base image (no image registry is needed).
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
# The dashboard's browser tests drive Debian's Chromium (Playwright never downloads a browser).
[ -x /usr/bin/chromium ] || need+=(chromium)
# The CPU build of vLLM (installed by `make test` into its own venv) links libnuma; flock keeps
# two installs of it from running at once.
ldconfig -p | grep -q 'libnuma\.so\.1 ' || need+=(libnuma1)
command -v flock >/dev/null || need+=(util-linux)
# The test of several hosts puts each in a network namespace of its own (ip netns, veth, bridge).
command -v ip >/dev/null || need+=(iproute2)
# `make bench` loads the gateway with wrk.
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  echo "system-deps: installing ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
