#!/usr/bin/env bash
# Prepare `docker-compose up --build` on a machine that reaches no image registry (CI, air-gapped
# or TLS-intercepted networks). A machine that can pull python:3.11-slim-bookworm and redis:7 needs
# none of this.
#
#   scripts/compose-local-images.sh [--force]
#
# It makes, locally and idempotently:
#   - llm-gateway-base:bookworm and llm-gateway-sim:latest with scripts/build-sim-image.sh
#     (debootstrap + docker import; the sim engine image that RUNTIME_TYPE=sim containers use);
#   - $REDIS_IMAGE (default llm-gateway-redis:bookworm): Debian's redis-server on that base;
#   - var/docker-build/pip-ca.crt: the CA bundle pip uses inside the orchestrator image's build
#     ($PIP_CERT, pip's configured cert, or the host's bundle), so pip reaches PyPI through
#     whatever TLS this network needs. It stays in the build stage, not in the image.
# Then it prints the lines to add to .env. --force rebuilds the sim and redis images.
# Needs a running Docker engine, and root the first time (debootstrap).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
force=()
for arg in "$@"; do
  case "$arg" in
    --force) force=(--force) ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "compose-local-images: unknown argument $arg" >&2; exit 2 ;;
  esac
done
base="${BASE_IMAGE:-llm-gateway-base:bookworm}"
redis_image="${REDIS_IMAGE:-llm-gateway-redis:bookworm}"
say() { echo "compose-local-images: $*"; }

export BASE_IMAGE="$base"
out=$("$REPO/scripts/build-sim-image.sh" "${force[@]}")
echo "$out"
if [ ${#force[@]} = 0 ] && grep -q -- "--force" <<<"$out"; then
  # The sim image predates the sources in this checkout: engines should run what is here.
  "$REPO/scripts/build-sim-image.sh" --force
fi

if [ ${#force[@]} = 1 ] || ! docker image inspect "$redis_image" >/dev/null 2>&1; then
  say "building $redis_image on $base (Debian's redis-server)"
  build_args=(--build-arg "BASE_IMAGE=$base")
  for var in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
    [ -n "${!var:-}" ] && build_args+=(--build-arg "$var=${!var}")
  done
  # No context: the Dockerfile comes on stdin. The classic builder, as build-sim-image.sh says.
  previous=$(docker image inspect -f '{{.Id}}' "$redis_image" 2>/dev/null || true)
  log=$(mktemp /tmp/compose-local-images.XXXXXX)
  trap 'rm -f "$log"' EXIT
  DOCKER_BUILDKIT=0 docker build "${build_args[@]}" -t "$redis_image" - >"$log" 2>&1 <<'EOF' \
    || { tail -30 "$log" >&2; echo "compose-local-images: docker build of $redis_image failed" >&2; exit 1; }
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--appendonly", "yes", "--dir", "/data", "--protected-mode", "no"]
EOF
  # A rebuild leaves the previous image untagged, of no further use.
  if [ -n "$previous" ] && [ "$(docker image inspect -f '{{len .RepoTags}}' "$previous" 2>/dev/null)" = 0 ]; then
    docker rmi "$previous" >/dev/null 2>&1 || true
  fi
  say "built $redis_image"
else
  say "$redis_image exists"
fi

ca="${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}"
ca="${ca:-/etc/ssl/certs/ca-certificates.crt}"
mkdir -p "$REPO/var/docker-build"
if [ -s "$ca" ]; then
  # Left alone when unchanged, so the image's dependency layer stays cached.
  cmp -s "$ca" "$REPO/var/docker-build/pip-ca.crt" || cp "$ca" "$REPO/var/docker-build/pip-ca.crt"
  say "pip inside the image build uses the CA bundle $ca"
fi

cat <<EOF
compose-local-images: ready. Add to .env (or export) before docker-compose up --build:
BASE_IMAGE=$base
REDIS_IMAGE=$redis_image
EOF
