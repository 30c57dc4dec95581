#!/usr/bin/env bash
# `make gpu-check`: on a GPU machine (H100/H200, Python 3.12, jax 0.11.x with CUDA already
# installed, no internet), check the Pallas kernels compiled for the GPU and run the kernel
# benchmarks, writing JSON under benchmarks/results/. A few minutes in all.
#
#   1. make `jaxsys` importable without touching the preinstalled jax: `pip install --no-deps
#      --no-build-isolation -e .`, or, when pip cannot build offline, a symlink tree on PYTHONPATH
#      that maps the folders into the jaxsys namespace like pyproject.toml does;
#   2. run the kernel tests compiled (JAXSYS_PALLAS_COMPILED=1 flips INTERPRET in the test
#      module; the `gpu`-marked tests add model-sized shapes);
#   3. run benchmarks/attention.py in GPU mode (Pallas kernels vs split-KV, naive and JAX's own
#      decode_attention, plus achieved bandwidth) -> benchmarks/results/attention_gpu.json.
#
# Environment: PY (python, default python3), GPU_CHECK_REPEATS (default 5),
# GPU_CHECK_BENCH_ARGS (extra benchmark arguments, e.g. "--skip-tune").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-python3}
mkdir -p benchmarks/results

if ! "$PY" -c "import jaxsys.pallas_kernels.shared_prefix_attention" >/dev/null 2>&1; then
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
    SITE=$(mktemp -d)
    mkdir "$SITE/jaxsys"
    for f in "$ROOT"/jaxsys/*; do ln -s "$f" "$SITE/jaxsys/"; done
    ln -s "$ROOT/pallas_kernels" "$SITE/jaxsys/pallas_kernels"
    ln -s "$ROOT/serve" "$SITE/jaxsys/serve"
    ln -s "$ROOT/train" "$SITE/jaxsys/train"
    ln -s "$ROOT/configs" "$SITE/jaxsys/configs"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu-check: pip could not install offline; using the symlink tree $SITE"
  fi
fi

export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda,cpu}
export JAXSYS_PALLAS_COMPILED=1
"$PY" -c "import jax; d = jax.devices()[0]; print('gpu-check on', d.device_kind, '| jax', jax.__version__); \
assert d.platform == 'gpu', 'no GPU visible to jax'"

echo "== kernel tests (compiled)"
# jax >= 0.11 warns at every Triton lowering that the backend is deprecated: not our error.
set +e
"$PY" -m pytest -q -p no:cacheprovider -W "ignore:.*[Tt]riton" \
  tests/test_shared_prefix_attention.py -k "kernel or paged_attention or padding or gpu" \
  2>&1 | tee benchmarks/results/gpu_check_tests.txt
tests_rc=${PIPESTATUS[0]}
set -e

echo "== attention benchmark (GPU)"
"$PY" -W "ignore:.*[Tt]riton" benchmarks/attention.py --gpu --repeats "${GPU_CHECK_REPEATS:-5}" \
  --out benchmarks/results/attention_gpu.json ${GPU_CHECK_BENCH_ARGS:-}

if [ "$tests_rc" -ne 0 ]; then
  echo "gpu-check: kernel tests FAILED (see benchmarks/results/gpu_check_tests.txt)" >&2
  exit "$tests_rc"
fi
echo "gpu-check: kernel tests passed; results in benchmarks/results/attention_gpu.json"
