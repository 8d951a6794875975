#!/usr/bin/env bash
# The main job: fit PatchCore on an MVTec AD category (default: the demo bottle subset shipped in
# data/) and print its metrics, fully offline, with the bundled ImageNet MobileNetV2 backbone.
# Creates .venv and installs the package on first use (again only when pyproject.toml changes).
# Usage: bash scripts/main.sh [CATEGORY_DIR] [extra `patchcore-jax fit` options...]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/mvtec_ad_demo/bottle}
shift || true
source scripts/venv.sh
if [ ! -f "$VENV_STAMP" ]; then
  venv_install --upgrade pip
  venv_install -e ".[tflite]"
  venv_installed
fi
RUN=runs/$(basename "$DATA")
.venv/bin/patchcore-jax fit "$DATA" --backbone mobilenet_v2 --out "$RUN/model" "$@"
.venv/bin/patchcore-jax evaluate "$RUN/model" "$DATA" --out "$RUN/evaluation" --overwrite
echo "metrics: $RUN/evaluation/metrics.json; heatmaps: $RUN/evaluation/heatmaps/"
