#!/usr/bin/env bash
# The test command (README): unit, gradient, kernel (TRITON_INTERPRET=1) and CLI tests on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1
python -m pytest -q tests "$@"
