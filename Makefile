# `make demo` and `make test` are the README's first two commands; both set
# up .venv first (scripts/setup.sh is quick when it is already done).
PY := .venv/bin/python

.PHONY: setup demo test test-fast test-kernels gpu-bundle
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m vllm_slora.demo

test: setup
	$(PY) -m pytest -q -rs tests

# For daily work: everything but the tests that start vLLM engines or need a
# GPU (about 3 minutes on 2 cores; `make test` stays CI's full suite).
test-fast: setup
	$(PY) -m pytest -q -rs -m "not slow and not gpu" tests

test-kernels: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels

gpu-bundle:
	bash ../shared/gpu/build-bundle.sh
