#!/usr/bin/env bash
# The test command (README): the import-layer check, the linter and formatter (ruff), the API reference
# (Sphinx, warnings as errors), then the unit, gradient, kernel (TRITON_INTERPRET=1) and CLI tests on the
# CPU, with the virtual environment made by scripts/setup.sh (or $PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
"$python" scripts/check_imports.py
"$python" -m ruff check fastmaml tests benchmarks examples scripts
"$python" -m ruff format --check fastmaml tests benchmarks examples scripts
"$python" -m sphinx -q -W -b html docs/reference docs/reference/_build
export TRITON_INTERPRET=1
"$python" -m pytest -q tests "$@"
