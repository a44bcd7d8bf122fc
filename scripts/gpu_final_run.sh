#!/usr/bin/env bash
# One call on a 4-GPU machine, two jobs that share nothing but the host
# (pinned to disjoint cores): GPU 0 the offline headline (base, slora, stock)
# alone; GPUs 2,3 the tensor-parallel parity check (tiny fp32 model).
# Everything comes back as one archive, $OUT/final.tgz.
set -u
source .gpu/activate.sh
python3 -m pip install -q --no-deps --no-build-isolation -e .
mkdir -p /tmp/o && nvidia-smi -L > /tmp/o/gpus.txt
pin() { if command -v taskset >/dev/null; then taskset -c "$@"; else shift; "$@"; fi; }
CUDA_VISIBLE_DEVICES=2,3 OMP_NUM_THREADS=4 pin 56-63 timeout 420 \
  python3 -m vllm_slora.testing.tp_parity --out /tmp/o/tp-parity.json > /tmp/o/tp-parity.log 2>&1 &
CUDA_VISIBLE_DEVICES=0 pin 0-47 timeout 530 python3 -m benchmarks.run --preset headline \
  --systems base,slora,stock --stock-max-loras 64 --requests 96 --budget-s 470 --min-point-s 20 \
  --est-start-s 90 --est-point-s 25 --workdir /tmp/w0 --name headline-offline-h100 > /tmp/o/headline.log 2>&1
wait
cp benchmarks/results/headline-offline-h100* /tmp/o/ 2>/dev/null
tail -n 60 /tmp/w0/runs/*/logs/*.log > /tmp/o/engine-tails.txt 2>&1
tar czf "$OUT/final.tgz" -C /tmp o
grep "^|" /tmp/o/headline.log | head -16; tail -n 8 /tmp/o/tp-parity.log
