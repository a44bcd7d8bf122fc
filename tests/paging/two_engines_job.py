"""Two S-LoRA engines in one process: ``python two_engines_job.py SPEC.json OUT.json``.

Engine cores run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so
both engines' paged LoRA layers live in one interpreter. Engine A serves
its requests, engine B (another model of the same architecture, so the same
layer names) serves its own, then A serves its requests again. Writes A's
outputs before and after B, and B's.
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

    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True,
                            logprobs=1)

    def run(llm, requests):
        ids = {a: i + 1 for i, a in enumerate(sorted({a for _, a in requests if a}))}
        loras = [LoRARequest(Path(a).name, ids[a], a) if a else None for _, a in requests]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in requests], params,
                            lora_request=loras, use_tqdm=False)
        return [{"token_ids": list(o.outputs[0].token_ids),
                 "logprobs": [s[t].logprob for t, s in zip(o.outputs[0].token_ids,
                                                           o.outputs[0].logprobs)]}
                for o in outs]

    kw = dict(skip_tokenizer_init=True, enable_lora=True, max_loras=1, max_lora_rank=16, seed=0,
              gpu_memory_utilization=0.3, max_cpu_loras=8, enforce_eager=True)
    a = LLM(model=spec["model_a"], **kw)
    first = run(a, spec["requests_a"])
    b = LLM(model=spec["model_b"], **kw)
    other = run(b, spec["requests_b"])
    again = run(a, spec["requests_a"])
    Path(out_path).write_text(json.dumps({"a_first": first, "b": other, "a_again": again}))
    os._exit(0)  # two in-process engines: skip their teardown


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
