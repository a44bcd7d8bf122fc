"""Compare two greedy runs of the same requests, token for token.

Two runs of one model can differ where the top two candidates are within
rounding of each other (a different batch, kernel or tensor-parallel split
sums in another order). ``first_divergence`` tells such near-ties from real
differences, using each run's per-step top-2 logprobs; ``compare_runs``
summarises a whole workload.
"""

from __future__ import annotations

TIE_THRESHOLD = 0.05  # nats


def margin(step: dict | None) -> tuple[float | None, int | None]:
    """(top-1 minus top-2 logprob, top-2 token) of one step's candidates."""
    if not step or len(step) < 2:
        return None, None
    (_, first), (second_tok, second) = sorted(step.items(), key=lambda kv: -kv[1])[:2]
    return round(first - second, 6), second_tok


def first_divergence(a_tokens: list[int], b_tokens: list[int], a_top: list[dict] | None = None,
                     b_top: list[dict] | None = None, threshold: float = TIE_THRESHOLD) -> dict:
    """Where two greedy outputs first differ, and why.

    ``a_top``/``b_top``: per step ``{token id: logprob}`` of the top candidates.
    ``class``: ``near-tie`` when at the first differing position each run's
    runner-up is the other run's choice and both margins (top-1 minus top-2)
    are < ``threshold``; ``clear`` otherwise; ``unexplained`` when a run has
    no top-2 logprobs there. What follows the first difference is conditioned
    on different tokens and says nothing more.
    """
    pos = next((i for i, (a, b) in enumerate(zip(a_tokens, b_tokens)) if a != b),
               min(len(a_tokens), len(b_tokens)))
    a = a_tokens[pos] if pos < len(a_tokens) else None
    b = b_tokens[pos] if pos < len(b_tokens) else None
    a_margin, a_second = margin(a_top[pos] if a_top and pos < len(a_top) else None)
    b_margin, b_second = margin(b_top[pos] if b_top and pos < len(b_top) else None)
    if a_margin is None or b_margin is None:
        cls = "unexplained"
    elif a_second == b and b_second == a and max(a_margin, b_margin) < threshold:
        cls = "near-tie"
    else:
        cls = "clear"
    return {"position": pos, "a_token": a, "b_token": b, "a_margin": a_margin,
            "b_margin": b_margin, "a_runner_up": a_second, "b_runner_up": b_second,
            "class": cls, "threshold": threshold}


def _top(output: dict) -> list[dict] | None:
    top = output.get("top_logprobs")
    return None if top is None else [{int(t): lp for t, lp in step.items()} for step in top]


def compare_runs(a: list[dict], b: list[dict], threshold: float = TIE_THRESHOLD) -> dict:
    """Outputs of two ``vllm_slora.testing.runner`` runs of the same requests.

    Returns ``identical`` (requests with equal tokens), ``divergences`` (one
    ``first_divergence`` per other request, with its index), ``clear`` (those
    not explained as near-ties, unexplained ones included) and
    ``max_logprob_diff`` over the tokens both runs share before diverging.
    """
    divergences, worst = [], 0.0
    for i, (x, y) in enumerate(zip(a, b)):
        d = first_divergence(x["token_ids"], y["token_ids"], _top(x), _top(y), threshold)
        shared = d["position"]
        worst = max([worst] + [abs(p - q) for p, q in
                               zip(x["logprobs"][:shared], y["logprobs"][:shared])])
        if x["token_ids"] != y["token_ids"]:
            divergences.append({"request": i, **d})
    return {"requests": len(a), "identical": len(a) - len(divergences),
            "divergences": divergences, "max_logprob_diff": worst,
            "clear": sum(d["class"] != "near-tie" for d in divergences)}
