#!/usr/bin/env bash
# Does an argument check (TORCH_CHECK) in our C++ extension throw cleanly on this machine, or crash
# the process? Part of benchmarks/gpu_check.sh (the "crash" step); usable alone:
#     bash benchmarks/crash_check.sh DIR
# Writes into DIR: facts.txt (compiler, C++ ABI, libraries the extension links), one log per
# bad-input test file (each in its own process), repro.txt (one bad call on CPU and one on CUDA
# tensors, exit status of each: 0 = the error was raised and caught, 139 = segmentation fault) and,
# when a repro crashed, gdb.txt (cuda-gdb's backtrace of the crash).
set -u -o pipefail
DIR=${1:?usage: crash_check.sh DIR}
mkdir -p "$DIR"
PY="${PYTHON:-python}"

{
  echo "gcc: $(gcc --version 2>&1 | head -1)"
  "$PY" - <<'EOF' 2>&1
import glob, os, torch
print("torch", torch.__version__, "| CXX11 ABI", torch.compiled_with_cxx11_abi())
print("\n".join(line for line in torch.__config__.show().splitlines() if "compiler" in line.lower()
                or "CXX_FLAGS" in line)[:1500])
from fastmaml import build
print("extension:", build.load())
lib = str(build.build_directory(build.cuda_enabled()) / f"{build.NAME}.so")
print("library:", lib, os.path.exists(lib))
EOF
  lib=$(find "${TORCH_EXTENSIONS_DIR:-/tmp}" -name 'fastmaml_ext.so' 2>/dev/null | head -1)
  if [ -n "$lib" ]; then
    ldd "$lib" 2>&1 | grep -E "stdc\+\+|gcc_s|gomp|c10|libtorch\.so|python"
    # a libstdc++ linked in statically must not be exported (build.py links with --exclude-libs,ALL)
    echo "std::ostream symbols the extension exports: $(nm -D --defined-only "$lib" 2>/dev/null | grep -c _ZNSo)"
  fi
} > "$DIR/facts.txt" 2>&1

for t in tests/test_kernels_step.py::test_bad_inputs_name_the_argument \
         tests/test_kernels_mlp.py::test_bad_arguments_name_the_argument \
         tests/test_kernels_bn_relu_maxpool.py::test_bad_arguments_name_the_argument; do
  name=${t#tests/test_kernels_}
  name=${name%%.py*}
  timeout 60 "$PY" -X faulthandler -m pytest -q -p no:cacheprovider "$t" > "$DIR/bad_$name.log" 2>&1
  echo "bad-input tests $name: exit $?" >> "$DIR/repro.txt"
done

REPRO='
import sys, torch
from fastmaml import build
assert build.load()[0], build.load()
dev = sys.argv[1]
phi, g, a = torch.randn(2, 5, device=dev), torch.randn(2, 3, device=dev), torch.tensor(0.1, device=dev)
try:
    torch.ops.fastmaml.inner_update(phi, g, a)
    print("no error raised")
except RuntimeError as exc:
    print("raised cleanly:", str(exc).splitlines()[0])
'
crashed=""
for dev in cpu cuda; do
  timeout 60 "$PY" -X faulthandler -c "$REPRO" "$dev" > "$DIR/repro_$dev.log" 2>&1
  rc=$?
  echo "repro on $dev: exit $rc: $(head -c 300 "$DIR/repro_$dev.log" | tr '\n' ' ')" >> "$DIR/repro.txt"
  if [ "$rc" -ge 128 ] && [ -z "$crashed" ]; then crashed=$dev; fi  # killed by a signal
done

if [ -n "$crashed" ] && command -v cuda-gdb > /dev/null; then
  timeout 120 cuda-gdb -q -batch -ex "set pagination off" -ex "set confirm off" -ex run -ex bt \
    -ex "info sharedlibrary" --args "$PY" -c "$REPRO" "$crashed" > "$DIR/gdb.txt" 2>&1
  echo "cuda-gdb exit $?" >> "$DIR/repro.txt"
fi
cat "$DIR/repro.txt"
