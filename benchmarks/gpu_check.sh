#!/usr/bin/env bash
# `make gpu-check`: on a GPU machine (H100/H200, Python 3.12, jax 0.11.x with CUDA already
# installed, no internet), check the Pallas kernels compiled for the GPU and run the kernel
# benchmark, writing JSON. At most ~10 minutes, most of it compiling.
#
#   1. make `jaxsys` importable without touching the preinstalled jax: `pip install --no-deps
#      --no-build-isolation -e .`, or, when pip cannot build offline, a symlink tree on PYTHONPATH
#      that maps the folders into the jaxsys namespace like pyproject.toml does;
#   2. smoke: one compiled kernel test; if it fails, no benchmark (step 3), but step 4 still
#      runs to list every failure;
#   3. benchmarks/attention.py in GPU mode with --tune-first: sweep the block sizes, calibrate
#      the balancer's cost model, then run the configurations with both (Pallas kernels vs
#      split-KV, naive and JAX's own decode_attention, plus achieved bandwidth); every variant
#      is also checked against ours (max_abs_diff_vs_ours in the JSON);
#   4. the kernel tests compiled (JAXSYS_PALLAS_COMPILED=1 flips INTERPRET in the test module;
#      the `gpu`-marked tests add model-sized shapes).
#
# Outputs go to $GPU_CHECK_OUT (default benchmarks/results): attention_gpu.json/.png,
# gpu_check_tests.txt, gpu_check_env.txt. The JSON is rewritten after every section, so a run
# cut short keeps what it measured.
# Environment: PY (python, default python3), GPU_CHECK_REPEATS (default 15),
# GPU_CHECK_BENCH_ARGS (extra benchmark arguments, e.g. "--skip-tune"),
# GPU_CHECK_SMOKE_TIMEOUT / GPU_CHECK_BENCH_TIMEOUT / GPU_CHECK_TEST_TIMEOUT (seconds,
# default 100 / 330 / 150: the whole check fits one 10-minute device call).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-python3}
OUTDIR=${GPU_CHECK_OUT:-benchmarks/results}
mkdir -p "$OUTDIR"

if ! "$PY" -c "import jaxsys.pallas_kernels.shared_prefix_attention" >/dev/null 2>&1; then
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
      || ! "$PY" -c "import jaxsys.pallas_kernels.shared_prefix_attention" >/dev/null 2>&1; then
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
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee "$OUTDIR/gpu_check_env.txt"
"$PY" -c "import jax; d = jax.devices()[0]; print('gpu-check on', d.device_kind, '| jax', jax.__version__); \
assert d.platform == 'gpu', 'no GPU visible to jax'"

TESTS=tests/test_shared_prefix_attention.py
SELECT="kernel or paged_attention or padding or gpu"
# jax >= 0.11 warns at every Triton lowering that the backend is deprecated: not our error.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -W "ignore:.*[Tt]riton" -W "ignore::DeprecationWarning:jax.*")
set +e
echo "== smoke: one compiled kernel test"
timeout "${GPU_CHECK_SMOKE_TIMEOUT:-100}" "${PYTEST[@]}" -x "$TESTS::test_kernel_matches_reference[fan4_gqa4-share]" \
  2>&1 | tee "$OUTDIR/gpu_check_tests.txt"
smoke_rc=${PIPESTATUS[0]}
bench_rc=skipped
if [ "$smoke_rc" -eq 0 ]; then
  echo "== attention benchmark (GPU): tune, calibrate, then the configurations"
  PYTHONUNBUFFERED=1 timeout "${GPU_CHECK_BENCH_TIMEOUT:-330}" "$PY" -W "ignore:.*[Tt]riton" \
    benchmarks/attention.py --gpu --tune-first --repeats "${GPU_CHECK_REPEATS:-15}" \
    --out "$OUTDIR/attention_gpu.json" ${GPU_CHECK_BENCH_ARGS:-}
  bench_rc=$?
else
  echo "gpu-check: the smoke test failed (kernels do not compile or are wrong on this GPU): no benchmark" >&2
fi
echo "== kernel tests (compiled)"
# With pytest-xdist, several processes compile at once; each takes GPU memory as it needs it.
XDIST=()
if "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST=(-n 4); fi
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${GPU_CHECK_TEST_TIMEOUT:-150}" "${PYTEST[@]}" \
  "${XDIST[@]}" "$TESTS" -k "$SELECT" 2>&1 | tee -a "$OUTDIR/gpu_check_tests.txt"
tests_rc=${PIPESTATUS[0]}
set -e
if [ "$smoke_rc" -ne 0 ] || [ "$tests_rc" -ne 0 ] || [ "$bench_rc" != 0 ]; then
  echo "gpu-check: FAILED (smoke rc=$smoke_rc, benchmark rc=$bench_rc, kernel tests rc=$tests_rc; see $OUTDIR)" >&2
  exit 1
fi
echo "gpu-check: kernel tests passed; results in $OUTDIR/attention_gpu.json"
