#!/usr/bin/env bash
# One 10-minute call on a 4-GPU machine (issue #8, and #7's full load test):
#   GPUs 0,1: headline workload at --tensor-parallel-size 2, slora and stock
#   GPUs 2,3: TP parity (tiny fp32 model: stock/plugin x TP 1/2), then
#     GPU 2: the plugin at TP 1 on the same workload (scaling 1 -> 2 GPUs)
#     GPU 3: the serving load test, 1,000 streaming requests on 500 adapters
# Usage (device tool, carry [".gpu"]): bash scripts/gpu_tp_run.sh
set -u
source .gpu/activate.sh
python -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi -L > "$OUT/gpus.txt"
B="--preset headline --requests 96 --est-start-s 100 --est-point-s 25 --min-point-s 20"
CUDA_VISIBLE_DEVICES=0,1 python3 -m benchmarks.run $B --systems slora,stock --stock-max-loras 64 \
  --tensor-parallel-size 2 --budget-s 480 --workdir /tmp/t2 --name headline-offline-tp2-h100 \
  > "$OUT/tp2.log" 2>&1 &
(
  CUDA_VISIBLE_DEVICES=2,3 timeout 200 python3 -m vllm_slora.testing.tp_parity \
    --out "$OUT/tp-parity.json" > "$OUT/tp-parity.log" 2>&1
  CUDA_VISIBLE_DEVICES=2 python3 -m benchmarks.run $B --systems slora --budget-s 300 \
    --workdir /tmp/t1 --name headline-offline-tp1-h100 > "$OUT/tp1.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=3 timeout 280 python3 -m benchmarks.load_test --requests 1000 \
    --adapters 500 > "$OUT/load_test.log" 2>&1
  wait
) &
wait
mkdir -p "$OUT/results"
cp benchmarks/results/headline-offline-tp*-h100.* "$OUT/results/" 2>/dev/null
for w in t1 t2; do tail -n 40 /tmp/$w/runs/*/logs/*.log > "$OUT/tails-$w.txt" 2>&1; done
tail -n 12 "$OUT/tp-parity.log" "$OUT/load_test.log" "$OUT/tp1.log" "$OUT/tp2.log"
