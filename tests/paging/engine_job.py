"""One vLLM engine run for the paging tests, in a fresh process.

``python engine_job.py SPEC.json OUT.json``. The spec names the model, the
mode (``stock`` or ``slora``), LLM arguments and a list of phases (each a list
of (prompt token ids, adapter folder or None) and max_tokens), run one after
the other in the same engine so several checks share one engine start. The
result has each phase's outputs, the KV block count, and for S-LoRA mode the
plugin's counters and checks made inside the worker process (run there with
``LLM.collective_rpc``; this file runs as ``__main__``, so the functions
travel by value). ``run_engine`` runs it with the engine core in this
process (``testing.runner.IN_PROCESS_ENV``); the suite's serving and
foundation tests run vLLM's processes as users do.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def worker_kv_blocks(worker) -> int:
    return worker.model_runner.kv_cache_config.num_blocks


def worker_report(worker) -> dict:
    """Counters and 'really in the pool' facts, computed in the worker."""
    import torch

    runner = worker.model_runner
    manager = runner.lora_manager
    pager = manager.pager
    model = runner.model
    report = {"stats": manager.stats(), "manager": type(manager).__name__,
              "lora_layers": [f"{layer.layer_idx}.{layer.group}" for layer in manager.layers]}
    report["stacked_lora_tensors"] = sorted(
        name for name, mod in model.named_modules()
        if hasattr(mod, "lora_a_stacked") or hasattr(mod, "lora_b_stacked"))
    report["lora_params"] = sorted(n for n, _ in model.named_parameters() if "lora" in n)
    report["lora_buffers"] = {n: b.numel() for n, b in model.named_buffers() if "lora" in n}
    if not pager.bound:
        return report
    # Each pool: the layer's KV storage from where the layer's view begins
    # (one buffer per layer up to vLLM 0.28, one for all layers since) to its end.
    report["pool_shares_kv_storage"] = all(
        pool.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr()
        and pool.storage_offset() * pool.element_size() == kv.storage_offset() * kv.element_size()
        and (kv.storage_offset() * kv.element_size() + pool.numel() * pool.element_size()
             == kv.untyped_storage().nbytes())
        for pool, kv in zip(pager.pools, pager.kv_tensors))
    # Each resident adapter's pages, read back through the attention layout
    # (kv[block] is what the attention kernel addresses as block b), equal
    # the adapter's weights read from its PEFT folder.
    from safetensors.torch import load_file

    from vllm_slora.memory.adapter_files import ADAPTER_FILE, read_adapter_meta
    from vllm_slora.memory.packing import pack_adapter

    geo, checked, mismatched = pager.geo, 0, []
    for lora_id, res in list(pager.resident.items())[:8]:
        meta = res.meta  # as the scheduler read it (the kinds --lora-target-modules allows)
        assert meta.rank == read_adapter_meta(res.path).rank
        packed = pack_adapter(meta, geo, load_file(str(Path(res.path) / ADAPTER_FILE)))
        n = packed.shape[1]
        for layer, kv in enumerate(pager.kv_tensors):
            pages = torch.cat([kv[b].reshape(-1).view(geo.dtype).view(-1, geo.page_width)
                               for b in res.block_ids])[:n]
            if not torch.equal(pages, packed[layer]):
                mismatched.append((lora_id, layer))
        checked += 1
    report["adapters_checked_in_kv"] = checked
    report["adapters_mismatched_in_kv"] = mismatched
    report["rows_per_block"] = geo.rows_per_block
    report["page_width"] = geo.page_width
    return report


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec["mode"] == "slora":
        import vllm_slora

        vllm_slora.enable()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(model=spec["model"], skip_tokenizer_init=True, seed=0, enforce_eager=True,
              enable_lora=spec.get("enable_lora", True), **spec.get("llm_kwargs", {}))
    result = {"phases": [], "kv_blocks": llm.collective_rpc(worker_kv_blocks)[0]}
    lora_ids: dict[str, int] = {}
    for phase in spec["phases"]:
        loras = []
        for _, path in phase["requests"]:
            if path is not None and path not in lora_ids:
                lora_ids[path] = len(lora_ids) + 1
            loras.append(None if path is None else LoRARequest(Path(path).name, lora_ids[path], path))
        if not spec.get("enable_lora", True):
            loras = None
        params = SamplingParams(temperature=0.0, max_tokens=phase.get("max_tokens", 8),
                                ignore_eos=True, logprobs=1)
        start = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in phase["requests"]],
                            params, lora_request=loras, use_tqdm=False)
        elapsed = time.perf_counter() - start
        outputs = []
        for o in outs:
            c = o.outputs[0]
            outputs.append({"token_ids": list(c.token_ids),
                            "logprobs": [s[t].logprob for t, s in zip(c.token_ids, c.logprobs)]})
        entry = {"name": phase["name"], "outputs": outputs, "elapsed_s": elapsed}
        if spec["mode"] == "slora":
            entry["report"] = llm.collective_rpc(worker_report)[0]
        result["phases"].append(entry)
        if phase.get("reset_prefix_cache_after"):
            result.setdefault("reset_ok", []).append(llm.reset_prefix_cache())
    Path(out_path).write_text(json.dumps(result))
    os._exit(0)  # no engine teardown: nothing of it is checked


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
