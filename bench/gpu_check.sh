#!/usr/bin/env bash
# The one prepared command for a lent GPU (no network there): build, run the test suite on CUDA,
# run the benchmark, and leave everything under $OUT. Prints the benchmark table last.
#   run: bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/collapsekit-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi

# tests: every Triton path runs on the GPU here (conftest only enables the interpreter without CUDA)
timeout "${CK_TEST_TIMEOUT:-240}" python3 -m pytest tests -q -x -p no:cacheprovider \
  -k "not test_torch_compile_fullgraph_cpu" > "$OUT/tests.log" 2>&1
echo "tests exit $?" | tee -a "$OUT/tests.log"
tail -5 "$OUT/tests.log"

timeout "${CK_BENCH_TIMEOUT:-300}" python3 -m collapsekit bench --device cuda --reps "${CK_BENCH_REPS:-10}" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"

# tile sweep of the Triton class-sum kernels (defaults in kernels/scatter.py come from it)
timeout "${CK_TUNE_TIMEOUT:-60}" python3 bench/tune_scatter.py --json "$OUT/tune.json" > "$OUT/tune.log" 2>&1
echo "tune exit $?"
