# `make demo` and `make test` are the README's first two commands; both set
# up .venv first (scripts/setup.sh is quick when it is already done).
PY := .venv/bin/python

.PHONY: setup demo test test-fast test-kernels gpu-bundle
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m vllm_slora.demo

# Two pytest workers (pytest-xdist): an engine test spends much of its time
# starting Python processes, so two share 2 cores well (12 min against 20
# serially on the 2-core machine).
test: setup
	$(PY) -m pytest -q -rs -n 2 tests

# For daily work: everything but the tests that start vLLM engines or need a
# GPU (2.5 minutes on 2 cores; three workers, as these mostly wait on the
# subprocesses they start; `make test` stays CI's full suite).
test-fast: setup
	$(PY) -m pytest -q -rs -n 3 -m "not slow and not gpu" tests

test-kernels: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels

gpu-bundle:
	bash ../shared/gpu/build-bundle.sh
