#!/usr/bin/env bash
# `make gpu-check`: on a GPU machine (H100/H200, Python 3.12, jax 0.11.x with CUDA preinstalled, no
# internet), one command of about 8 minutes that checks the Pallas kernels compiled for the GPU and
# measures them, writing JSON records (benchmarks/_common.write_results: commit, device, load average,
# targets):
#
#   1. make `jaxsys` importable without touching the preinstalled jax: `pip install --no-deps
#      --no-build-isolation -e .`, or, when pip cannot build offline, a symlink tree on PYTHONPATH that
#      maps the folders into the jaxsys namespace like pyproject.toml does;
#   2. smoke: one compiled kernel test; if it fails no benchmark runs;
#   tests: a selection of the kernel tests compiled (JAXSYS_PALLAS_COMPILED=1 flips INTERPRET in the
#      test cases; the `gpu`-marked tests add model-sized shapes): correctness before timings;
#   3. fp32: benchmarks/attention.py on the GPU: ours at tf32x3 (the shipped default) and tf32 (the
#      precision of JAX's kernels) against split-KV, naive, and JAX's decode_attention and
#      paged_attention. First both sides are tuned on the same trees: ours (per precision) from its
#      tables, which earlier runs tuned (their JSON records the sweeps), for GPU_CHECK_TUNE_BUDGET
#      seconds; each of JAX's kernels from JAX's defaults for GPU_CHECK_BASELINE_TUNE_BUDGET seconds,
#      enough for all of its sweeps. Then the 12 configurations (headline: geometric mean over all
#      of them, per precision), and the host plan per decode step at engine shapes -> attention_gpu.json
#   4. decode: benchmarks/decode_step.py, the engine's decode step with and without sharing (planning
#      inside the timing) on SmolLM2-135M's and a 1.2B Llama's shape, 64 requests sharing a
#      1,000-token prompt -> decode_step_gpu.json
#   5. bf16: the attention benchmark with bf16 KV, without the host plan -> attention_gpu_bf16.json
# Each section's output is also in gpu_check_<section>.txt.
#   opt-in, section profile: Nsight Compute on one configuration (benchmarks/profile_step.py), where
#      the image has `ncu` -> ncu_profile.csv
#
# Every section has a timeout, and the run a deadline (GPU_CHECK_DEADLINE seconds, default 510): a
# section gets at most what is left (a dry run: ten times as much). The JSON records are rewritten after every phase, so a section
# cut short keeps what it measured.
#
# GPU_CHECK_DRY=1 (`make gpu-check-dry`, any machine, ~20-30 minutes on 2 cores): the same script on
# CPU, every benchmark in the Pallas interpreter on shrunk trees and a tiny model (fp32: every sweep
# timing the best so far, two configurations with per-launch timing; bf16: one configuration), the
# test selection only collected, so
# the GPU run cannot fail on a typo. Timings of a dry run mean nothing.
#
# Environment: PY (python, default python3), GPU_CHECK_OUT (default benchmarks/results; dry: a
# temporary folder), GPU_CHECK_SECTIONS (default tests,fp32,decode,bf16; also profile; the smoke test
# always runs), GPU_CHECK_REPEATS (default 7), GPU_CHECK_TUNE_BUDGET (default 12),
# GPU_CHECK_BASELINE_TUNE_BUDGET (default 40), GPU_CHECK_DEADLINE,
# GPU_CHECK_<SECTION>_TIMEOUT (SMOKE 60, TESTS 70, FP32 170, DECODE 120, BF16 130, PROFILE 300),
# GPU_CHECK_<SECTION>_ARGS (extra arguments of the section's script), GPU_CHECK_TEST_SELECT (pytest
# -k expression of the tests section).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-python3}
DRY=${GPU_CHECK_DRY:-0}
if [ "$DRY" = 1 ]; then
  OUTDIR=${GPU_CHECK_OUT:-$(mktemp -d)}
  export JAX_PLATFORMS=cpu
  unset JAXSYS_PALLAS_COMPILED
  MODE=(--interpret)
else
  OUTDIR=${GPU_CHECK_OUT:-benchmarks/results}
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda,cpu}
  export JAXSYS_PALLAS_COMPILED=1
  MODE=(--gpu)
fi
mkdir -p "$OUTDIR"
# the interpreter is slow: a dry run's sections get ten times the GPU's time
SCALE=1
[ "$DRY" = 1 ] && SCALE=10
DEADLINE=${GPU_CHECK_DEADLINE:-$((510 * SCALE))}
SECTIONS=${GPU_CHECK_SECTIONS:-tests,fp32,decode,bf16}
REPEATS=${GPU_CHECK_REPEATS:-7}
BUDGET=${GPU_CHECK_TUNE_BUDGET:-12}
BASELINE_BUDGET=${GPU_CHECK_BASELINE_TUNE_BUDGET:-40}
TESTS=tests/test_shared_prefix_attention.py
SELECT=${GPU_CHECK_TEST_SELECT:-"kernel_matches_reference or model_shapes_gpu or every_launch_option or launches_compose"}
# jax >= 0.11 warns at every Triton lowering that the backend is deprecated: not our error.
PYW=("$PY" -W "ignore:.*[Tt]riton")
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -W "ignore:.*[Tt]riton" -W "ignore::DeprecationWarning:jax.*")

if ! "$PY" -c "import jaxsys.pallas_kernels.shared_prefix_attention" >/dev/null 2>&1; then
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
      || ! "$PY" -c "import jaxsys.pallas_kernels.shared_prefix_attention" >/dev/null 2>&1; then
    SITE=$(mktemp -d)
    mkdir "$SITE/jaxsys"
    for f in "$ROOT"/jaxsys/*; do ln -s "$f" "$SITE/jaxsys/"; done
    for d in pallas_kernels serve train configs; do ln -s "$ROOT/$d" "$SITE/jaxsys/$d"; done
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu-check: pip could not install offline; using the symlink tree $SITE"
  fi
fi

{
  if [ "$DRY" != 1 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
    for tool in ncu nsys nvcc; do echo "$tool: $(command -v "$tool" || echo not found)"; done
  fi
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee "$OUTDIR/gpu_check_env.txt"
if [ "$DRY" != 1 ]; then
  "$PY" -c "import jax; d = jax.devices()[0]; print('gpu-check on', d.device_kind, '| jax', jax.__version__); \
assert d.platform == 'gpu', 'no GPU visible to jax'"
fi

want() { [[ ",$SECTIONS," == *",$1,"* ]]; }
FAILED=""
# run NAME DEFAULT_TIMEOUT CMD...: a section within its timeout and what is left of the deadline,
# its output also in $OUTDIR/gpu_check_NAME.txt
run() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "gpu-check: $name skipped: ${left}s left of the ${DEADLINE}s deadline" >&2
    FAILED="$FAILED $name=skipped"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at ${SECONDS}s, at most ${limit}s)"
  PYTHONUNBUFFERED=1 timeout "$limit" "$@" 2>&1 | tee "$OUTDIR/gpu_check_$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && FAILED="$FAILED $name=rc$rc"
  return 0
}

set +e
run smoke "${GPU_CHECK_SMOKE_TIMEOUT:-$((60 * SCALE))}" "${PYTEST[@]}" -x "$TESTS::test_kernel_matches_reference[fan4_gqa4-share]"
smoke_failed=$([[ "$FAILED" == *smoke=* ]] && echo 1 || echo 0)
if want tests; then
  if [ "$DRY" = 1 ]; then  # the selection must name the tests it means (a typo would select none)
    n=$("${PYTEST[@]}" --collect-only "$TESTS" -k "$SELECT" 2>/dev/null | grep -c "::")
    echo "== tests: the selection collects $n tests"
    [ "$n" -ge 18 ] || FAILED="$FAILED tests=collected$n"
  else
    XDIST=()
    if "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST=(-n 4); fi
    # several processes compile at once; each takes GPU memory as it needs it
    run tests "${GPU_CHECK_TESTS_TIMEOUT:-$((70 * SCALE))}" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
      "${PYTEST[@]}" "${XDIST[@]}" "$TESTS" -k "$SELECT"
  fi
fi
if [ "$smoke_failed" = 1 ]; then
  echo "gpu-check: the smoke test failed (the kernels do not compile or are wrong here): no benchmark" >&2
else
  if [ "$DRY" = 1 ]; then
    # every phase and code path, on the fewest trees that reach them
    FP32_ARGS=(--only C1,chain --max-variants 0 --launches --repeats 1)
    # (the tuners' code is fp32's; a spent budget still runs their bookkeeping)
    BF16_ARGS=(--only "C3 B=4" --repeats 1 --phases tune,tune-baselines,configs --tune-budget 0)
  else
    FP32_ARGS=(--repeats "$REPEATS" --tune-budget "$BUDGET" --baseline-tune-budget "$BASELINE_BUDGET")
    BF16_ARGS=(--repeats "$REPEATS" --tune-budget "$BUDGET" --baseline-tune-budget "$BASELINE_BUDGET"
               --phases tune,tune-baselines,configs)
  fi
  # shellcheck disable=SC2086  # the *_ARGS variables are word lists
  want fp32 && run fp32 "${GPU_CHECK_FP32_TIMEOUT:-$((170 * SCALE))}" "${PYW[@]}" benchmarks/attention.py "${MODE[@]}" \
    --out "$OUTDIR/attention_gpu.json" "${FP32_ARGS[@]}" ${GPU_CHECK_FP32_ARGS:-}
  DECODE_MODE=()
  [ "$DRY" = 1 ] && DECODE_MODE=(--interpret)
  want decode && run decode "${GPU_CHECK_DECODE_TIMEOUT:-$((120 * SCALE))}" "${PYW[@]}" benchmarks/decode_step.py \
    "${DECODE_MODE[@]}" --out "$OUTDIR/decode_step_gpu.json" ${GPU_CHECK_DECODE_ARGS:-}
  want bf16 && run bf16 "${GPU_CHECK_BF16_TIMEOUT:-$((130 * SCALE))}" "${PYW[@]}" benchmarks/attention.py "${MODE[@]}" \
    --dtype bfloat16 --out "$OUTDIR/attention_gpu_bf16.json" "${BF16_ARGS[@]}" ${GPU_CHECK_BF16_ARGS:-}
fi
if want profile; then
  if [ "$DRY" = 1 ]; then
    run profile "${GPU_CHECK_PROFILE_TIMEOUT:-$((300 * SCALE))}" "${PYW[@]}" benchmarks/profile_step.py --interpret --with-jax \
      --config "C1 B=32 P=8192 S=128"
  else
    # Nsight Compute on one configuration: per launch of ours and of JAX's decode kernel, memory
    # throughput, warp stalls and occupancy; the warm-up launches are skipped. The CUDA image keeps
    # ncu under /opt/nvidia/nsight-compute/<version>/, not always on PATH; clocks as in the timed runs.
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1 || true)
    if [ -n "$NCU" ]; then
      run profile "${GPU_CHECK_PROFILE_TIMEOUT:-$((300 * SCALE))}" bash -c "\"$NCU\" --clock-control none --target-processes all \
        -k 'regex:shared_prefix|mha_forward' --launch-skip 4 --launch-count 4 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
        --csv --page details $PY -W 'ignore:.*[Tt]riton' benchmarks/profile_step.py --with-jax ${GPU_CHECK_PROFILE_ARGS:-} \
        > '$OUTDIR/ncu_profile.csv' 2> '$OUTDIR/ncu_profile_stderr.txt'"
    else
      echo "== profile: ncu not found: skipped"
    fi
  fi
fi
set -e
if [ -n "$FAILED" ]; then
  echo "gpu-check: FAILED:$FAILED (${SECONDS}s; see $OUTDIR)" >&2
  exit 1
fi
echo "gpu-check: passed (sections $SECTIONS, ${SECONDS}s); results in $OUTDIR"
