#!/usr/bin/env bash
# GPU check of the custom kernels, under 8 minutes, on a machine with a CUDA build of torch, triton
# and nvcc (no network). Run from the repository root after
#     pip install --no-deps --no-build-isolation -e .
# as
#     OUT=/some/dir bash benchmarks/gpu_check.sh
# It builds the C++/CUDA extension, runs the kernel tests on CUDA (every backend against the
# reference, fp32, fp64 and bf16 with fp32 accumulation; the MLP kernel against the autograd oracle),
# runs a short benchmark, and writes $OUT/gpu_check.md (plus logs, junit files, kernel_bench.json).
set -u -o pipefail

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/fastmaml_torch_extensions}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
unset TRITON_INTERPRET
START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-460}" # seconds for everything (< 8 minutes), the report included

left() { echo $((BUDGET - ($(date +%s) - START))); }
# step_timeout WANTED: the smaller of WANTED and the time left minus 20 s for the report
step_timeout() {
  local l
  l=$(($(left) - 20))
  if [ "$l" -lt "$1" ]; then echo "$l"; else echo "$1"; fi
}

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
  "$PY" -c "import platform, torch; print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE')" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 || echo "triton missing"
  (nvcc --version 2>&1 | tail -1) || echo "nvcc missing"
} > "$OUT/env.txt"
cat "$OUT/env.txt"

echo "== build ($(left) s left)"
# (what `fastmaml build --verbose` does, without importing the CLI's other commands)
timeout "$(step_timeout 200)" "$PY" -c "from fastmaml import build; print('built', build.build(verbose=True), 'cuda', build.cuda_enabled())" \
  > "$OUT/build.log" 2>&1
echo $? > "$OUT/build.rc"
tail -3 "$OUT/build.log"

run_tests() { # group, wanted seconds, test files...
  local group=$1 wanted=$2
  shift 2
  local t
  t=$(step_timeout "$wanted")
  if [ "$t" -le 5 ]; then
    echo "== tests $group skipped: no time left" | tee -a "$OUT/tests.log"
    return
  fi
  echo "== tests $group (limit ${t}s)" | tee -a "$OUT/tests.log"
  timeout "$t" "$PY" -m pytest "$@" -q -p no:cacheprovider --junitxml="$OUT/junit-$group.xml" \
    >> "$OUT/tests.log" 2>&1
  echo "   exit $?" | tee -a "$OUT/tests.log"
  tail -2 "$OUT/tests.log"
}

run_tests step_kernels 80 tests/test_kernels_step.py
run_tests mlp_kernel 80 tests/test_kernels_mlp.py
run_tests end_to_end 80 tests/test_kernels_end_to_end.py

t=$(step_timeout 90)
if [ "$t" -gt 10 ]; then
  echo "== benchmark (limit ${t}s)"
  timeout "$t" "$PY" benchmarks/kernel_bench.py --device cuda --repeats 10 --out "$OUT" > "$OUT/bench.log" 2>&1
  echo "   exit $?"
else
  echo "== benchmark skipped: no time left" | tee "$OUT/bench.log"
fi

# the engine end to end on CUDA: sinusoid and conv workloads against the autograd loop (no peers,
# no memory subprocesses: time and gradient error only)
t=$(step_timeout 150)
if [ "$t" -gt 20 ]; then
  echo "== bench suite on cuda (limit ${t}s)"
  timeout "$t" "$PY" -m fastmaml bench --device cuda --out "$OUT/bench" --no-memory --repeats 5 --budget 20 \
    --workloads sinusoid-K1 sinusoid-K5 conv28-1shot-K1 conv28-1shot-K5 > "$OUT/bench_suite.log" 2>&1
  echo "   exit $?"
  tail -3 "$OUT/bench_suite.log"
fi

run_tests loss_kernels 40 tests/test_kernels_losses.py
run_tests layer_kernels 70 tests/test_kernels_linear.py tests/test_kernels_batchnorm.py tests/test_kernels_batchnorm_relu.py \
    tests/test_kernels_bn_relu_maxpool_triton.py
run_tests build 30 tests/test_kernels_build.py


"$PY" benchmarks/gpu_check_report.py --out "$OUT" > /dev/null 2> "$OUT/report.err"
echo "== wrote $OUT/gpu_check.md after $(($(date +%s) - START)) s"
cat "$OUT/gpu_check.md" 2>/dev/null || cat "$OUT/report.err"
