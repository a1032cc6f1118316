#!/usr/bin/env bash
# Creates a virtual environment (default .venv) with torch 2.13.0 (CPU), the project's dependencies,
# the test tools and fastmaml itself (editable). Usage: bash scripts/setup.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
source "$venv/bin/activate"
pip install -q "torch==2.13.0"
pip install -q -r requirements-dev.txt
# --no-deps: everything is installed above; --no-build-isolation: no second torch in a build env
pip install -q --no-deps --no-build-isolation -e .
