"""Kernel benchmark: our paged MBGMV/MBGMM vs stock vLLM 0.26 LoRA Triton ops
vs the padded gather + torch.bmm baseline, on Llama-2 7B/13B layer shapes.

Reproduce (H100, < 5 min including Triton compilation):

    python -m benchmarks.kernels [--quick] [--out benchmarks/results/kernels.json]

Smoke test on CPU (tiny shapes, Triton interpreter, correctness only, no
timing, writes nothing unless --out is given):

    python -m benchmarks.kernels --dry-run

Each case is one LoRA'd module (shrink + expand, fused slices in one call) on
one decode batch of T tokens or prefill batch of NSEG segments, using
min(T or NSEG, 64) distinct adapters, run as the model runs it
(``vllm_slora.kernels.paged_lora`` with max_rank; per-batch metadata built
outside the timed region on both sides, as each engine does once per step).
Stock vLLM gets the same adapters in its stacked, rank-padded layout and is
called as ``PunicaWrapperGPU.add_lora_linear`` calls it. Every
implementation's output is first checked against the PyTorch reference.

The "us" columns are GPU time per call from CUDA-graph replays with L2
evicted ("eager us": one eager call, host launch cost included); the targets
apply to GPU time: ours/stock (geometric mean over batch sizes) and, for
decode, HBM% of the H100's 3.35 TB/s. The run ends with that summary, then
times knob variants of the grouped kernels on a few cases.

Files: ``cases`` (sweeps, adapters, batches), ``stock`` (stock vLLM's ops),
``timing`` (CUDA-graph timing), ``plan`` (our kernels' plan and per-launch
breakdown), ``variants`` (knob search), ``report`` (tables, summary, plot,
JSON), ``__main__`` (the sweep, the profile mode, the CLI), ``compare`` (two
trees' runs side by side: a change's before and after).
"""
