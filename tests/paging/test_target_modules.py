"""``--lora-target-modules`` (``LoRAConfig.target_modules``) in S-LoRA mode:
vLLM then wraps only the projections named (a fused one, qkv_proj or
gate_up_proj, when it or one of its slices is named) and ignores the
adapters' other weights. The plugin pages in and applies only those
groups too, and its outputs equal stock's; an adapter with no weights on
them fails its request with a clear error. fp32 on CPU."""

from __future__ import annotations

import pytest
from conftest import prompts, run_engine
from test_architectures import assert_same_outputs

from vllm_slora.testing.adapters import make_adapters, make_peft_adapter
from vllm_slora.testing.models import make_tiny_llama

COMMON = {"dtype": "float32", "max_lora_rank": 16}
TARGETS = ["q_proj", "down_proj"]  # a slice names qkv_proj; o_proj and gate_up_proj left out


@pytest.mark.parametrize("targets", [["q_proj", "down_proj"], ["qkv_proj"], ["o_proj", "up_proj"],
                                     ["gate_up_proj", "v_proj"], ["lm_head"], None])
def test_groups_are_those_stock_wraps(targets):
    """``deployment_kinds`` against vLLM's own rule (``is_in_target_modules``,
    with Llama's packed modules): a group's kinds are kept exactly when stock
    wraps its layer."""
    from vllm.lora.utils import is_in_target_modules

    from vllm_slora.memory.layout import GROUPS, PACKED, deployment_kinds

    kinds = deployment_kinds(targets)
    packed = {fused: list(slices) for fused, slices in PACKED.items()}
    for group, group_kinds in GROUPS.items():
        stock = is_in_target_modules(f"model.layers.0.self_attn.{group}", targets, packed)
        assert stock == (kinds is None or set(group_kinds) <= kinds), (targets, group)
        assert kinds is None or not (set(group_kinds) & kinds) or set(group_kinds) <= kinds


def test_per_layer_targets_are_refused():
    from vllm_slora.memory.layout import deployment_kinds

    with pytest.raises(ValueError, match="every layer or in none"):
        deployment_kinds(["model.layers.0.self_attn.o_proj"])


def test_restricted_adapters_pack_only_their_kept_groups(tiny_model, tmp_path):
    """Both packers, given an adapter restricted to some groups, fill exactly
    those groups' pages, equal to the pages the whole adapter gives them."""
    from safetensors.torch import load_file

    from vllm_slora.memory.adapter_files import ADAPTER_FILE, read_adapter_meta
    from vllm_slora.memory.layout import PageGeometry, deployment_kinds
    from vllm_slora.memory.packing import pack_adapter, pack_file_bytes, read_header
    from test_pool import hf_config

    path = make_adapters(tmp_path, tiny_model, [8], seed=2)[0]
    whole = read_adapter_meta(str(path))
    kept = whole.restricted(deployment_kinds(TARGETS))
    assert kept.kinds == ("q_proj", "k_proj", "v_proj", "down_proj") and kept.rank == whole.rank
    assert whole.restricted(None) is whole
    import torch

    geo = PageGeometry.create(hf_config(tiny_model), torch.float32, 16 * 2 * 2 * 32 * 4)
    tensors = load_file(str(path / ADAPTER_FILE))
    full, part = pack_adapter(whole, geo, tensors), pack_adapter(kept, geo, tensors)
    assert part.shape[1] == kept.rows(geo) < whole.rows(geo)
    for kind, (lo, hi) in kept.offsets(geo).items():
        a, b = whole.offsets(geo)[kind]
        n = hi - lo + kept.rank * geo.width(kind)[1] // geo.page_width
        assert torch.equal(part[:, lo:lo + n], full[:, a:a + n]), kind
    with open(path / ADAPTER_FILE, "rb") as f:
        header, _ = read_header(f)
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    assert torch.equal(pack_file_bytes(kept, geo, data, header), part)


def test_an_adapter_without_kept_weights_fails_its_request(tiny_model, tmp_path):
    from vllm_slora.memory.adapter_pool import AdapterFault
    from test_pool import make_manager, make_request

    mlp_only = make_peft_adapter(tmp_path / "mlp", tiny_model, 4,
                                 target_modules=("gate_proj", "up_proj", "down_proj"))
    manager = make_manager(64, tiny_model)
    manager.adapters.kinds = frozenset({"o_proj"})
    req = make_request("r", str(mlp_only), 1)
    assert manager.allocate_slots(req, 10) is None
    assert "no LoRA weights on the modules --lora-target-modules names (o_proj)" in manager.faults["r"]
    with pytest.raises(AdapterFault):
        manager.adapters.meta(str(mlp_only))


def test_front_end_check_counts_only_the_kept_modules(tiny_model, tmp_path):
    """The front end's check (``InputProcessor._validate_lora``) sizes an
    adapter by the modules --lora-target-modules keeps: one that fits only
    so is accepted, one with none of them is refused with the cause."""
    import torch

    from vllm_slora.adapters import AdapterError, check_adapter
    from vllm_slora.memory.layout import PageGeometry, deployment_kinds
    from test_pool import hf_config

    cfg = hf_config(tiny_model)
    geo = PageGeometry.create(cfg, torch.float32, 16 * 2 * 2 * 32 * 4)
    path = str(make_adapters(tmp_path, tiny_model, [8], seed=2)[0])
    kept = deployment_kinds(TARGETS)
    whole = check_adapter(path, "a", cfg, 8, geometry=geo)
    part = geo.blocks_for(8, tuple(k for k in whole.kinds if k in kept))
    assert part < whole.blocks
    info = check_adapter(path, "a", cfg, 8, geometry=geo, usable_blocks=part, kinds=kept)
    assert info.blocks == part and info.kinds == whole.kinds  # the pool restricts the kinds
    with pytest.raises(AdapterError, match="needs"):
        check_adapter(path, "a", cfg, 8, geometry=geo, usable_blocks=part)
    mlp_only = make_peft_adapter(tmp_path / "mlp", tiny_model, 4,
                                 target_modules=("gate_proj", "up_proj", "down_proj"))
    with pytest.raises(AdapterError, match=r"no LoRA weights on the modules "
                                           r"--lora-target-modules names \(o_proj\)"):
        check_adapter(str(mlp_only), "m", cfg, 8, kinds=frozenset({"o_proj"}))


@pytest.mark.slow
def test_target_modules_restrict_the_plugin_as_they_restrict_stock(tmp_path):
    model = make_tiny_llama(tmp_path / "model", seed=5)
    adapters = [str(p) for p in make_adapters(tmp_path / "adapters", model, [4, 8, 16], seed=6)]
    reqs = [(p, adapters[i % len(adapters)]) for i, p in enumerate(prompts(6, seed=11))]
    phases = [{"name": "targets", "requests": reqs, "max_tokens": 8}]
    restricted = dict(COMMON, lora_target_modules=TARGETS)
    stock = run_engine({"model": str(model), "mode": "stock", "phases": phases,
                        "llm_kwargs": dict(restricted, max_loras=4, max_cpu_loras=4)})
    slora = run_engine({"model": str(model), "mode": "slora", "phases": phases,
                        "llm_kwargs": dict(restricted, max_loras=1)})
    whole = run_engine({"model": str(model), "mode": "slora", "phases": phases,
                        "llm_kwargs": dict(COMMON, max_loras=1)})
    assert_same_outputs(slora, stock, reqs, "targets")
    # The modules left out matter for these adapters (else the test proves nothing) ...
    assert any(a["logprobs"] != b["logprobs"]
               for a, b in zip(slora["phases"][0]["outputs"], whole["phases"][0]["outputs"]))
    # ... and take no pages: q,k,v and down of each adapter, not all seven.
    pages = slora["phases"][0]["report"]["stats"]["pages_written"]
    assert 0 < pages < whole["phases"][0]["report"]["stats"]["pages_written"]
    # Only the groups named are wrapped.
    wrapped = {name.rsplit(".", 1)[-1] for name in slora["phases"][0]["report"]["lora_layers"]}
    assert wrapped == {"qkv_proj", "down_proj"}
