"""``pin_lora`` in S-LoRA mode: ``python pin_job.py SPEC.json OUT.json``.

One engine (engine core in this process, so that the job can read the
scheduler's pool): adapter "pinned" is registered and pinned, requests of
six other adapters run, the cache of unreferenced adapters is emptied (as
``reset_prefix_cache`` does), and the pinned adapter's requests run again;
then a pin of an unregistered adapter, and ``remove_lora``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import vllm_slora

    vllm_slora.enable()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(model=spec["model"], skip_tokenizer_init=True, enable_lora=True, max_loras=2,
              max_lora_rank=16, seed=0, max_cpu_loras=8, enforce_eager=True)
    pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.adapters
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [[3 + (7 * i + j) % 300 for j in range(12 + 5 * i)] for i in range(3)]
    pinned = LoRARequest("pinned", 1, spec["pinned"])
    others = [LoRARequest(f"o{k}", 2 + k, p) for k, p in enumerate(spec["others"])]

    def run(loras):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts] * len(loras), params,
                            lora_request=[lora for lora in loras for _ in prompts], use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    out = {}
    out["add"] = llm.llm_engine.add_lora(pinned)
    out["pin"] = llm.llm_engine.pin_lora(1)
    out["resident_after_pin"] = 1 in pool.resident and 1 in pool.user_pins
    out["first"] = run([pinned])
    run(others)
    out["evicted"] = pool.evict_unreferenced()
    out["resident_after_pressure"] = sorted(pool.resident)
    out["again"] = run([pinned])
    try:
        llm.llm_engine.pin_lora(99)
        out["unknown"] = None
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        out["unknown"] = f"{type(e).__name__}: {e}"
    out["remove"] = llm.llm_engine.remove_lora(1)
    out["pins_after_remove"] = sorted(pool.user_pins)
    out["evicted_after_remove"] = pool.evict_unreferenced()
    Path(out_path).write_text(json.dumps(out))
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
