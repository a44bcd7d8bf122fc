"""Patch of ``vllm.envs`` (vLLM 0.26-0.34): the plugin's environment variables are known to vLLM.

Why: vLLM's environment check (``vllm.envs.validate_environ`` up to 0.30,
``Platform.validate_environ`` since 0.31; called by
``EngineArgs.create_engine_config``; both read ``envs.environment_variables``)
warns at every start about each ``VLLM_*`` variable it does not know,
``Unknown vLLM environment variable detected: VLLM_SLORA``, which a user
reads as a misconfiguration, and with ``--fail-on-environ-validation`` it
refuses to start. vLLM has no way for a plugin to declare its variables.

What: ``apply()`` adds each of ``VARIABLES`` to ``envs.environment_variables``
(vLLM's table of known variables, name -> getter) unless vLLM already has
it. vLLM also hashes every known variable into its torch.compile cache key
(``envs.compile_factors``): the settings that change what is compiled or
run get their value; the per-run paths (``PER_RUN``) report None, so that
a fresh metrics directory does not make every start miss the compile cache.

Guard: vLLM 0.26-0.34; ``environment_variables``, and the check that reads
it (``validate_environ`` of ``vllm.envs`` before 0.31, of ``Platform`` since).
Goes away if vLLM lets plugins declare environment variables.
"""

from __future__ import annotations

import os

from vllm_slora.patches import guard_touches

TARGET = "vllm.envs"
TOUCHES = {TARGET: ("environment_variables", "validate_environ@0.26-0.30"),
           "vllm.platforms.interface": ("Platform.validate_environ@0.31-",)}

# Every environment variable the plugin reads (tests/foundation checks the
# package for others).
VARIABLES = (
    "VLLM_SLORA",  # S-LoRA mode (activation.py)
    "VLLM_SLORA_KERNELS",  # config.py
    "VLLM_SLORA_CUDAGRAPH",
    "VLLM_SLORA_UNIFY_MEM",
    "VLLM_SLORA_SEPARATE_FRACTION",
    "VLLM_SLORA_PIN_FRACTION",
    "VLLM_SLORA_PDL",  # kernels/grouped.py
    "VLLM_SLORA_REPLAY",  # kernels/replay.py
    "VLLM_SLORA_METRICS_DIR",  # metrics.py
    "VLLM_SLORA_TRACE",  # activation.py (tests)
    "VLLM_SLORA_STEP_LOG",  # patches/vllm_v1_engine_core.py (benchmarks)
    "VLLM_SLORA_STEP_STACKS",
    "VLLM_SLORA_TEST_FAIL_UPLOADS",  # memory/uploads.py (tests: a worker-side read error)
)
PER_RUN = ("VLLM_SLORA_METRICS_DIR", "VLLM_SLORA_TRACE", "VLLM_SLORA_STEP_LOG",
           "VLLM_SLORA_STEP_STACKS", "VLLM_SLORA_TEST_FAIL_UPLOADS")


def apply() -> None:
    from vllm import envs

    guard_touches(TOUCHES)
    for name in VARIABLES:
        if name in PER_RUN:
            envs.environment_variables.setdefault(name, lambda: None)
        else:
            envs.environment_variables.setdefault(name, lambda name=name: os.environ.get(name))
