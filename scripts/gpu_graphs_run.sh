#!/usr/bin/env bash
# One call on one H200 for the CUDA-graphs work (issues 13, 14). Stages, in
# this order, each under its own timeout, everything archived in $OUT/graphs.tgz:
#   STEPS=... arguments for `python -m benchmarks.step_time` (decode step
#             time of base, stock, plugin at fixed batches; --profile K adds
#             the anatomy), e.g. "--systems base,slora"
#   TESTS=1   GPU tests (TESTS_S, default: what is left of the call; unset: only
#             when no other stage is asked for): `pytest -m gpu`
#             over GPU_TESTS (default tests/gpu tests/paging): the plugin in full +
#             piecewise graphs vs stock and vs itself eager, memory pressure with
#             async scheduling vs a roomy run, adapter faults mid-run with async
#             scheduling, CUDA upload paths (GPU_K selects, pytest -k), and the
#             kernel tests of the grouping (KERNEL_K selects, KERNEL_S limits,
#             KERNEL_TESTS=0 skips them)
#   KTESTS=.. kernel tests first (pytest -k expression over tests/kernels;
#             KTESTS_S limits), e.g. "graph_replay"; when they fail, the
#             timing stages (LSTEP, STEPS, BENCH) are skipped
#   PYTEST=.. any pytest arguments, run first of all (PYTEST_S limits), e.g.
#             "tests/paging/test_pager.py -k upload"
#   LSTEP=.. arguments for `python -m benchmarks.lora_step` (LoRA kernel time
#             of a decode step under knob variants; LSTEP_S limits), e.g. "--variants all"
#             (LSTEP_FIRST=1: right after KTESTS, before KBENCH and EAB)
#   DIAG=...  variants of scripts/gpu_parity_diag.py (DIAG_S limits), e.g.
#             "graphs,graphs-nopdl,eager"
#   KBENCH=.. arguments for `python -m benchmarks.kernels` (e.g. "--quick"), run
#             on an older tree (.ab/old.tar, from `git archive`; carry ".ab")
#             and on this one, alternating (old, new, old, new; KBENCH_S limits
#             each run, default 220 s: a tree's first run also compiles its
#             kernels, about 60 s more): the kernel benchmark before and
#             after a change, in one call. Runs after KTESTS; failed kernel
#             tests skip it
#   EAB=...   arguments for `python -m benchmarks.run` (preset included, e.g.
#             "--preset headline --systems slora --n 2000 --window-s 15 ..."),
#             run end to end on the older tree (.ab/old.tar: `git archive -o
#             .ab/old.tar REV ':!benchmarks/results'`, the whole project, since
#             the engines import the installed plugin: it is installed in turn)
#             and on this one, alternating old, new (EAB_ROUNDS rounds, default
#             1; EAB_S limits each run, default 240 s); results eab-old-<i> and
#             eab-new-<i>. After KBENCH; failed kernel tests skip it
#   SMOKE=1   scripts/gpu_smoke.py first (tiny model, graphs on: the plugin's
#             outputs against stock's, asserted; SMOKE_S limits)
#   ALOAD=... arguments for `python -m benchmarks.adapter_load` (host-cache
#             read and packing rate of 7B adapters; ALOAD_S limits), e.g. "--adapters 64"
#   BENCH=... arguments for `python -m benchmarks.run` (the headline workload
#             with CUDA graphs on), e.g. "--systems base,slora,stock --n 5,1000"
#             (BENCH_FIRST=1 runs it before every other stage: base beside an EAB);
#             with VLLM_SLORA_STEP_STACKS=1 the engine thread's stacks per point
#             (logs/<run>/*.stacks.txt)
#   BTP=...   arguments for `python -m benchmarks.bench_throughput` (vLLM's own
#             `vllm bench throughput` on base, the plugin, stock; after BENCH;
#             BTP_S limits), e.g. "--systems base,slora --ids 1000"
#   ONLINE=.. arguments for `python -m benchmarks.run --preset headline-online`
#             (vllm serve + our client, after BENCH; ONLINE_S limits), e.g.
#             "--systems slora,stock,base --cross-check slora"; BENCH_EXTRA and
#             ONLINE_EXTRA: their --extra-points (e.g. "n=1000 alpha=0.5;n=1000 targets=all")
# A run stopped by its stage's timeout (SIGTERM) still writes what it measured.
# Every run's engine and server logs: logs/<run name>/.
set -u
source .gpu/activate.sh
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
# The bundle's vLLM must import on this machine's torch (.gpu/VERSION says
# which vLLM it holds): stop at once, with the error, if it does not.
python3 -c "import torch, triton, vllm, vllm_slora.patches; print('vllm', vllm.__version__, 'torch', torch.__version__, 'triton', triton.__version__)" \
  || { echo "vLLM $(cat .gpu/VERSION 2>/dev/null) does not import here"; exit 3; }
# A machine may keep an earlier session's /tmp: clear what this script
# archives, or old results and logs come back as this call's.
O=/tmp/o; rm -rf $O /tmp/slora-bench/runs /tmp/slora-steps /tmp/ab-old
mkdir -p $O/results && nvidia-smi -L > $O/gpus.txt
# The host's CPU too: the same code ran 0.71x and 0.76x base at n = 2,000 on
# two H100 machines whose engine threads took 29 and 20 ms a step.
{ lscpu | grep -E "^(Model name|CPU\(s\)|CPU max MHz)"; nproc; } >> $O/gpus.txt 2>&1
# Whether compile caches survive between calls on a warm machine (start-up time).
cache_state() { echo "$1: triton $(find ~/.triton/cache -type f 2>/dev/null | wc -l) files, vllm $(du -sm ~/.cache/vllm 2>/dev/null | cut -f1) MB" >> $O/caches.txt; }
cache_state start
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8 VLLM_SLORA_INSTAFAIL=1  # tracebacks as they happen (tests/conftest.py)
# The op inside vLLM's graphs (the plugin's default) unless the caller says otherwise.
export VLLM_SLORA_CUDAGRAPH=${VLLM_SLORA_CUDAGRAPH:-captured}
SECONDS=0
# A stage gets at most what is left of the call (CALL_S, default 560 s: a
# device call ends at 600 s and returns nothing if cut) minus 25 s for the
# archive, so the results of the stages that ran always come back.
cap() { local left=$(( ${CALL_S:-560} - 25 - SECONDS )); (( left < 1 )) && left=1; echo $(( $1 < left ? $1 : left )); }
# The older tree of the before/after stages (KBENCH, EAB), in /tmp/ab-old, once.
old_tree() { [ -d /tmp/ab-old ] || { mkdir -p /tmp/ab-old && tar xf .ab/old.tar -C /tmp/ab-old; }; }
bench_stage() {  # BENCH (BENCH_FIRST=1: before every other stage, e.g. base beside an EAB)
  [ -n "${BENCH:-}" ] || return 0
  timeout "$(cap ${BENCH_S:-480})" python3 -m benchmarks.run --preset headline --results-dir $O/results \
    $BENCH ${BENCH_EXTRA:+--extra-points "$BENCH_EXTRA"} > $O/bench.txt 2>&1
  echo "bench rc=$? ${SECONDS}s" | tee -a $O/steps.txt
}
lstep_stage() {  # LSTEP (LSTEP_FIRST=1: right after the kernel tests, before KBENCH and EAB)
  [ -n "${LSTEP:-}" ] || return 0
  timeout "$(cap ${LSTEP_S:-200})" python3 -m benchmarks.lora_step $LSTEP --out $O/results/lora-step.json \
    > $O/lora-step.txt 2>&1
  echo "lora step rc=$? ${SECONDS}s" | tee -a $O/steps.txt
  grep "^|" $O/lora-step.txt
}
[ "${BENCH_FIRST:-0}" = 1 ] && bench_stage
if [ -n "${PYTEST:-}" ]; then
  timeout "$(cap ${PYTEST_S:-120})" python3 -m pytest -q -rs $PYTEST > $O/pytest-first.txt 2>&1
  echo "pytest first rc=$? ${SECONDS}s" | tee -a $O/steps.txt
  tail -3 $O/pytest-first.txt
fi
if [ -n "${KTESTS:-}" ]; then
  timeout "$(cap ${KTESTS_S:-150})" python3 -m pytest -q -rs tests/kernels -k "$KTESTS" \
    > $O/pytest-ktests.txt 2>&1
  rc=$?
  echo "kernel tests rc=$rc ${SECONDS}s" | tee -a $O/steps.txt
  tail -3 $O/pytest-ktests.txt
  # Failed kernels make every timing after them meaningless: skip those stages.
  if [ $rc != 0 ]; then LSTEP= BENCH= STEPS= KBENCH= EAB=; echo "timings skipped" | tee -a $O/steps.txt; fi
fi
[ "${LSTEP_FIRST:-0}" = 1 ] && lstep_stage
if [ -n "${KBENCH:-}" ]; then
  old_tree
  for round in 1 2; do
    for side in old new; do
      dir=$PWD; [ $side = old ] && dir=/tmp/ab-old
      # -m from the tree's folder: its vllm_slora and benchmarks come first on sys.path.
      (cd "$dir" && python3 -c "import vllm_slora.kernels as k; print('kernels from', k.__file__)" \
        && timeout "$(cap ${KBENCH_S:-220})" python3 -m benchmarks.kernels $KBENCH --no-variants \
             --out $O/results/kernels-$side-$round.json) > $O/kbench-$side-$round.txt 2>&1
      echo "kernel bench $side $round rc=$? ${SECONDS}s" | tee -a $O/steps.txt
      grep -m1 "kernels from" $O/kbench-$side-$round.txt
    done
  done
fi
if [ -n "${EAB:-}" ]; then
  old_tree
  new=$PWD
  for round in $(seq 1 "${EAB_ROUNDS:-1}"); do
    for side in old new; do
      dir=$new; [ $side = old ] && dir=/tmp/ab-old
      # The engines import the installed vllm_slora (benchmarks/run.py), so each side installs its own.
      (cd "$dir" && python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 \
        && python3 -I -c "import vllm_slora; print('plugin from', vllm_slora.__file__)" \
        && timeout "$(cap ${EAB_S:-240})" python3 -m benchmarks.run --results-dir $O/results \
             $EAB --name eab-$side-$round) > $O/eab-$side-$round.txt 2>&1
      echo "e2e before/after $side $round rc=$? ${SECONDS}s" | tee -a $O/steps.txt
      grep -m1 "plugin from" $O/eab-$side-$round.txt
      grep -E "^\| n=" $O/eab-$side-$round.txt | head -8
    done
  done
  (cd "$new" && python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2)
fi
if [ "${SMOKE:-0}" = 1 ]; then
  timeout "$(cap ${SMOKE_S:-150})" python3 scripts/gpu_smoke.py --out $O/smoke > $O/smoke.txt 2>&1
  rc=$?
  echo "smoke rc=$rc ${SECONDS}s" | tee -a $O/steps.txt
  grep -v "^INFO\|^(EngineCore\|WARNING" $O/smoke.txt | tail -8
  # The bundle has no CUTLASS DSL: where an engine's start needs `import
  # cutlass` to succeed, the stand-in (.gpu's _stubs) serves the rest of the call.
  if [ $rc != 0 ] && grep -q "cutlass" $O/smoke.txt && [ "${SLORA_CUTLASS_STUB:-0}" != 1 ]; then
    export SLORA_CUTLASS_STUB=1 && source .gpu/activate.sh
    grep -n "cutlass" $O/smoke.txt | head -5 > $O/cutlass-first.txt
    timeout "$(cap ${SMOKE_S:-150})" python3 scripts/gpu_smoke.py --out $O/smoke > $O/smoke-stub.txt 2>&1
    echo "smoke with the cutlass stand-in rc=$? ${SECONDS}s" | tee -a $O/steps.txt
    grep -v "^INFO\|^(EngineCore\|WARNING" $O/smoke-stub.txt | tail -8
  fi
fi
if [ -n "${ALOAD:-}" ]; then
  timeout "$(cap ${ALOAD_S:-90})" python3 -m benchmarks.adapter_load $ALOAD --out $O/results/adapter-load.json \
    > $O/adapter-load.txt 2>&1
  echo "adapter load rc=$? ${SECONDS}s" | tee -a $O/steps.txt
  grep "^|" $O/adapter-load.txt
fi
[ "${LSTEP_FIRST:-0}" = 1 ] || lstep_stage
if [ -n "${DIAG:-}" ]; then
  timeout "$(cap ${DIAG_S:-450})" python3 scripts/gpu_parity_diag.py $O/diag --only "$DIAG" \
    --deadline-s "$(( ${DIAG_S:-450} - 15 ))" > $O/diag.txt 2>&1
  echo "diag rc=$? ${SECONDS}s" | tee -a $O/steps.txt
  cat $O/diag/diag.json
fi
if [ -n "${STEPS:-}" ]; then  # decode step time at fixed batches, e.g. "--systems base,stock,slora"
  timeout "$(cap ${STEPS_S:-420})" python3 -m benchmarks.step_time $STEPS --out $O/results/step-time.json \
    > $O/step-time.txt 2>&1
  echo "step time rc=$? ${SECONDS}s" | tee -a $O/steps.txt
  mkdir -p $O/step-children && cp /tmp/slora-steps/*.json $O/step-children/ 2>/dev/null
  [ -d /tmp/slora-steps/traces ] && cp -r /tmp/slora-steps/traces $O/step-traces
fi
# TESTS unset: the GPU tests run only when no other stage was asked for (a
# call that asked for a 41 s kernel timing once spent 7.6 minutes in them).
# GPU_K or GPU_TESTS given: the tests were asked for.
if [ -z "${TESTS:-}" ]; then
  TESTS=1
  for stage in STEPS KTESTS PYTEST LSTEP DIAG KBENCH EAB SMOKE ALOAD BENCH BTP ONLINE; do
    [ -n "${!stage:-}" ] && [ "${!stage}" != 0 ] && TESTS=0
  done
  [ -n "${GPU_K:-}${GPU_TESTS:-}" ] && TESTS=1
fi
if [ "$TESTS" = 1 ]; then
  timeout "$(cap ${TESTS_S:-600})" python3 -m pytest -q -rs -s -m gpu ${GPU_TESTS:-tests/gpu tests/paging} \
    ${GPU_K:+-k "$GPU_K"} > $O/pytest-gpu.txt 2>&1
  echo "pytest gpu rc=$? ${SECONDS}s" | tee -a $O/steps.txt
  if [ "${KERNEL_TESTS:-1}" = 1 ]; then
    timeout "$(cap ${KERNEL_S:-120})" python3 -m pytest -q -rs tests/kernels \
      -k "${KERNEL_K:-group_by_adapter or meta or per_token or few_adapters}" \
      > $O/pytest-kernels.txt 2>&1
    echo "pytest kernels rc=$? ${SECONDS}s" | tee -a $O/steps.txt
  fi
fi
[ "${BENCH_FIRST:-0}" = 1 ] || bench_stage
if [ -n "${BTP:-}" ]; then  # vLLM's own client, e.g. "--systems base,slora --ids 1000"
  left=$(cap ${BTP_S:-480})
  timeout "$left" python3 -m benchmarks.bench_throughput $BTP --budget-s $(( left - 15 )) \
    --workdir /tmp/slora-btp --out $O/results/bench-throughput.json > $O/bench-throughput.txt 2>&1
  echo "bench throughput rc=$? ${SECONDS}s" | tee -a $O/steps.txt
  mkdir -p $O/btp-logs && cp /tmp/slora-btp/*.log /tmp/slora-btp/*.json $O/btp-logs/ 2>/dev/null
fi
if [ -n "${ONLINE:-}" ]; then
  timeout "$(cap ${ONLINE_S:-560})" python3 -m benchmarks.run --preset headline-online --results-dir $O/results \
    $ONLINE ${ONLINE_EXTRA:+--extra-points "$ONLINE_EXTRA"} > $O/online.txt 2>&1
  echo "online rc=$? ${SECONDS}s" | tee -a $O/steps.txt
fi
for d in /tmp/slora-bench/runs/*/logs; do  # engine, server and vllm bench serve logs, per run
  [ -d "$d" ] && mkdir -p $O/logs && cp -r "$d" "$O/logs/$(basename "$(dirname "$d")")"
done
for f in $O/logs/*/*.stacks; do  # VLLM_SLORA_STEP_STACKS=1: per point
  [ -e "$f" ] && python3 -m benchmarks.stacks "$f" --events "${f%.steps.jsonl.stacks}.events.jsonl" \
    --top 40 > "${f%.steps.jsonl.stacks}.stacks.txt" 2>&1
done
tail -5 $O/pytest-gpu.txt 2>/dev/null; tail -12 $O/step-time.txt 2>/dev/null
for f in $O/bench.txt $O/bench-throughput.txt $O/online.txt; do [ -e $f ] && grep -E "^\| |rc=|skipped|error|Error" $f | tail -40; done
cache_state end; cat $O/caches.txt
tar czf $OUT/graphs.tgz -C $O .
