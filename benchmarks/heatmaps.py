"""Seconds spent drawing ``evaluate``'s heatmaps against seconds spent scoring, on MVTec AD bottle.

Runs ``workflows.evaluate_dataset`` on a saved model with heatmaps and times every
``viz.save_heatmaps`` call (the drawing of all heatmap PNGs) inside it; prints one markdown table
row: drawing seconds, images, seconds per image, the whole evaluation's seconds and the load
average before and after. The same script measures any version of the package (run it with that
version on ``PYTHONPATH``), so before/after rows compare like with like.

    python benchmarks/heatmaps.py MODEL [--data ../shared/data/mvtec_ad/bottle] [--label after]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from common import REPO_ROOT  # noqa: E402

from patchcore_jax import viz, workflows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a saved model (patchcore-jax fit --out)")
    parser.add_argument(
        "--data", type=Path, default=REPO_ROOT.parent / "shared/data/mvtec_ad/bottle"
    )
    parser.add_argument("--label", default="this version", help="the row's first cell")
    args = parser.parse_args()
    drawing = {"seconds": 0.0, "images": 0}
    save_heatmaps = viz.save_heatmaps

    def timed(*arguments, **options):
        start = time.perf_counter()
        written = save_heatmaps(*arguments, **options)
        drawing["seconds"] += time.perf_counter() - start
        drawing["images"] += len(written)
        return written

    viz.save_heatmaps = timed
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        workflows.evaluate_dataset(args.model, args.data, Path(out) / "evaluation")
        total = time.perf_counter() - start
    seconds, images = drawing["seconds"], drawing["images"]
    print(
        f"| {args.label} | {seconds:.1f} | {images} | {1000 * seconds / max(images, 1):.0f} | "
        f"{total:.1f} | {load_before:.1f} / {os.getloadavg()[0]:.1f} |"
    )


if __name__ == "__main__":
    main()
