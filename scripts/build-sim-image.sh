#!/usr/bin/env bash
# Build the image of the `sim` engine for the docker backend, with no image registry at all.
#
#   scripts/build-sim-image.sh [--force] [IMAGE]      (IMAGE default: $SIM_IMAGE or
#                                                      llm-gateway-sim:latest)
#
# Idempotent: when IMAGE already exists it exits at once (--force rebuilds it). Otherwise it makes
# the base image $BASE_IMAGE (default llm-gateway-base:bookworm) if missing: Debian bookworm
# minbase with python3, python3-venv and ca-certificates, debootstrapped into a temporary
# directory and `docker import`ed (a complete rootfs at $SIM_ROOTFS, default /tmp/rootfs, is
# reused instead of debootstrapping again). Then it builds runtimes/sim/Dockerfile on it, from a
# temporary build context holding only the Dockerfile, the `runtimes` package and the CA bundle
# pip needs to reach PyPI from inside the build (it stays in the build stage, not in the image).
#
# Needs a running Docker engine; making the base image needs root (debootstrap, installed with
# apt-get when missing). Environment: SIM_IMAGE, BASE_IMAGE, SIM_ROOTFS, DEBIAN_MIRROR,
# PIP_CERT (CA bundle for pip; default the host's), PIP_INDEX_URL and the usual *_PROXY.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
force=0
image="${SIM_IMAGE:-llm-gateway-sim:latest}"
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "build-sim-image: unknown option $arg" >&2; exit 2 ;;
    *) image="$arg" ;;
  esac
done
base="${BASE_IMAGE:-llm-gateway-base:bookworm}"
rootfs_cache="${SIM_ROOTFS:-/tmp/rootfs}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
dockerfile="$REPO/runtimes/sim/Dockerfile"

say() { echo "build-sim-image: $*"; }
die() { echo "build-sim-image: $*" >&2; exit 1; }

docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed); start dockerd first"

# What the image is built from; recorded as a label so a stale image can be pointed out.
source_hash=$(cd "$REPO" && find runtimes/__init__.py runtimes/sim -name '*.py' -o -name Dockerfile \
  | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)

if [ "$force" = 0 ] && docker image inspect "$image" >/dev/null 2>&1; then
  built_from=$(docker image inspect -f '{{ index .Config.Labels "llm-gateway.source-hash" }}' "$image")
  if [ "$built_from" = "$source_hash" ]; then
    say "$image is up to date"
  else
    say "$image exists but was built from other sources of runtimes/sim; rebuild with --force"
  fi
  exit 0
fi

start=$(date +%s)

# A debootstrap is complete when its work directory is gone and what we asked for is there.
rootfs_complete() {
  local dir=$1
  [ -d "$dir" ] && [ ! -e "$dir/debootstrap" ] && [ -x "$dir/usr/bin/python3" ] \
    && grep -q '^12\.' "$dir/etc/debian_version" 2>/dev/null \
    && compgen -G "$dir/usr/lib/python3*/ensurepip/__init__.py" >/dev/null \
    && compgen -G "$dir/usr/share/python-wheels/pip-*.whl" >/dev/null \
    && [ -s "$dir/etc/ssl/certs/ca-certificates.crt" ]
}

workdir=$(mktemp -d /tmp/build-sim-image.XXXXXX)
cleanup() { rm -rf --one-file-system "$workdir"; }
trap cleanup EXIT

if ! docker image inspect "$base" >/dev/null 2>&1; then
  if rootfs_complete "$rootfs_cache"; then
    rootfs="$rootfs_cache"
    say "making $base from the existing rootfs $rootfs"
  else
    [ "$(id -u)" = 0 ] || die "making $base needs root (debootstrap); run as root, or docker import a bookworm rootfs as $base yourself"
    if ! command -v debootstrap >/dev/null; then
      say "installing debootstrap"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
    fi
    rootfs="$workdir/rootfs"
    say "debootstrapping Debian bookworm into $rootfs (a few minutes; log: $workdir/debootstrap.log)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$rootfs" "$mirror" >"$workdir/debootstrap.log" 2>&1 \
      || { tail -20 "$workdir/debootstrap.log" >&2; die "debootstrap failed"; }
  fi
  # Package caches, apt lists, manuals and translations are of no use in an engine image; the
  # mount points' contents come from Docker at run time.
  tar -C "$rootfs" -c --numeric-owner \
    --exclude='./var/cache/apt/*' --exclude='./var/lib/apt/lists/*' \
    --exclude='./usr/share/man/*' --exclude='./usr/share/info/*' \
    --exclude='./usr/share/locale/*' --exclude='./proc/*' --exclude='./sys/*' \
    --exclude='./dev/*' --exclude='./debootstrap' . \
    | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase bookworm + python3 python3-venv ca-certificates" \
        - "$base" >/dev/null
  say "made $base"
fi

# The build context: only what the image needs, so it stays small whatever lies in the repo.
context="$workdir/context"
mkdir -p "$context"
cp "$dockerfile" "$context/Dockerfile"
tar -C "$REPO" -c --exclude='__pycache__' --exclude='*.pyc' runtimes | tar -C "$context" -x
ca="${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}"
ca="${ca:-/etc/ssl/certs/ca-certificates.crt}"
if [ -s "$ca" ]; then
  cp "$ca" "$context/pip-ca.crt"
else
  : >"$context/pip-ca.crt"  # empty: pip inside the build uses its own CA bundle
fi

build_args=(--build-arg "BASE_IMAGE=$base")
for var in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy PIP_INDEX_URL; do
  [ -n "${!var:-}" ] && build_args+=(--build-arg "$var=${!var}")
done
previous=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
say "building $image on $base"
# The classic builder: BuildKit needs the buildx plugin, which a plain docker.io lacks.
DOCKER_BUILDKIT=0 docker build "${build_args[@]}" \
  --label "llm-gateway.source-hash=$source_hash" -t "$image" "$context" >"$workdir/build.log" 2>&1 \
  || { tail -30 "$workdir/build.log" >&2; die "docker build of $image failed"; }

# A rebuild leaves the previous image untagged; it is of no further use. (The untagged image of
# the build stage stays: it is the cache that spares the next rebuild a trip to PyPI.)
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$image")" ] \
   && [ "$(docker image inspect -f '{{len .RepoTags}}' "$previous" 2>/dev/null)" = 0 ]; then
  docker rmi "$previous" >/dev/null 2>&1 || true  # still used by a container: leave it
fi
size=$(docker image inspect -f '{{.Size}}' "$image")
say "built $image ($((size / 1000000)) MB) in $(($(date +%s) - start)) s"
