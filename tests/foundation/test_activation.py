"""Switching S-LoRA mode on and off, and the errors users can hit.

Each case runs in a child process: switching the mode sets an environment
variable and patches vLLM, which must not leak into the test process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from vllm_slora.activation import VllmVersionError, check_vllm_version


def run_py(code: str, env: dict | None = None, timeout: float = 300):
    full_env = {k: v for k, v in os.environ.items() if k != "VLLM_SLORA"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_vllm(*args: str, timeout: float = 300):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_SLORA"}
    return subprocess.run([sys.executable, "-m", "vllm.entrypoints.cli.main", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("version", ["0.25.1", "0.35.0", "0.35.0rc1", "1.0.0"])
def test_vllm_versions_outside_the_range_are_refused(version):
    with pytest.raises(VllmVersionError,
                       match=rf"supports vLLM 0\.26\.0 to 0\.34\.x, found vLLM {version}"):
        check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.26.0", "0.26.3+cpu", "0.29.0", "0.32.0+cpu", "0.34.0",
                                     "0.34.2rc1"])
def test_vllm_versions_in_the_range_are_accepted(version):
    assert check_vllm_version(version) == version


def test_version_spans():
    from vllm_slora.versions import at_least, in_span

    assert in_span("0.26-0.31", "0.31.2") and not in_span("0.26-0.31", "0.32.0+cpu")
    assert in_span("0.32-", "0.34.0") and not in_span("0.32-", "0.31.0")
    assert in_span("0.26", "0.26.1") and not in_span("0.26", "0.27.0")
    assert at_least("0.32", "0.32.0+cpu") and not at_least("0.32", "0.31.9")


def test_mode_on_with_another_vllm_is_one_clear_error():
    proc = run_py("""
        import vllm
        vllm.__version__ = "0.25.0"
        import vllm_slora
        vllm_slora.enable()
    """)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "VllmVersionError" in last and "found vLLM 0.25.0" in last and "0.26.0 to 0.34.x" in last


def test_mode_off_with_another_vllm_leaves_vllm_alone():
    proc = run_py("""
        import vllm
        vllm.__version__ = "0.25.0"
        from vllm.engine.arg_utils import EngineArgs
        stock = EngineArgs.add_cli_args
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        assert EngineArgs.add_cli_args is stock, "patched a vLLM it does not support"
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "supports vLLM 0.26.0 to 0.34.x, found vLLM 0.25.0" in proc.stderr


def test_mode_on_without_enable_lora_says_the_fix(tiny_model):
    proc = run_py(f"""
        import vllm_slora
        vllm_slora.enable()
        from vllm.engine.arg_utils import EngineArgs
        EngineArgs(model="{tiny_model}", skip_tokenizer_init=True).create_engine_config()
    """)
    assert proc.returncode != 0
    assert "add --enable-lora" in proc.stderr and "enable_lora=True" in proc.stderr


def test_mode_off_does_not_require_lora(tiny_model):
    proc = run_py(f"""
        from vllm.engine.arg_utils import EngineArgs
        cfg = EngineArgs(model="{tiny_model}", skip_tokenizer_init=True).create_engine_config()
        assert cfg.lora_config is None
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_serve_help_lists_the_plugin_flag():
    proc = run_vllm("serve", "--help=plugin")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--plugin NAME" in proc.stdout and "vllm_slora" in proc.stdout
    assert "--additional-config" in proc.stdout and "pin_fraction" in proc.stdout  # its settings


def test_settings_the_vllm_way_reach_the_engine_processes(tiny_model):
    """``additional_config={"vllm_slora": ...}`` (``--additional-config``) sets
    the variables the engine's processes read, before they start; unknown
    keys and bad values are refused by name, and nothing is set then."""
    proc = run_py(f"""
        import os
        import vllm_slora
        vllm_slora.enable()
        from vllm.engine.arg_utils import EngineArgs
        from vllm_slora.config import slora_config

        def config(settings):
            return EngineArgs(model="{tiny_model}", skip_tokenizer_init=True, enable_lora=True,
                              additional_config={{"vllm_slora": settings}}).create_engine_config()

        config({{"unify_mem": False, "separate_fraction": 0.3, "pin_fraction": 0.25, "kernels": "torch"}})
        assert (os.environ["VLLM_SLORA_UNIFY_MEM"], os.environ["VLLM_SLORA_PIN_FRACTION"]) == ("0", "0.25")
        c = slora_config()
        assert (c.unify_mem, c.separate_fraction, c.pin_fraction, c.kernels) == (False, 0.3, 0.25, "torch")
        for bad, words in (({{"no_such": 1}}, "unknown vllm_slora setting(s) no_such"),
                           ({{"kernels": "fast", "pin_fraction": 0.9}}, "VLLM_SLORA_KERNELS='fast'"),
                           ({{"pin_fraction": 2}}, "VLLM_SLORA_PIN_FRACTION=2.0 must be within")):
            try:
                config(bad)
            except ValueError as e:
                assert words in str(e), str(e)
            else:
                raise AssertionError(bad)
        assert os.environ["VLLM_SLORA_PIN_FRACTION"] == "0.25" and slora_config().kernels == "torch"
        print("settings ok")
    """)
    assert proc.returncode == 0 and "settings ok" in proc.stdout, proc.stderr[-3000:]


def test_mode_on_turns_the_hybrid_kv_cache_manager_off(tiny_model):
    """Adapters are paged in one KV-cache group: S-LoRA mode turns vLLM's
    hybrid KV cache manager off (sliding-window and full-attention layers
    then share one group), saying why in one line, unless the user chose;
    mode off leaves vLLM's choice."""
    proc = run_py(f"""
        import vllm_slora
        from vllm.engine.arg_utils import EngineArgs

        def hybrid_off(**kwargs):
            config = EngineArgs(model="{tiny_model}", skip_tokenizer_init=True, enable_lora=True,
                                **kwargs).create_engine_config()
            return config.scheduler_config.disable_hybrid_kv_cache_manager

        assert hybrid_off() is False
        vllm_slora.enable()
        assert hybrid_off() is True
        assert hybrid_off(disable_hybrid_kv_cache_manager=False) is False
        print("hybrid ok")
    """)
    assert proc.returncode == 0 and "hybrid ok" in proc.stdout, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("hybrid KV cache manager off, so that adapter pages") == 1


def test_unknown_plugin_name_is_an_error(tiny_model):
    proc = run_vllm("serve", str(tiny_model), "--enable-lora", "--plugin", "no_such_plugin")
    assert proc.returncode == 2
    assert "unknown plugin 'no_such_plugin' for --plugin; known: vllm_slora" in proc.stderr


def test_serve_plugin_without_enable_lora_is_an_error(tiny_model):
    proc = run_vllm("serve", str(tiny_model), "--skip-tokenizer-init", "--plugin", "vllm_slora")
    assert proc.returncode != 0
    assert "add --enable-lora to `vllm serve`" in proc.stderr


def test_plugin_variables_are_known_to_vllm(tmp_path):
    """vLLM checks every VLLM_* variable at start: with the plugin installed
    (mode off or on) its variables neither warn nor stop
    ``--fail-on-environ-validation``, every VLLM_SLORA* name the package
    reads is declared, and a run's own paths stay out of the compile cache key."""
    import re
    from pathlib import Path

    import vllm_slora
    from vllm_slora.patches import vllm_envs

    root = Path(vllm_slora.__file__).parent
    sources = [*root.rglob("*.py"), *Path(vllm_envs.__file__).parent.glob("*.py")]
    used = {m for f in sources for m in re.findall(r"\bVLLM_SLORA[A-Z_]*\b", f.read_text())}
    assert used and used <= set(vllm_envs.VARIABLES), used - set(vllm_envs.VARIABLES)
    values = {"VLLM_SLORA": "0", "VLLM_SLORA_KERNELS": "auto", "VLLM_SLORA_CUDAGRAPH": "captured",
              "VLLM_SLORA_UNIFY_MEM": "1", "VLLM_SLORA_SEPARATE_FRACTION": "0.25",
              "VLLM_SLORA_PDL": "1", "VLLM_SLORA_REPLAY": "1",
              "VLLM_SLORA_METRICS_DIR": str(tmp_path / "m"),
              "VLLM_SLORA_TRACE": str(tmp_path / "trace"),
              "VLLM_SLORA_STEP_LOG": str(tmp_path / "steps.jsonl"), "VLLM_SLORA_STEP_STACKS": "0",
              "VLLM_SLORA_PIN_FRACTION": "0.5", "VLLM_SLORA_TEST_FAIL_UPLOADS": "no-such-folder"}
    assert set(values) == set(vllm_envs.VARIABLES)
    proc = run_py("""
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from vllm import envs
        from vllm_slora.versions import at_least
        if at_least("0.31"):  # the check moved to the platform
            from vllm.platforms import current_platform
            current_platform.validate_environ(hard_fail=True)
        else:
            envs.validate_environ(hard_fail=True)
        factors = envs.compile_factors()
        assert factors["VLLM_SLORA_METRICS_DIR"] == factors["VLLM_SLORA_TRACE"], factors
        assert factors["VLLM_SLORA_STEP_LOG"] == factors["VLLM_SLORA_TRACE"], factors
        assert factors["VLLM_SLORA_TEST_FAIL_UPLOADS"] == factors["VLLM_SLORA_TRACE"], factors
        assert factors["VLLM_SLORA_KERNELS"] != factors["VLLM_SLORA_TRACE"], factors
        print("validated")
    """, env=values)
    assert proc.returncode == 0 and "validated" in proc.stdout, proc.stderr[-2000:]
