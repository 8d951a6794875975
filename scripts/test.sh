#!/usr/bin/env bash
# Creates .venv, installs the package with its test, torch and tfds extras, and runs the test suite.
# Usage: bash scripts/test.sh [pytest args...]    (fresh machine: needs Python >= 3.11 and PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The torch extra reads .pth files; 2.13.0 is the CPU build (a plain "torch" pulls CUDA wheels).
.venv/bin/python -m pip install -q "torch==2.13.0"
# The tfds extra is tested too (tensorflow-cpu: no CUDA wheels).
.venv/bin/python -m pip install -q -e ".[test,torch,tfds]"
export PATCHCORE_SHARED=${PATCHCORE_SHARED:-$(cd .. && pwd)/shared}
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
