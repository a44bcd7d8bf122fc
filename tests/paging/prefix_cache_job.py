"""Prefix caching in S-LoRA mode: ``python prefix_cache_job.py SPEC.json OUT.json``.

One engine with prefix caching on runs phases one after the other (each a
list of (prompt token ids, adapter folder, LoRA id, adapter name)) and records, per phase,
the outputs and how many prompt tokens hit the prefix cache (the requests'
``num_cached_tokens``, as vLLM reports them). The suite's one CPU engine
that vLLM compiles (torch.compile with inductor, not eager): the paged LoRA
op inside vLLM's compiled graph on CPU.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# The engine core in this process: os._exit below then leaves no engine
# process behind holding the parent's pipes.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec["plugin"]:
        import vllm_slora

        vllm_slora.enable()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(model=spec["model"], skip_tokenizer_init=True, enable_lora=True, max_loras=4,
              max_lora_rank=16, seed=0, enable_prefix_caching=True,
              max_cpu_loras=8)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True,
                            logprobs=1)
    phases = []
    for phase in spec["phases"]:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _, _, _ in phase], params,
                            lora_request=[LoRARequest(n, i, a) for _, a, i, n in phase],
                            use_tqdm=False)
        phases.append({"hits": sum(o.num_cached_tokens or 0 for o in outs),
                       "outputs": [{"token_ids": list(o.outputs[0].token_ids),
                                    "logprobs": [s[t].logprob for t, s in
                                                 zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]}
                                   for o in outs]})
    Path(out_path).write_text(json.dumps(phases))
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
