"""An adapter broken after its requests were accepted: ``python fault_job.py SPEC.json OUT.json``.

One S-LoRA engine (engine core in this process, so that the job can read the
scheduler's block pool) runs three phases:

1. ``reference``: the good adapter's and the base model's prompts;
2. per fault of ``spec["faults"]``: the same prompts plus those of an
   adapter not used before, all accepted (front-end checks pass), then
   that adapter's files are damaged as the fault says before the engine
   takes a step;
3. ``after``: the good adapter's prompts again (the engine still serves).

Records per phase each request's finish reason and tokens, and the block
pool's free blocks after the reference and after each fault.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def damage(folder: Path, fault: str, model: str) -> None:
    weights = folder / "adapter_model.safetensors"
    if fault == "weights removed":
        weights.unlink()
    elif fault == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif fault == "read error in the worker":
        pass  # the folder's name makes the worker's upload fail (VLLM_SLORA_TEST_FAIL_UPLOADS)
    elif fault == "rank above the limit":
        from vllm_slora.testing.adapters import make_peft_adapter

        shutil.rmtree(folder)
        make_peft_adapter(folder, model, 32, seed=9)
    else:
        raise ValueError(fault)


def main(spec_path: str, out_path: str) -> None:
    # A faulted request that is never finished would keep the engine
    # stepping forever: end the job (no out file) instead.
    threading.Timer(400, os._exit, args=(3,)).start()
    spec = json.loads(Path(spec_path).read_text())
    import vllm_slora

    vllm_slora.enable()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    gpu = ({"async_scheduling": True, "gpu_memory_utilization": 0.3} if spec.get("async_scheduling")
           else {"enforce_eager": True})
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, enable_lora=True, max_loras=2,
              max_lora_rank=16, seed=0, max_cpu_loras=4, **gpu)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    good = LoRARequest("good", 1, spec["good"])
    prompts = [[3 + (11 * i + j) % 400 for j in range(20 + 7 * i)] for i in range(4)]

    def run(requests, before_steps=None):
        ids = llm.enqueue([TokensPrompt(prompt_token_ids=p) for p, _ in requests], params,
                          lora_request=[lora for _, lora in requests], use_tqdm=False)
        if before_steps:
            before_steps()
        done = {o.request_id: o for o in llm.wait_for_completion(use_tqdm=False)}
        # enqueue returns internal ids ("<id>-<suffix>"), outputs carry "<id>"
        outs = {i: done.get(i) or done[i.rsplit("-", 1)[0]] for i in ids}
        return [{"adapter": lora.lora_name if lora else None,
                 "finish_reason": outs[i].outputs[0].finish_reason,
                 "stop_reason": outs[i].outputs[0].stop_reason,
                 "token_ids": list(outs[i].outputs[0].token_ids)} for (_, lora), i in zip(requests, ids)]

    clean = [(p, good) for p in prompts] + [(p, None) for p in prompts[:2]]
    out = {"reference": run(clean)}
    out["free_after_reference"] = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    out["faults"] = {}
    for k, (fault, folder) in enumerate(zip(spec["faults"], spec["bad"])):
        bad = LoRARequest("bad", 2 + k, folder)
        got = run([(p, bad) for p in prompts[:2]] + clean,
                  lambda: damage(Path(folder), fault, spec["model"]))  # noqa: B023
        out["faults"][fault] = {
            "outputs": got,
            "free_blocks": scheduler.kv_cache_manager.block_pool.get_num_free_blocks(),
            "faults_left": len(scheduler.kv_cache_manager.faults)}
    out["after"] = run([(p, good) for p in prompts])
    Path(out_path).write_text(json.dumps(out))
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
