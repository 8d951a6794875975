"""Incremental fit against a full refit on MVTec AD bottle (offline MobileNetV2, 10% coreset).

Fits on the first half of the sorted training images, extends the model with the second half
(``PatchCore.extend``), and compares with one fit on all of them: bank sizes, the share of bank
rows the two banks have in common, image / pixel AUROC and PRO on the whole test set, and the
time of each step (after compilation of the embedding; coreset times include their compiles).

    python benchmarks/incremental_fit.py [--data ../shared/data/mvtec_ad/bottle]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from common import REPO_ROOT, RESULTS, machine, write_results  # noqa: E402

from patchcore_jax import PatchCore, PatchCoreConfig, metrics, preprocess  # noqa: E402
from patchcore_jax.datasets import folders  # noqa: E402


def evaluate(model: PatchCore, dataset: folders.Dataset) -> dict[str, float]:
    prediction = model.predict(
        preprocess.iter_image_batches(dataset.test_image_paths, model.config.batch_size)
    )
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    masks = preprocess.load_masks(dataset.test_mask_paths, image_paths=dataset.test_image_paths)
    return metrics.evaluate(dataset.test_labels, scores, masks, maps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = REPO_ROOT.parent / "shared/data/mvtec_ad/bottle"
    parser.add_argument("--data", type=Path, default=default)
    args = parser.parse_args()
    dataset = folders.load_dataset(args.data)
    train = list(dataset.train_paths)
    half = len(train) // 2
    config = PatchCoreConfig(backbone="mobilenet_v2", calibration="none", batch_size=16)
    rows = []

    def features(model: PatchCore, paths) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        result = model.patch_features(preprocess.iter_image_batches(paths, config.batch_size))
        return result, time.perf_counter() - start

    full = PatchCore(config)
    all_features, full_embed_s = features(full, train)
    start = time.perf_counter()
    full.fit_features(all_features)
    full_coreset_s = time.perf_counter() - start

    incremental = PatchCore(config, backbone=full.backbone)
    first, _ = features(incremental, train[:half])
    start = time.perf_counter()
    incremental.fit_features(first)
    first_coreset_s = time.perf_counter() - start
    second, _ = features(incremental, train[half:])
    start = time.perf_counter()
    incremental.extend_features(second)
    extend_s = time.perf_counter() - start

    full_bank = np.asarray(full.memory_bank)
    incremental_bank = np.asarray(incremental.memory_bank)
    shared = len({r.tobytes() for r in full_bank} & {r.tobytes() for r in incremental_bank})
    for name, model, coreset_s in (
        (f"full fit on {len(train)} images", full, f"{full_coreset_s:.1f}"),
        (
            f"fit on {half} + extend with {len(train) - half}",
            incremental,
            f"{first_coreset_s:.1f} + {extend_s:.1f}",
        ),
    ):
        result = evaluate(model, dataset)
        rows.append(
            f"| {name} | {model.memory_bank.shape[0]} | {coreset_s} | "
            f"{result['image_auroc']:.4f} | {result['pixel_auroc']:.4f} | "
            f"{result['anomaly_pixel_auroc']:.4f} | {result['pro']:.4f} |"
        )
    body = [
        f"Bottle: {len(train)} training images (sorted; first {half} fitted, the other "
        f"{len(train) - half} added with `extend`), all {len(dataset.test_samples)} test images. "
        "MobileNetV2, 10% approximate greedy coreset (coreset_method auto), seed 0, k = 1.",
        "",
        "| model | bank rows | coreset s | image AUROC | pixel AUROC | anomaly-pixel AUROC | PRO |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"Bank rows in common: {shared} of {full_bank.shape[0]} "
        f"({shared / full_bank.shape[0]:.1%}). Feature extraction of all images: "
        f"{full_embed_s:.1f} s.",
    ]
    load = os.getloadavg()[0]
    text = write_results(
        RESULTS / "incremental_fit.md",
        "Incremental fit (PatchCore.extend) against a full refit",
        machine(),
        [f"Load average before the run: {load:.1f} (shared 2-core machine)"],
        body,
    )
    print(text)


if __name__ == "__main__":
    main()
