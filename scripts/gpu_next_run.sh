#!/usr/bin/env bash
# What issues #6 and #8 still lack, for one 10-minute call on a 4-GPU machine
# (not run yet). Each job has its own GPUs and its own cores: three unpinned
# jobs on one host stalled every LoRA system, stock included (see
# benchmarks/README.md), while two pinned jobs ran normally.
#   GPU 0     ablations: slora, slora-bmm, slora-no-unifymem (offline)
#   GPU 1     online headline: base, slora, stock
#   GPUs 2,3  headline at --tensor-parallel-size 2: slora, stock
# Everything comes back as one archive, $OUT/next.tgz.
set -u
source .gpu/activate.sh
python3 -m pip install -q --no-deps --no-build-isolation -e .
mkdir -p /tmp/o && nvidia-smi -L > /tmp/o/gpus.txt
pin() { if command -v taskset >/dev/null; then taskset -c "$@"; else shift; "$@"; fi; }
B="--requests 96 --min-point-s 20 --est-start-s 100 --est-point-s 25 --budget-s 480"
CUDA_VISIBLE_DEVICES=0 OMP_NUM_THREADS=8 pin 0-15 timeout 540 python3 -m benchmarks.run \
  --preset headline --systems slora,slora-bmm,slora-no-unifymem $B --workdir /tmp/w0 \
  --name ablations-offline > /tmp/o/ablations.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 OMP_NUM_THREADS=8 pin 16-31 timeout 540 python3 -m benchmarks.run \
  --preset headline-online --stock-max-loras 64 --n 5,100,1000 --requests 96 --min-point-s 35 \
  --est-start-s 100 --est-point-s 30 --budget-s 480 --workdir /tmp/w1 \
  --name headline-online > /tmp/o/online.log 2>&1 &
CUDA_VISIBLE_DEVICES=2,3 OMP_NUM_THREADS=8 pin 32-55 timeout 540 python3 -m benchmarks.run \
  --preset headline --systems slora,stock --stock-max-loras 64 --tensor-parallel-size 2 $B \
  --workdir /tmp/w2 --name headline-offline-tp2 > /tmp/o/tp2.log 2>&1 &
wait
cp benchmarks/results/{ablations-offline,headline-online,headline-offline-tp2}* /tmp/o/ 2>/dev/null
for w in 0 1 2; do tail -n 40 /tmp/w$w/runs/*/logs/*.log > /tmp/o/tails$w.txt 2>&1; done
tar czf "$OUT/next.tgz" -C /tmp o
grep -h "^| [0-9]" /tmp/o/*.log | head -40
