#!/usr/bin/env bash
# Creates .venv, installs the package with its test, torch and tfds extras (on first use, again
# only when pyproject.toml or this script changes), and runs the test suite.
# Usage: bash scripts/test.sh [pytest args...]    (fresh machine: needs Python >= 3.11 and PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
if [ ! -f "$VENV_STAMP" ]; then
  venv_install --upgrade pip
  # The torch extra reads .pth files; 2.13.0 is the CPU build (a plain "torch" pulls CUDA wheels).
  venv_install "torch==2.13.0"
  # The tfds extra is tested too (tensorflow-cpu: no CUDA wheels).
  venv_install -e ".[test,torch,tfds]"
  venv_installed
fi
export PATCHCORE_SHARED=${PATCHCORE_SHARED:-$(cd .. && pwd)/shared}
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
