# `make demo` and `make test` are the README's first two commands; both set
# up the virtual environment first (scripts/setup.sh is quick when it is
# already done). VLLM_VERSION picks another supported vLLM, in a venv of its
# own: `VLLM_VERSION=0.26.0 make test-engines`.
VENV ?= $(if $(VLLM_VERSION),.venv-$(VLLM_VERSION),.venv)
PY := $(VENV)/bin/python
export VENV

# The engine tests that every supported vLLM must pass: plugin loading and
# patches, outputs equal to stock's, adapter faults, the server, tensor
# parallelism at 2.
ENGINE_TESTS := tests/foundation/test_activation.py tests/foundation/test_packaging.py \
	tests/paging/test_outputs.py tests/paging/test_faults.py tests/paging/test_target_modules.py \
	tests/serving/test_server.py tests/tp/test_engine_tp.py

.PHONY: setup demo test test-fast test-engines test-kernels gpu-bundle
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m vllm_slora.demo

# Two pytest workers (pytest-xdist): an engine test spends much of its time
# starting Python processes, so two share 2 cores well.
test: setup
	env -u VLLM_VERSION $(PY) -m pytest -q -rs -n 2 tests

# For daily work: everything but the tests that start vLLM engines or need a
# GPU (three workers, as these mostly wait on the subprocesses they start;
# `make test` stays CI's full suite).
test-fast: setup
	env -u VLLM_VERSION $(PY) -m pytest -q -rs -n 3 -m "not slow and not gpu" tests

test-engines: setup
	env -u VLLM_VERSION $(PY) -m pytest -q -rs -n 2 $(ENGINE_TESTS)

test-kernels: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels

# The GPU machine's bundle of vLLM (VLLM_VERSION, default 0.34.0): .gpu/
gpu-bundle:
	bash scripts/gpu_bundle.sh
