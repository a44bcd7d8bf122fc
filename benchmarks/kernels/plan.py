"""Our grouped kernels' plan for a case and its GPU time per launch.

The "plan" column is the grouped kernels' choice (``grouped.describe``): T/S/A
= per token / per segment / per adapter, then BM, then k<split>f|r when the
shrink splits K (partials summed in the expand, or by a reduce launch), then
n<blocks> when an expand program streams several column blocks. The JSON also
has, for the bandwidth-bound cases, our GPU time split into grouping, shrink
(+ reduce) and expand launches (``breakdown``).
"""

from benchmarks.kernels.timing import graph_us


def _grouped_setup(ad, x, ns, token_lora, segments, r_max, d, meta=None, build_meta=True):
    from vllm_slora.kernels.grouping import make_groups
    from vllm_slora.kernels.plan import plan, shape_of

    num_loras = ad.lora_start.shape[0]
    groups = make_groups(token_lora, num_loras, segments, meta, build_meta)
    pl = plan(shape_of(groups, x.shape[0], x.shape[1], max(ns), len(ns), r_max, d, x.device,
                       x.dtype))
    return groups, pl


def plan_tag(ad, x, ns, token_lora, segments, r_max, d, meta=None):
    from vllm_slora.kernels.grouped import describe

    groups, pl = _grouped_setup(ad, x, ns, token_lora, segments, r_max, d, meta, False)
    return describe(groups, pl, r_max)


def breakdown(flush, c):
    """Our GPU time per launch: grouping (decode; once per batch, not in the
    op's time), shrink (+ reduce when the partials are not summed by the
    expand), expand."""
    import torch

    from vllm_slora.kernels.expand import launch_expand
    from vllm_slora.kernels.grouped import fuse_partials
    from vllm_slora.kernels.grouping import ADAPTERS, group_by_adapter
    from vllm_slora.kernels.shrink import launch_reduce, launch_shrink

    ad, x, ns, token_lora, r_max = c.ad, c.x, c.ns, c.token_lora, c.r_max
    d = ad.pool.shape[1]
    groups, pl = _grouped_setup(ad, x, ns, token_lora, c.segments, r_max, d, c.meta)
    s, t, num_loras = len(ns), x.shape[0], ad.lora_start.shape[0]
    meta = (ad.lora_start, ad.lora_rank)
    out = {}

    def bench(fn):
        return graph_us(fn, flush)

    if groups.mode == ADAPTERS:
        out["us_ours_grouping"] = bench(lambda: group_by_adapter(token_lora, num_loras))
    fused = fuse_partials(groups, pl, r_max)
    ws = torch.empty((pl.split, s, t, r_max), dtype=torch.float32, device=x.device)
    v = ws[0] if pl.split == 1 else torch.empty((s, t, r_max), dtype=torch.float32, device=x.device)

    def shrink():
        launch_shrink(x, ad.pool, ad.a_rows, *meta, token_lora, v if pl.split == 1 else ws,
                      groups, pl)
        if pl.split > 1 and not fused:
            launch_reduce(ws, v, token_lora, ad.lora_rank)

    shrink()
    out["us_ours_shrink"] = bench(shrink)
    y = c.y0.clone()
    vin, v_split = (ws, pl.split) if fused else (v, 1)
    out["us_ours_expand"] = bench(
        lambda: launch_expand(vin, ad.pool, ad.b_rows, *meta, ad.lora_scale, token_lora, y,
                              groups, pl, v_split)
    )
    return out
