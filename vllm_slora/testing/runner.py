"""Run a token-id workload through ``vllm.LLM`` in a fresh process.

A fresh process per run keeps S-LoRA mode, environment variables and vLLM's
engine processes from leaking between runs, and lets one test compare stock
and plugin on the same requests. ``plugin`` is one of:

- ``"none"``: vLLM without this plugin (``VLLM_PLUGINS`` lists only vLLM's own);
- ``"off"``:  the plugin installed and loaded, S-LoRA mode off;
- ``"on"``:   S-LoRA mode (``vllm_slora.enable()`` before ``LLM``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PLUGIN_MODES = ("none", "off", "on")
# For engines that run eager (enforce_eager): vLLM 0.26 still compiles its
# CPU sampler (``compiled_random_sample``) with torch.compile as the engine
# warms up, 16 of an engine's 51 s to start on a 2-core machine; an eager
# engine has nothing else for TorchDynamo to do.
EAGER_ENV = {"TORCHDYNAMO_DISABLE": "1"}
# The engine core in the run's own process: two Python start-ups and an
# engine shut-down fewer, ~20 s a run on the CPU machine. For runs that
# check outputs; the tests of processes and plugin loading keep vLLM's.
IN_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
# vLLM's own general plugins: "none" keeps them and drops only ours.
STOCK_PLUGINS = "lora_filesystem_resolver,lora_hf_hub_resolver"


@dataclass
class Workload:
    model: str
    # (prompt token ids, adapter folder or None) per request.
    requests: list[tuple[list[int], str | None]]
    plugin: str = "off"
    max_tokens: int = 8
    logprobs: int = 1
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    llm_kwargs: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)


def run_workload(workload: Workload, timeout: float = 900) -> dict:
    """Run ``workload`` in a child process; return its result dict.

    Result: ``outputs`` (per request: ``token_ids``, ``logprobs`` of the chosen
    tokens and, when ``logprobs`` >= 2, ``top_logprobs``: per step
    ``{token id (str): logprob}`` of the top candidates), ``elapsed_s``
    (generate() wall time), ``output_tokens``,
    ``log`` (the child's stderr tail) and ``stats`` (the plugin's, if any).
    """
    if workload.plugin not in PLUGIN_MODES:
        raise ValueError(f"plugin={workload.plugin!r}; expected one of {PLUGIN_MODES}")
    env = dict(os.environ)
    env.pop("VLLM_SLORA", None)
    env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if workload.plugin == "none":
        env["VLLM_PLUGINS"] = STOCK_PLUGINS
    if workload.llm_kwargs.get("enforce_eager"):
        env.update(EAGER_ENV)
    env.update(workload.env)
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps(asdict(workload)))
        proc = subprocess.run([sys.executable, "-m", __name__, str(spec), str(out)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"workload run failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-6000:]}")
        result = json.loads(out.read_text())
    result["log"] = proc.stderr[-6000:]
    return result


def _child(spec_path: str, out_path: str) -> None:
    w = Workload(**json.loads(Path(spec_path).read_text()))
    if w.plugin == "on":
        import vllm_slora

        vllm_slora.enable()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    kwargs = dict(model=w.model, skip_tokenizer_init=True, enable_lora=True,
                  max_loras=w.max_loras, max_lora_rank=w.max_lora_rank, seed=0)
    if w.max_cpu_loras is not None:
        kwargs["max_cpu_loras"] = w.max_cpu_loras
    if not (Path(w.model) / "model.safetensors").exists():
        kwargs["load_format"] = "dummy"
    kwargs.update(w.llm_kwargs)
    llm = LLM(**kwargs)

    lora_ids: dict[str, int] = {}
    loras = []
    for _, adapter in w.requests:
        if adapter is None:
            loras.append(None)
            continue
        if adapter not in lora_ids:
            lora_ids[adapter] = len(lora_ids) + 1
        loras.append(LoRARequest(Path(adapter).name, lora_ids[adapter], adapter))
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in w.requests]
    params = SamplingParams(temperature=0.0, max_tokens=w.max_tokens, ignore_eos=True,
                            logprobs=w.logprobs)
    start = time.perf_counter()
    results = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    elapsed = time.perf_counter() - start

    outputs = []
    for r in results:
        c = r.outputs[0]
        lps = [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs or [])]
        outputs.append({"token_ids": list(c.token_ids), "logprobs": lps})
        if w.logprobs >= 2:
            outputs[-1]["top_logprobs"] = [{str(t): lp.logprob for t, lp in step.items()}
                                           for step in c.logprobs or []]
    stats = {}
    if w.plugin == "on":
        from vllm_slora.memory import stats as slora_stats

        stats = slora_stats.collect(llm)
    Path(out_path).write_text(json.dumps({
        "outputs": outputs,
        "elapsed_s": elapsed,
        "output_tokens": sum(len(o["token_ids"]) for o in outputs),
        "stats": stats,
        "cudagraph_mode": str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode),
        "quantization": llm.llm_engine.vllm_config.model_config.quantization,
    }))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
