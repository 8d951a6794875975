"""``--precision fast`` against ``exact`` on real MVTec AD bottle images: predict speed and
agreement, side by side in one process.

For each backbone (MobileNetV2 with its bundled weights; WideResNet-50-2 with random weights,
``init_backbone``, since its ImageNet weights are a download) an ``exact`` model is fitted on the
bottle training images (10% coreset, calibration ``none``), and a ``fast`` model gets the same
memory bank (on CPU ``fast`` keeps the float32 backbone, so its fit would select the same bank;
its low-rank basis is computed from the bank when it is set). Both then ``predict`` the 83 test
images (preloaded uint8 arrays) after a compile call, alternating exact / fast twice; the best
time of each is reported. Reported too:

  * image-score Spearman correlation fast vs exact, image and pixel AUROC of each mode;
  * recall of the low-rank candidate search: the fraction of test patches whose exact nearest
    bank row is among the C = 16 low-rank candidates, for r = 64 / 128 / 256 (and the bfloat16
    search's, for comparison).

Usage:
  python benchmarks/precision.py                       # writes benchmarks/results/precision.md
  python benchmarks/precision.py --wrn-train 60         # WRN bank from evenly spaced images
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from common import REPO_ROOT, RESULTS, machine, write_results
from scipy.stats import spearmanr

COUNT = 16  # candidates per patch (the default for k = 1)
RANKS = (64, 128, 256)


def candidate_recall(queries, bank):
    """{search: fraction of queries whose exact nearest bank row is among the candidates}."""
    from patchcore_jax import knn

    _, exact = knn.nearest_neighbors(queries, bank, 1)
    exact = np.asarray(exact)[:, 0]
    searches = {"bfloat16": None}
    searches.update({f"low-rank r={r}": knn.low_rank_search(bank, r) for r in RANKS})
    recall = {}
    for name, search in searches.items():
        _, candidates = knn.fast_candidates(queries, bank, COUNT, search=search)
        recall[name] = float(np.mean(np.any(np.asarray(candidates) == exact[:, None], axis=1)))
    return recall


def timed_predict(model, images):
    start = time.perf_counter()
    prediction = model.predict(images)
    result = prediction.image_scores, prediction.anomaly_maps
    return result, time.perf_counter() - start


def evaluate(name, backbone, train, test, labels, masks, rounds=2):
    from patchcore_jax import PatchCore, metrics
    from patchcore_jax.config import PatchCoreConfig

    configs = {
        p: PatchCoreConfig(backbone=backbone.name, calibration="none", precision=p, batch_size=8)
        for p in ("exact", "fast")
    }
    exact = PatchCore(configs["exact"], backbone=backbone)
    start = time.perf_counter()
    exact.fit(train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    fast = PatchCore(configs["fast"], backbone=backbone, memory_bank=exact.memory_bank)
    basis_s = time.perf_counter() - start
    models = {"exact": exact, "fast": fast}
    for model in models.values():  # compile outside the timings
        model.predict(test[:8])
    best = dict.fromkeys(models, float("inf"))
    results = {}
    for _ in range(rounds):
        for precision, model in models.items():
            results[precision], seconds = timed_predict(model, test)
            best[precision] = min(best[precision], seconds)
    print(name, fast.describe(), best, flush=True)
    queries = np.concatenate([np.asarray(f)[:n] for f, n in exact.embed(test)])
    recall = candidate_recall(queries.reshape(-1, queries.shape[-1]), exact.memory_bank)
    row = {
        "name": name,
        "images": f"{len(train)} / {len(test)}",
        "bank": int(exact.memory_bank.shape[0]),
        "fit_s": fit_s,
        "basis_s": basis_s,
        "describe": fast.describe(),
        "image_spearman": spearmanr(results["exact"][0], results["fast"][0]).statistic,
        "max_rel": float(
            np.max(np.abs(results["fast"][0] - results["exact"][0]) / np.abs(results["exact"][0]))
        ),
        "recall": recall,
    }
    for precision, (scores, maps) in results.items():
        row[precision] = {
            "image_auroc": metrics.image_auroc(labels, scores),
            "pixel_auroc": metrics.pixel_auroc(masks, maps),
            "images_per_s": len(test) / best[precision],
            "seconds": best[precision],
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wrn-train", type=int, default=0, help="WRN train images (0: all)")
    parser.add_argument("--skip-wrn", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()

    from patchcore_jax.backbones import init_backbone, load_backbone
    from patchcore_jax.datasets.folders import load_dataset
    from patchcore_jax.preprocess import load_images, load_mask

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from fixture_data import BOTTLE

    bottle = load_dataset(BOTTLE)
    samples = bottle.test_samples
    train = load_images(bottle.train_paths)
    test = load_images([s.image_path for s in samples])
    labels = np.array([s.label for s in samples])
    masks = np.stack([load_mask(s.mask_path) for s in samples])
    rows = [
        evaluate(
            "MobileNetV2 (bundled weights)",
            load_backbone("mobilenet_v2"),
            train,
            test,
            labels,
            masks,
        )
    ]
    if not args.skip_wrn:
        train_rows = np.linspace(0, len(train) - 1, args.wrn_train or len(train)).astype(int)
        rows.append(
            evaluate(
                "WideResNet-50-2 (random init)",
                init_backbone("wide_resnet50_2"),
                train[train_rows],
                test,
                labels,
                masks,
            )
        )
    load_after = os.getloadavg()

    body = [
        f"`PatchCore.describe()`: {rows[0]['describe']}. Coreset 10%, k = 1, squared L2, no "
        "reweighting, calibration `none`, batch size 8. Images: train / test (the bank is "
        "fitted once, by the exact model; the fast model is given the same bank, which is what "
        "its own fit selects on CPU, where its backbone is float32). WideResNet-50-2 has "
        "random weights (its ImageNet weights are a download), so its AUROCs say nothing about "
        "PatchCore, only about fast/exact agreement.",
        "",
        "| backbone | images | bank rows | exact img/s | fast img/s | speedup | "
        "image Spearman | max rel. image-score diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        e, f = row["exact"], row["fast"]
        body.append(
            f"| {row['name']} | {row['images']} | {row['bank']} | {e['images_per_s']:.2f} | "
            f"{f['images_per_s']:.2f} | {e['seconds'] / f['seconds']:.2f}x | "
            f"{row['image_spearman']:.4f} | {row['max_rel']:.1e} |"
        )
    body += [
        "",
        "| backbone | precision | image AUROC | pixel AUROC | predict s (83 images, best of 2) |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        for precision in ("exact", "fast"):
            r = row[precision]
            body.append(
                f"| {row['name']} | {precision} | {r['image_auroc']:.4f} | "
                f"{r['pixel_auroc']:.4f} | {r['seconds']:.2f} |"
            )
    names = list(rows[0]["recall"])
    body += [
        "",
        f"Candidate recall (C = {COUNT}): the fraction of the test patches whose exact nearest "
        "bank row is a candidate (where it is, the re-ranked result is exact mode's).",
        "",
        "| backbone | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for row in rows:
        body.append(
            f"| {row['name']} | " + " | ".join(f"{row['recall'][n]:.4f}" for n in names) + " |"
        )
    body += [
        "",
        "Fit (exact model, embedding + coreset): "
        + ", ".join(f"{row['name']} {row['fit_s']:.1f} s" for row in rows)
        + "; low-rank basis + projected bank (host float64 eigh + device projection): "
        + ", ".join(f"{row['basis_s']:.2f} s" for row in rows)
        + ".",
    ]
    text = write_results(
        RESULTS / "precision.md",
        "Precision policy: fast vs exact predict on CPU",
        machine(),
        [
            f"Load average (1/5/15 min) before: {load_before[0]:.1f} / {load_before[1]:.1f} / "
            f"{load_before[2]:.1f}, after: {load_after[0]:.1f} / {load_after[1]:.1f} / "
            f"{load_after[2]:.1f} (2 cores shared with other jobs; times are noisy)",
        ],
        body,
    )
    print(text)


if __name__ == "__main__":
    main()
