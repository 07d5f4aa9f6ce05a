#!/usr/bin/env bash
# One call on a lent GPU machine (jax with CUDA installed, no network) that answers issue 20's
# targets, most wanted first, within BUDGET_S (default 500 s; with each step's 5 s kill grace
# the script ends within 9 minutes):
#   1. env: versions, devices, nvidia-smi;
#   2. gpu_tests: the sparse MLP op's Triton kernels compiled for this card against the jnp
#      reference (tests/test_kernels_sparse_layer.py -m gpu): timings of wrong kernels mean nothing;
#   3. bench_7b: the 7b shape at full depth (32 layers), bf16, batch 1 decode, dense and sparse at
#      10 % and 100 % active, sparse timed in pairs with dense (`sparseinfer bench`);
#   4. layer: the read roofline (a float32 sum over 4 GiB), then one 7b layer's MLP over 8 cold
#      layers: dense, the sparse op at 10 % and 100 %, each kernel, the chain it replaces, and the
#      candidate launch shapes, each with its GB/s over the roofline (benchmarks/gpu_variants.py);
#   5. compile_report: the compile report on this card's spec (registers, spills, launches per
#      layer of the decode step, dense and sparse), to compare with the offline one;
#   6. summary: every figure beside the roofline, and each target met or MISSED.
# Each step is guarded by `timeout`, cut to what is left of the budget, and skipped when under
# 20 s are left; the script carries on after a failure and exits with the number of failed or
# skipped steps. JSON is rewritten after every record, so a step stopped by its limit keeps what
# it measured. Installs nothing: the repository is put on PYTHONPATH. $OUT gets five files:
# summary.txt, steps.log (every step's output), bench_7b.json, layer.json, compile_report.json.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh                    # on the GPU machine
#   SMOKE=1 OUT=/tmp/gpu_check_out bash benchmarks/gpu_check.sh   # CPU: tiny shapes, every step
# (The smoke checks that every Python part runs; its figures are interpret-mode CPU times.)
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_out}"
SMOKE="${SMOKE:-0}"
BUDGET_S="${BUDGET_S:-500}"
mkdir -p "$OUT" || exit 99
OUT="$(cd "$OUT" && pwd)"
cd "$REPO" || exit 99
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# A rerun on the same machine skips the compiles the first run paid for.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/sparseinfer_jax_cache}"
: >"$OUT/summary.txt"
: >"$OUT/steps.log"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import jax" >/dev/null 2>&1; then
      PY="$candidate"
      break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "no python3 or python that imports jax (set PYTHON=...)" | tee -a "$OUT/summary.txt"
  exit 99
fi

# The smoke runs Pallas in interpret mode on a CPU: every step gets SCALE times its GPU limit.
SCALE=1
if [ "$SMOKE" = 1 ]; then
  SCALE=5 BUDGET_S="${BUDGET_S_SMOKE:-3000}"
  SHAPE=tiny LAYERS=2 TOKENS=8 REPEATS=2 BACKEND=xla
  VARIANTS=(--smoke) REPORT=(--shape tiny --layers 2 --batches 1 --no-programs)
else
  SHAPE=7b LAYERS=32 TOKENS=64 REPEATS=5 BACKEND=pallas
  VARIANTS=() REPORT=(--shape 7b --layers 2 --batches 1)
fi

START=$SECONDS
RESERVE=20  # kept for the summary step
FAILED=0
step() {  # step NAME SECONDS CMD...: time-limited, appended to steps.log, never aborts
  local name="$1" limit=$(($2 * SCALE))
  shift 2
  local left=$((BUDGET_S - (SECONDS - START) - RESERVE))
  [ "$name" = summary ] && left=$((left + RESERVE))
  if [ "$left" -lt 20 ]; then
    echo "== $name skipped: ${left}s of the budget left" | tee -a "$OUT/summary.txt"
    FAILED=$((FAILED + 1))
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local cmd="$*"
  echo "== $name (+$((SECONDS - START))s, limit ${limit}s): ${cmd//$'\n'/ }" | cut -c1-300 \
    | tee -a "$OUT/summary.txt" "$OUT/steps.log"
  timeout --kill-after=5 "$limit" "$@" >>"$OUT/steps.log" 2>&1
  local rc=$?
  local note=""
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note=" (stopped at its time limit)"; fi
  echo "   $name exit $rc$note" | tee -a "$OUT/summary.txt" "$OUT/steps.log"
  [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
  return 0
}

# The report's GPU spec for this card, by the name nvidia-smi gives.
REPORT_GPU=h100
if command -v nvidia-smi >/dev/null 2>&1; then
  case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" in
    *H200*) REPORT_GPU=h200 ;;
    *A100*) REPORT_GPU=a100 ;;
    *B200*) REPORT_GPU=b200 ;;
  esac
fi

step env 30 bash -c "$PY -c \"
import importlib, sys
print(sys.version)
for m in ('jax', 'jaxlib', 'flax', 'chex', 'numpy', 'pytest', 'triton'):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, 'missing:', type(e).__name__, e)
import jax
print(jax.devices(), jax.default_backend())
\"; command -v nvidia-smi >/dev/null && nvidia-smi || true"
step gpu_tests 90 "$PY" -m pytest -p no:cacheprovider -o addopts="" -q -rs -m gpu \
  tests/test_kernels_sparse_layer.py
step bench_7b 210 "$PY" -m sparseinfer_jax.cli bench --shape "$SHAPE" --layers "$LAYERS" \
  --dtype bfloat16 --tokens "$TOKENS" --repeats "$REPEATS" --backend "$BACKEND" \
  --active 0.1,1.0 --no-kernels --json "$OUT/bench_7b.json"
step layer 130 "$PY" benchmarks/gpu_variants.py ${VARIANTS[@]+"${VARIANTS[@]}"} \
  --json "$OUT/layer.json"
step compile_report 90 "$PY" -m sparseinfer_jax.cli compile-report --gpu "$REPORT_GPU" \
  "${REPORT[@]}" --json "$OUT/compile_report.json"
step summary 20 "$PY" benchmarks/gpu_summary.py "$OUT"
sed -n '/^== summary/,$p' "$OUT/steps.log" | sed '1d;$d' >>"$OUT/summary.txt"
echo "failed or skipped steps: $FAILED (+$((SECONDS - START))s)" | tee -a "$OUT/summary.txt"
exit "$FAILED"
