# `make demo` and `make test` are the README's first two commands; both set
# up .venv first (scripts/setup.sh is quick when it is already done).
PY := .venv/bin/python

.PHONY: setup demo test test-kernels gpu-bundle
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m vllm_slora.demo

test: setup
	$(PY) -m pytest -q -rs tests

test-kernels: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels

gpu-bundle:
	bash ../shared/gpu/build-bundle.sh
