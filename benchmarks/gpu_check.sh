#!/usr/bin/env bash
# GPU check of the custom kernels, under 8 minutes, on a machine with a CUDA build of torch, triton
# and nvcc (no network). Run from the repository root after
#     pip install --no-deps --no-build-isolation -e .
# as
#     OUT=/some/dir bash benchmarks/gpu_check.sh
# Steps, in this order (the priority: a step that finds the budget spent is skipped), each under its own time
# limit inside the total budget:
#   build      the C++/CUDA extension
#   tests      the kernel tests on CUDA (every backend against the reference: fp32, fp64, bf16 with
#              fp32 accumulation; the MLP op, kernel and reference, against the autograd oracle; Triton
#              layer kernels; MetaStep's CUDA-graph capture and replay, and cuda_graph="auto", against the
#              uncaptured step); class-written models of the newer rules (attention, Transformer layers
#              with dropout, ViT, transposed convolutions, recurrent layers, ResNet-12) against the oracle
#   suite      fastmaml bench on CUDA, the rows the open issues measure (fastmaml auto, its plan, its step
#              captured in a CUDA graph, the triton backend, first order, torch.func-vmap, the loops) on the
#              28×28 conv4 (K=1, K=5), ResNet-12 64-640 84×84, the sinusoid (K=5, K=1), the class-written
#              conv4 and the ViT, with TFLOP/s and the fraction of the card's FP32 and TF32 peaks
#   precision  the precision policies (fp32, tf32, bf16) against the autograd loop under the same policy
#   conv_triton benchmarks/conv_triton_bench.py: the Triton task-batched convolutions against grouped cuDNN
#              on every conv layer of conv4-64 (28, 84) and ResNet-12 (84), T=4, N=5 and 75, each pass and
#              its tangent form, true FP32 only and within its own budget (a short run: see the script for
#              tf32 and bf16)
#   ops        benchmarks/op_bench.py: every backend of every op on the arguments of real meta-steps
#   ops_lr     the same with a learned inner learning rate (the adjoint update's α-gradient reduction)
#   conv       benchmarks/conv_batching.py: loop / grouped / unfold convolutions, per layer and per meta-step
#   layout     benchmarks/conv_layout.py: NCHW against channels-last convolutions per layer, and ResNet-12's
#              meta-step in both memory formats (CUDA runs "contiguous" unless told: unmeasured)
#   crash      the bad-input tests of the C++ ops, each file in its own process, and a backtrace of the
#              first one that crashes (cuda-gdb), with the toolchain facts that bear on it
# Writes $OUT/gpu_check.md (the report) and $OUT/gpu_check.tar.gz (every log, junit file and table).
set -u -o pipefail

OUT="${OUT:-$PWD/gpu_check_out}"
WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$OUT" "$WORK"
PY="${PYTHON:-python}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/fastmaml_torch_extensions}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-470}" # seconds for everything (< 8 minutes), the report included

left() { echo $((BUDGET - ($(date +%s) - START))); }
# step_timeout WANTED: the smaller of WANTED and the time left minus 15 s for the report
step_timeout() {
  local l
  l=$(($(left) - 15))
  if [ "$l" -lt "$1" ]; then echo "$l"; else echo "$1"; fi
}
# step NAME WANTED COMMAND...: runs COMMAND under its limit, logs to $WORK/NAME.log, records the
# exit status and seconds in $WORK/steps.txt (a step with under 10 s left is skipped, and says so)
step() {
  local name=$1 wanted=$2 t t0 rc
  shift 2
  t=$(step_timeout "$wanted")
  if [ "$t" -lt 10 ]; then
    echo "$name skipped: no time left" | tee -a "$WORK/steps.txt"
    return
  fi
  echo "== $name (limit ${t}s, $(left) s left)"
  t0=$(date +%s)
  # SIGINT first: pytest then still writes its junit file for the tests that ran
  timeout -s INT -k 15 "$t" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  echo "$name exit $rc after $(($(date +%s) - t0)) s (limit ${t}s)" | tee -a "$WORK/steps.txt"
  tail -2 "$WORK/$name.log"
}

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
  "$PY" -c "import platform, torch; print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE')" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 || echo "triton missing"
  (nvcc --version 2>&1 | tail -1) || echo "nvcc missing"
  echo "cores: $(nproc)"
} > "$WORK/env.txt"
cat "$WORK/env.txt"

# (what `fastmaml build --verbose` does, without importing the CLI's other commands)
step build 200 "$PY" -c "from fastmaml import build; print('built', build.build(verbose=True), 'cuda', build.cuda_enabled())"

# the C++ ops' bad-input tests are run apart, in the crash step: a crash there must not end this run
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi
step tests 170 "$PY" -m pytest "${XDIST[@]}" -q -p no:cacheprovider --junitxml="$WORK/junit-tests.xml" \
  tests/test_kernels_step.py tests/test_kernels_mlp.py tests/test_kernels_end_to_end.py tests/test_kernels_losses.py \
  tests/test_kernels_linear.py tests/test_kernels_batchnorm.py tests/test_kernels_batchnorm_relu.py \
  tests/test_kernels_bn_relu_maxpool_triton.py tests/test_kernels_bn_relu_maxpool.py tests/test_kernels_build.py \
  tests/test_kernels_conv_triton.py tests/test_meta_step_graphs.py tests/test_precision.py::test_policies_on_cuda \
  tests/test_graph_models_cuda.py \
  --deselect tests/test_kernels_step.py::test_bad_inputs_name_the_argument \
  --deselect tests/test_kernels_mlp.py::test_bad_arguments_name_the_argument \
  --deselect tests/test_kernels_bn_relu_maxpool.py::test_bad_arguments_name_the_argument

# the issues' measurements first (suite, precision), the diagnostic benches after: a step that finds the
# budget spent is skipped, so the order is the priority
step suite 180 "$PY" -m fastmaml bench --device cuda --out "$WORK/suite" --no-memory --repeats 5 --budget 20 \
  --sensitivity-draws 0 \
  --workloads conv28-1shot-K1 conv28-1shot-K5 resnet12w-84-K5 sinusoid-K5 sinusoid-K1 class28-1shot-K1 vit32-1shot-K1 \
  --impls "fastmaml[auto,second]" "fastmaml-plan[auto,second]" "fastmaml-graph[auto,second]" \
  "fastmaml[triton,second]" "fastmaml[auto,first]" torch.func-vmap
step precision 60 "$PY" -m fastmaml bench --device cuda --out "$WORK/precision" --no-memory --repeats 5 --budget 10 \
  --sensitivity-draws 0 --workloads conv28-1shot-K1 resnet12w-84-K5 \
  --impls "fastmaml[auto,second]" fastmaml-fp32 fastmaml-tf32 fastmaml-bf16
step conv_triton 80 "$PY" benchmarks/conv_triton_bench.py --out "$WORK" --precisions fp32 --repeats 3 --budget 55
step ops 80 "$PY" benchmarks/op_bench.py --device cuda --out "$WORK" \
  --workloads sinusoid-K1 conv28-1shot-K1
step ops_lr 40 "$PY" benchmarks/op_bench.py --device cuda --out "$WORK" --learned-lr --workloads conv28-1shot-K1
step conv 60 "$PY" benchmarks/conv_batching.py --device cuda --out "$WORK"
step layout 40 "$PY" benchmarks/conv_layout.py --device cuda --repeats 5 --step-repeats 2 --workloads resnet12w-84-K5
step crash 70 bash benchmarks/crash_check.sh "$WORK/crash"

"$PY" benchmarks/gpu_check_report.py --out "$WORK" > /dev/null 2> "$WORK/report.err"
cp "$WORK/gpu_check.md" "$OUT/" 2>/dev/null
tar czf "$OUT/gpu_check.tar.gz" -C "$WORK" . 2>/dev/null
echo "== wrote $OUT/gpu_check.md after $(($(date +%s) - START)) s"
cat "$WORK/gpu_check.md" 2>/dev/null || cat "$WORK/report.err"
