#!/usr/bin/env bash
# `make gpu-check-dry-jax`: the GPU machine's jax version, checked on this machine before any GPU
# time is spent. The GPU image brings another jax (0.11.x, Python 3.12) than this project's venv
# (0.10.x): a Pallas or jax API that moved between them would otherwise first fail in the GPU
# run's smoke test. In a venv of its own (.venv-gpujax/, Python >= 3.12), with jax and jaxlib at
# the GPU's version (GPU_JAX, default: the version benchmarks/results/gpu_check_env.txt recorded):
#   1. every kernel launch and tile variant lowers to Triton IR for CUDA (triton_static.py
#      --lower-only; jax >= 0.11 is told it lowers for an H100, sm_90);
#   2. the kernel tests pass in the Pallas interpreter;
#   3. `make gpu-check-dry` with that venv: the whole `make gpu-check` script (the attention
#      benchmark's sweeps, configurations and JAX's own decode_attention and paged_attention of that
#      version, the engine decode step) in the interpreter on shrunk shapes (~10 minutes on 2 cores;
#      timings mean nothing, every variant's output is checked against ours).
# A Python >= 3.12: GPU_JAX_PY, else python3.13/python3.12 on PATH, else pyenv's.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${GPU_JAX:-$(sed -n 's/^jax \([0-9.]*\) .*/\1/p' benchmarks/results/gpu_check_env.txt 2>/dev/null | head -1)}
VERSION=${VERSION:-0.11.2}
VENV=.venv-gpujax
PY=${GPU_JAX_PY:-}
if [ -z "$PY" ]; then
  for c in python3.13 python3.12 "$HOME"/.pyenv/versions/3.13*/bin/python "$HOME"/.pyenv/versions/3.12*/bin/python; do
    # (a pyenv shim exists on PATH even where that version is not selected: run it to know)
    if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then PY=$c; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "gpu-check-dry-jax: jax $VERSION needs Python >= 3.12 and none was found; set GPU_JAX_PY" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import jax, sys; sys.exit(jax.__version__ != '$VERSION')" 2>/dev/null; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "jax==$VERSION" "jaxlib==$VERSION" pytest pytest-timeout hypothesis -e ".[bench]"
fi
echo "== gpu-check-dry-jax: jax $("$VENV/bin/python" -c 'import jax; print(jax.__version__)') on $("$VENV/bin/python" --version)"
echo "== 1. every launch lowers for CUDA"
"$VENV/bin/python" benchmarks/triton_static.py --lower-only | tail -1
echo "== 2. kernel tests (Pallas interpreter)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_shared_prefix_attention.py
echo "== 3. make gpu-check in the interpreter"
GPU_CHECK_DRY=1 PY="$VENV/bin/python" bash benchmarks/gpu_check.sh
echo "gpu-check-dry-jax: passed with jax $VERSION"
