#!/usr/bin/env bash
# One prepared run for a lent GPU (or TPU) machine that already has jax, flax, optax and orbax:
# checks the device results against the reference fixtures (the CPU-verified numbers) and times
# each stage. Installs nothing; the package runs from the source tree.
# Usage (repo root; the fixtures come from tests/fixtures, nothing from ../shared):
#   OUT=/tmp/out bash benchmarks/gpu.sh        -> $OUT/gpu.md (table) and $OUT/gpu.log
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
python3 benchmarks/gpu_check.py --out "$OUT/gpu.md" 2>&1 | tee "$OUT/gpu.log"
