#!/usr/bin/env bash
# `make gpu-check`: on a GPU machine (H100/H200, Python 3.12, jax 0.11.x with CUDA already
# installed, no internet), check the Pallas kernels compiled for the GPU and run the kernel
# benchmark, writing JSON. The default sections take at most ~10 minutes, most of it compiling.
#
#   1. make `jaxsys` importable without touching the preinstalled jax: `pip install --no-deps
#      --no-build-isolation -e .`, or, when pip cannot build offline, a symlink tree on PYTHONPATH
#      that maps the folders into the jaxsys namespace like pyproject.toml does;
#   2. smoke: one compiled kernel test; if it fails, no benchmark (steps 3-4), but step 5 still
#      runs to list every failure;
#   3. benchmarks/attention.py in GPU mode with --tune-first: sweep the block sizes, calibrate
#      the balancer's cost model, then run the configurations with both (Pallas kernels vs
#      split-KV, naive and JAX's own decode_attention and paged_attention, plus achieved
#      bandwidth, and each of ours' launches timed alone); every variant is also checked
#      against ours (max_abs_diff_vs_ours in the JSON);
#   4. opt-in sections: tf32 (fp32 with one TF32 product per dot, the precision of JAX's
#      decode_attention: like for like) and bf16 (bf16 KV); each runs the configurations on its
#      tuned tiles, then its own tile sweep (--tune-first: before); profile (Nsight Compute, where
#      the image has `ncu`, on one configuration: benchmarks/profile_step.py; by default C2 S=512
#      with TF32 dots, GPU_CHECK_PROFILE_ARGS e.g. "--tuned-from F.json" to pick other tiles);
#   5. the kernel tests compiled (JAXSYS_PALLAS_COMPILED=1 flips INTERPRET in the test module;
#      the `gpu`-marked tests add model-sized shapes).
#
# Before a GPU run, `make gpu-check-dry` runs the benchmark's GPU path in the Pallas interpreter on
# CPU (every sweep and configuration, shrunk), so a Python error does not cost GPU time;
# `make gpu-check-dry-jax` does it with this image's jax version (0.11.x) in a venv of its own.
#
# Outputs go to $GPU_CHECK_OUT (default benchmarks/results): attention_gpu.json/.png,
# attention_gpu_tf32.json/.png, attention_gpu_bf16.json/.png, gpu_check_tests.txt,
# gpu_check_env.txt, ncu_profile.csv (section profile). The JSON is rewritten after every section, so a run
# cut short keeps what it measured (the tuning after every sweep).
# Environment: PY (python, default python3), GPU_CHECK_REPEATS (default 15),
# GPU_CHECK_SECTIONS (default bench,tests; also tf32, bf16, profile; the smoke test always runs),
# GPU_CHECK_TEST_SELECT (pytest -k expression of step 5),
# GPU_CHECK_BENCH_ARGS / _TF32_ARGS / _BF16_ARGS (extra arguments of each pass, e.g. "--tune-first";
# tf32 and bf16 default to "--skip-calibration"),
# GPU_CHECK_TUNE_BUDGET (seconds of block-size sweeps per section, default 2/5 of its timeout;
# the JSON's elapsed_s says what each part took), GPU_CHECK_SMOKE_TIMEOUT / GPU_CHECK_BENCH_TIMEOUT / GPU_CHECK_TF32_TIMEOUT /
# GPU_CHECK_BF16_TIMEOUT / GPU_CHECK_TEST_TIMEOUT / GPU_CHECK_PROFILE_TIMEOUT (seconds, default
# 100 / 330 / 240 / 150 / 150 / 300; the four benchmark and test sections take ~16 minutes, over
# one 10-minute device call: split them), GPU_CHECK_PROFILE_ARGS (profile_step.py's). E.g. the
# like-for-like comparison with JAX's kernels, tuned and calibrated, in one call:
#   GPU_CHECK_SECTIONS=tf32 GPU_CHECK_TF32_ARGS=--tune-first GPU_CHECK_TF32_TIMEOUT=480 make gpu-check
# or over two calls (the second reads the first's tiles and cost model):
#   GPU_CHECK_SECTIONS=tf32 GPU_CHECK_TF32_ARGS="--tune-first --skip-configs" make gpu-check
#   GPU_CHECK_SECTIONS=tf32,tests GPU_CHECK_TF32_ARGS="--tuned-from benchmarks/results/attention_gpu_tf32.json" \
#     make gpu-check      (the --out of the second pass is the same file: it keeps the tuning it read;
#     where each call gets a fresh copy of the tree, bring the first call's JSON back into it first)
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
  # profilers a later run could use to see why a kernel stalls (Nsight Compute / Systems)
  for tool in ncu nsys nvcc; do echo "$tool: $(command -v "$tool" || echo not found)"; done
} 2>&1 | tee "$OUTDIR/gpu_check_env.txt"
"$PY" -c "import jax; d = jax.devices()[0]; print('gpu-check on', d.device_kind, '| jax', jax.__version__); \
assert d.platform == 'gpu', 'no GPU visible to jax'"

SECTIONS=${GPU_CHECK_SECTIONS:-bench,tests}
TESTS=tests/test_shared_prefix_attention.py
SELECT="kernel or paged_attention or padding or gpu"
# jax >= 0.11 warns at every Triton lowering that the backend is deprecated: not our error.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -W "ignore:.*[Tt]riton" -W "ignore::DeprecationWarning:jax.*")
want() { [[ ",$SECTIONS," == *",$1,"* ]]; }
bench() {  # bench NAME TIMEOUT ARGS...: one benchmark pass; its rc is appended to BENCH_RCS
  local name=$1 limit=$2; shift 2
  echo "== attention benchmark (GPU): $name"
  # the block-size sweeps stop after 2/5 of the section's time (best so far kept), so a
  # section that tunes first leaves the calibration and the configurations theirs
  PYTHONUNBUFFERED=1 timeout "$limit" "$PY" -W "ignore:.*[Tt]riton" benchmarks/attention.py --gpu \
    --repeats "${GPU_CHECK_REPEATS:-15}" --tune-budget "${GPU_CHECK_TUNE_BUDGET:-$((limit * 2 / 5))}" "$@"
  BENCH_RCS="$BENCH_RCS $name=$?"
}
set +e
echo "== smoke: one compiled kernel test"
timeout "${GPU_CHECK_SMOKE_TIMEOUT:-100}" "${PYTEST[@]}" -x "$TESTS::test_kernel_matches_reference[fan4_gqa4-share]" \
  2>&1 | tee "$OUTDIR/gpu_check_tests.txt"
smoke_rc=${PIPESTATUS[0]}
BENCH_RCS=""
if [ "$smoke_rc" -eq 0 ]; then
  # fp32 (3xTF32 dots): tune, calibrate, then the configurations with both
  want bench && bench fp32 "${GPU_CHECK_BENCH_TIMEOUT:-330}" --tune-first \
    --out "$OUTDIR/attention_gpu.json" ${GPU_CHECK_BENCH_ARGS:-}
  # fp32 with one TF32 product per dot, JAX decode_attention's precision: like for like. By
  # default the configurations on the TF32 tiles of tuned_block_sizes.py, then the tile sweep,
  # no calibration; GPU_CHECK_TF32_ARGS=--tune-first tunes, calibrates, then runs them with both
  want tf32 && bench tf32 "${GPU_CHECK_TF32_TIMEOUT:-240}" --fp32-dot tf32 \
    --out "$OUTDIR/attention_gpu_tf32.json" ${GPU_CHECK_TF32_ARGS---skip-calibration}
  # bf16 KV (what serving stores): the configurations on the tuned tiles, then the tile sweep
  # (calibrating bf16's own cost model when its arguments are set without --skip-calibration)
  want bf16 && bench bf16 "${GPU_CHECK_BF16_TIMEOUT:-150}" --dtype bfloat16 \
    --out "$OUTDIR/attention_gpu_bf16.json" ${GPU_CHECK_BF16_ARGS---skip-calibration}
else
  echo "gpu-check: the smoke test failed (kernels do not compile or are wrong on this GPU): no benchmark" >&2
fi
if want profile; then
  # Nsight Compute on one configuration (benchmarks/profile_step.py): per launch of ours and of
  # JAX's decode kernel, memory throughput, warp stalls and occupancy. The warm-up call of each
  # (3 launches of ours when it shares, 1 of JAX's) is skipped; the next call's are profiled.
  # (the CUDA image keeps ncu under /opt/nvidia/nsight-compute/<version>/, not always on PATH;
  # the clocks are left as they are, as in the timed runs)
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1 || true)
  echo "== profile: ${NCU:-ncu not found: skipped}"
  if [ -n "$NCU" ]; then
    # (the H200 run of 2026-11-27 gave it 100 s, and ncu had not profiled a launch when it was cut
    # off: the whole program runs under ncu's interception, compiles included)
    timeout "${GPU_CHECK_PROFILE_TIMEOUT:-300}" "$NCU" --clock-control none --target-processes all \
      -k "regex:shared_prefix|mha_forward" \
      --launch-skip 4 --launch-count 4 --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section Occupancy --section LaunchStats --csv --page details \
      "$PY" -W "ignore:.*[Tt]riton" benchmarks/profile_step.py --with-jax ${GPU_CHECK_PROFILE_ARGS:-} \
      > "$OUTDIR/ncu_profile.csv" 2> "$OUTDIR/ncu_profile_stderr.txt" \
      || echo "gpu-check: ncu failed (rc=$?; $OUTDIR/ncu_profile_stderr.txt): no profile, not an error" >&2
  fi
fi
tests_rc=0
if want tests; then
  echo "== kernel tests (compiled)"
  # With pytest-xdist, several processes compile at once; each takes GPU memory as it needs it.
  XDIST=()
  if "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST=(-n 4); fi
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${GPU_CHECK_TEST_TIMEOUT:-150}" "${PYTEST[@]}" \
    "${XDIST[@]}" "$TESTS" -k "${GPU_CHECK_TEST_SELECT:-$SELECT}" 2>&1 | tee -a "$OUTDIR/gpu_check_tests.txt"
  tests_rc=${PIPESTATUS[0]}
fi
set -e
if [ "$smoke_rc" -ne 0 ] || [ "$tests_rc" -ne 0 ] || [[ "$BENCH_RCS" =~ =[1-9] ]]; then
  echo "gpu-check: FAILED (smoke rc=$smoke_rc, benchmarks:${BENCH_RCS:- none}, kernel tests rc=$tests_rc; see $OUTDIR)" >&2
  exit 1
fi
echo "gpu-check: passed (sections $SECTIONS); results in $OUTDIR"
