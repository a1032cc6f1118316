#!/usr/bin/env bash
# The test command (README): unit, gradient, kernel (TRITON_INTERPRET=1) and CLI tests on the CPU,
# with the virtual environment made by scripts/setup.sh (or $PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
export TRITON_INTERPRET=1
"$python" -m pytest -q tests "$@"
