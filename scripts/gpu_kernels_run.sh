#!/usr/bin/env bash
# One call on one H100 for the kernels (issue 5): knob variants (tuning),
# the full sweep (benchmarks/kernels.py: GPU time from CUDA graphs + eager
# time), the sweep with every page at a random row, then Nsight Compute on
# three decode cases (ours vs stock kernels); optional: the kernel tests
# (PARITY=1) and the demo on the GPU (DEMO=1).
# Everything comes back as one archive, $OUT/kernels.tgz.
set -u
source .gpu/activate.sh
python3 -m pip install -q --no-deps --no-build-isolation -e .
mkdir -p /tmp/o && nvidia-smi -L > /tmp/o/gpus.txt
SECONDS=0
if [ "${VARIANTS:-1}" = 1 ]; then
  timeout 170 python3 -m benchmarks.kernels --variants-only > /tmp/o/variants.txt 2>&1
  echo "variants rc=$? ${SECONDS}s" >> /tmp/o/steps.txt
fi
timeout "${SWEEP_S:-280}" python3 -m benchmarks.kernels --no-variants --out /tmp/o/kernels.json \
  > /tmp/o/kernels.txt 2>&1
echo "sweep rc=$? ${SECONDS}s" >> /tmp/o/steps.txt
if [ "${RANDOM_PAGES:-1}" = 1 ]; then  # every page at a random row: the worst case
  timeout 120 python3 -m benchmarks.kernels --quick --pages random \
    --out /tmp/o/kernels-random-pages.json > /tmp/o/kernels-random-pages.txt 2>&1
  echo "random pages rc=$? ${SECONDS}s" >> /tmp/o/steps.txt
fi
cases=("7b o r64 decode 512" "7b down mix8-64 decode 512" "7b o r64 decode 1")
for c in "${cases[@]}"; do
  name=$(echo "$c" | tr ' ' '-')
  timeout 45 ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section LaunchStats -k regex:'shrink|expand' \
    python3 -m benchmarks.kernels --profile $c > "/tmp/o/ncu-$name.txt" 2>&1
  echo "ncu $name rc=$? ${SECONDS}s" >> /tmp/o/steps.txt
done
if [ "${PARITY:-0}" = 1 ]; then
  timeout 200 python3 -m pytest -q -rs tests/kernels > /tmp/o/pytest-kernels.txt 2>&1
  echo "pytest rc=$? ${SECONDS}s" >> /tmp/o/steps.txt
fi
if [ "${DEMO:-0}" = 1 ]; then  # the engine on the GPU: plugin vs stock, same tokens
  timeout 240 python3 -m vllm_slora.demo > /tmp/o/demo.txt 2>&1
  echo "demo rc=$? ${SECONDS}s" >> /tmp/o/steps.txt
fi
tar czf "$OUT/kernels.tgz" -C /tmp o
cat /tmp/o/steps.txt; tail -n 45 /tmp/o/kernels.txt; cat /tmp/o/variants.txt 2>/dev/null | tail -n 14
