#!/usr/bin/env bash
# Build .gpu/ for the GPU machine: vLLM (VLLM_VERSION, default 0.34.0; its
# CUDA build cut down to Hopper) plus the Python packages the machine lacks
# (requirements/gpu-bundle.txt), as one site.tar.xz, and an activate.sh that
# unpacks it there. The machine has torch 2.11.0+cu130 and Triton 3.6.0 and
# fetches nothing; vLLM's main kernels use libtorch's stable ABI, so a newer
# vLLM loads on that torch. Everything travels with the working tree (64 MiB
# a call), so the bundle drops what a dense model on Hopper never loads.
#
#   bash scripts/gpu_bundle.sh            # vLLM 0.34.0
#   VLLM_VERSION=0.26.0 bash scripts/gpu_bundle.sh
#
# Derived from ../shared/gpu/build-bundle.sh. Run from the project root;
# .gpu/ is git-ignored.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/.gpu"
v="${VLLM_VERSION:-0.34.0}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

plat=(--only-binary=:all: --python-version 3.12 --implementation cp)
for p in manylinux_2_28 manylinux_2_17 manylinux2014 manylinux_2_31 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_5 manylinux1; do
  plat+=(--platform "${p}_x86_64")
done

echo "downloading vllm $v and $(grep -c . "$root/requirements/gpu-bundle.txt") dependencies"
pip download -q --no-deps "${plat[@]}" -d "$work/dl" "vllm==$v"
pip download -q --no-deps "${plat[@]}" -d "$work/deps" -r "$root/requirements/gpu-bundle.txt"

site="$work/site"
mkdir -p "$site"
for w in "$work"/deps/*.whl; do python3 -m zipfile -e "$w" "$site"; done
python3 -m zipfile -e "$work"/dl/vllm-"$v"-*.whl "$site"
# Not needed for dense models on Hopper: FA2 (pre-Hopper), MoE, MLA, FP4,
# DeepGEMM, the Rust frontend and benchmark tool, CUTLASS headers.
rm -rf "$site/pycountry/locales" "$site/vllm/third_party/deep_gemm" "$site/vllm/third_party/fmha_sm100"
rm -f "$site"/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so "$site"/vllm/_moe_C_stable_libtorch.abi3.so \
      "$site"/vllm/_flashmla*_C.abi3.so "$site"/vllm/_qutlass_C.abi3.so "$site"/vllm/vllm-rs \
      "$site"/vllm/_flashkda_C.abi3.so "$site"/vllm/_deepselect_C.abi3.so
# Type stubs and packages' own tests.
find "$site" -name "*.pyi" -delete
rm -rf "$site"/mistral_common/data "$site"/*/tests
# 0.34's bundle must fit 64 MiB beside the tree: drop what vLLM 0.34 never
# imports for a dense model (checked in its sources and by an import run of
# the bundle under Python 3.12 and torch 2.11): anthropic and fastar (no
# import at all), and the structured-output backends other than the
# default xgrammar (llguidance, outlines_core: stand-ins below).
case "$v" in
  0.26.*) ;;
  *) rm -rf "$site"/anthropic* "$site"/fastar* "$site"/llguidance* "$site"/outlines_core* ;;
esac
for so in vllm/_C_stable_libtorch.abi3.so vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so; do
  [ -f "$site/$so" ] || continue
  python3 "$root/scripts/slim_fatbin.py" "$site/$so" "$site/$so.slim" 90 && mv "$site/$so.slim" "$site/$so"
done
# Stand-ins (scripts/gpu_stubs): llguidance and outlines_core, whose names
# vLLM 0.34 evaluates in class annotations at import. Those of the CUTLASS
# DSL and QuACK (_stubs/) stay in the tree: activate.sh puts them on the
# path with SLORA_CUTLASS_STUB=1.
case "$v" in
  0.26.*) ;;
  *) cp -r "$root/scripts/gpu_stubs/llguidance" "$root/scripts/gpu_stubs/outlines_core" "$site/" ;;
esac
find "$site" -name __pycache__ -prune -exec rm -rf {} +

mkdir -p "$out"
echo "compressing (about a minute)"
tar -C "$site" -cf - . | xz -9e -T0 -c > "$out/site.tar.xz"
cat > "$out/activate.sh" <<'ACT'
# On the GPU machine: `source .gpu/activate.sh` at the start of every command.
_gpu_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ ! -f /tmp/gpu-site/.done ]; then
  mkdir -p /tmp/gpu-site && tar -C /tmp/gpu-site -xJf "$_gpu_dir/site.tar.xz" && touch /tmp/gpu-site/.done
fi
export PYTHONPATH="/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# flashinfer is not in the bundle: keep vLLM's sampler on its own kernels.
export VLLM_USE_FLASHINFER_SAMPLER=0
# Stand-ins for the CUTLASS DSL and QuACK (scripts/gpu_stubs/_stubs), which
# vLLM 0.34's kernel warm-up imports for every model.
if [ "${SLORA_CUTLASS_STUB:-0}" = 1 ]; then export PYTHONPATH="$_gpu_dir/../scripts/gpu_stubs/_stubs:$PYTHONPATH"; fi
vllm() { python3 -m vllm.entrypoints.cli.main "$@"; }
ACT
echo "$v" > "$out/VERSION"
ls -la "$out"
