"""Knob variants of the grouped kernels (``vllm_slora/kernels/knobs.py``), timed
on a few cases at the end of the full run (or alone with --variants-only) to
tune the next version: one table row per case, ours GPU us per variant.
"""

from benchmarks.kernels.cases import make_case
from benchmarks.kernels.plan import plan_tag
from benchmarks.kernels.timing import graph_us, make_flush

VARIANT_CASES = [
    ("7b", "qkv", "mix8-64", "decode", 32),
    ("7b", "o", "mix8-64", "decode", 32),
    ("7b", "o", "r64", "decode", 512),
    ("7b", "o", "mix8-64", "decode", 512),
    ("7b", "down", "r16", "decode", 512),
    ("7b", "down", "mix8-64", "decode", 512),
    ("7b", "gate_up", "r64", "decode", 512),
    ("7b", "o", "r64", "prefill", 8),
    ("7b", "down", "r16", "prefill", 8),
    ("7b", "down", "mix8-64", "prefill", 64),
]
KNOBS = [
    ("base", {}),
    ("pps2", {"PROGRAMS_PER_SM": 2}),
    ("pps8", {"PROGRAMS_PER_SM": 8}),
    ("bpps2", {"BIG_TILE_PROGRAMS_PER_SM": 2}),
    ("nosplit", {"MAX_SPLIT": 1}),
    ("stages3", {"SHRINK_STAGES": 3}),
    ("fuse64k", {"FUSED_PARTIALS_BYTES": 64 << 10}),
    ("nbp1", {"EXPAND_MAX_NBP": 1}),
    ("nbp32", {"EXPAND_MAX_NBP": 32}),
    ("epps1", {"EXPAND_PROGRAMS_PER_SM": 1}),
    ("ep8n8", {"EXPAND_PROGRAMS_PER_SM": 8, "EXPAND_MAX_NBP": 8}),
    ("estage2", {"EXPAND_STAGES": 2}),
    ("sw8", {"SMALL_TILE_WARPS": (8, 8)}),
    ("ew4", {"SMALL_TILE_WARPS": (4, 4)}),
    ("s32x256", {"SMALL_TILE_SHRINK": (32, 256), "SHRINK_STAGES": 3}),
    ("s32x128", {"SMALL_TILE_SHRINK": (32, 128)}),
    ("s64x128", {"SMALL_TILE_SHRINK": (64, 128), "SHRINK_STAGES": 3}),
    ("s64x64", {"SMALL_TILE_SHRINK": (64, 64)}),
    ("s16x128", {"SMALL_TILE_SHRINK": (16, 128)}),
    ("nopdl", {"PDL": False}),
    ("nometa", None),  # decode: group_by_adapter inside the call (per token up to 32 tokens)
]


def run_variants(sweep, device="cuda", cases=None) -> list[dict]:
    import torch

    from vllm_slora.kernels import knobs as kernel_knobs

    flush = make_flush()
    gen = torch.Generator(device=device).manual_seed(1)
    out = []
    print("knob variants: ours GPU us per variant (base = the defaults above)")
    print(f"{'case':32} " + " ".join(f"{name:>9}" for name, _ in KNOBS))
    for model, mod, rset, mode, size in cases or VARIANT_CASES:
        c = make_case(torch, model, mod, rset, mode, size, sweep, device, gen)
        res = {}
        for name, knobs in KNOBS:
            saved = {}
            try:
                meta = "batch"
                if knobs is None:
                    if c.meta is None:
                        continue
                    meta = None
                else:
                    for key, value in knobs.items():
                        saved[key] = getattr(kernel_knobs, key)
                        setattr(kernel_knobs, key, value)
                y = c.y0.clone()
                res[name] = graph_us(lambda y=y, meta=meta, c=c: c.ours(y, meta), flush)
                res[name + "_plan"] = plan_tag(
                    c.ad, c.x, c.ns, c.token_lora, c.segments, c.r_max, sweep.d,
                    c.meta if meta else None,
                )  # fmt: skip
            except Exception as e:  # a variant that fails to compile or run
                res[name] = float("nan")
                print(f"  {name}: {type(e).__name__}: {str(e)[:200]}")
            finally:
                for key, value in saved.items():
                    setattr(kernel_knobs, key, value)
        label = f"{model} {mod} {rset} {mode} {size}"
        print(f"{label:32} " + " ".join(
            f"{res[name]:9.1f}" if name in res else f"{'-':>9}" for name, _ in KNOBS), flush=True)
        out.append(dict(case=label, **res))
        del c
        if device == "cuda":
            torch.cuda.empty_cache()
    return out
