"""The certified k-NN's knobs on real features: fallbacks and time per batch of 8 images.

For each number of rescanned candidates (``reranking.RESCANNED``) and candidate count C, the
certified search of a batch of 8 images' patches (784 each) against a 10% coreset bank: the
self-excluded calibration's queries (training images, their own bank rows excluded) and test
queries. Each setting is compiled once (ahead of time, the bank an argument), then all are timed
interleaved, best of ``--repeats``; the plain exact scan is timed beside them. Every setting's
answer is checked equal to the plain scan's.

Usage:
  python benchmarks/certified_knn.py --features FEATURES.npz   # train/test/bank arrays
  python benchmarks/certified_knn.py --data .../bottle --backbone wide_resnet50_2 \\
      --features /tmp/wrn.npz   # extracts them first (random weights unless converted ones load)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from common import RESULTS, machine, write_results


def extract(path: Path, data: str, backbone: str) -> None:
    """Training and test patch features of ``data`` and the 10% coreset bank, saved to ``path``."""
    from patchcore_jax import PatchCore, PatchCoreConfig, preprocess
    from patchcore_jax.backbones import init_backbone, load_backbone
    from patchcore_jax.datasets import folders

    config = PatchCoreConfig(backbone=backbone, coreset_fraction=0.1, calibration="none")
    try:
        module = load_backbone(backbone)
    except (FileNotFoundError, OSError):
        module = init_backbone(backbone, config.layers)
    model = PatchCore(config, backbone=module)

    def features(paths):
        return model.patch_features(preprocess.iter_image_batches(paths, 8, config.resize, 224))

    train = features(folders.load_train_paths(data))
    test = features([s.image_path for s in folders.load_dataset(data).test_samples])
    model.fit_features(train)
    np.savez(path, train=train, test=test, bank=np.asarray(model.memory_bank))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--data", help="dataset folder: extract --features first if missing")
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--settings", nargs="+", default=["2,32", "4,32", "6,32", "4,24"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "certified_knn.md")
    args = parser.parse_args()
    if not args.features.exists():
        extract(args.features, args.data, args.backbone)

    import jax
    import jax.numpy as jnp

    from patchcore_jax import knn, reranking
    from patchcore_jax.sharding import single_device_mesh

    load_before = os.getloadavg()[0]
    arrays = np.load(args.features)
    train, test, bank = arrays["train"], arrays["test"], arrays["bank"]
    patches = 784
    rows = {row.tobytes(): i for i, row in enumerate(train)}
    sources = np.array([rows[row.tobytes()] // patches for row in bank], np.int32)
    images = np.arange(0, train.shape[0] // patches, 26)[:8]  # 8 images spread over the set
    calibration = np.concatenate([train[i * patches : (i + 1) * patches] for i in images])
    workloads = {
        "calibration (self-excluded)": (calibration, np.repeat(images, patches).astype(np.int32)),
        "test": (test[: 8 * patches], None),
    }
    search = knn.low_rank_search(jnp.asarray(bank))
    mesh, default_rescanned = single_device_mesh(), reranking.RESCANNED

    def program(num_candidates, exclude):
        def run(queries, memory_bank, search, query_images, bank_images):
            return knn.nearest_neighbors_unchecked(
                queries, memory_bank, 1, True, 4096, 1024, mesh, num_candidates, None,
                search if num_candidates else None,
                query_images if exclude else None, bank_images if exclude else None,
                num_candidates is not None,
            )  # fmt: skip

        return jax.jit(run)

    lines = []
    for name, (queries, query_images) in workloads.items():
        exclude = query_images is not None
        inputs = (jnp.asarray(queries), jnp.asarray(bank), search, query_images, sources)
        compiled, fallbacks = {}, {}
        for setting in ["plain", *args.settings]:
            if setting == "plain":
                count, reranking.RESCANNED = None, default_rescanned
            else:
                rescanned, count = map(int, setting.split(","))
                reranking.RESCANNED = rescanned
            jax.clear_caches()  # RESCANNED is read when the program is traced
            compiled[setting] = program(count, exclude).lower(*inputs).compile()
            distances, indices, flags = compiled[setting](*inputs)
            if setting == "plain":
                plain = (np.asarray(distances), np.asarray(indices))
            else:
                assert np.array_equal(np.asarray(indices), plain[1]), setting
                assert np.array_equal(np.asarray(distances), plain[0]), setting
                fallbacks[setting] = int(np.asarray(flags).sum())
        reranking.RESCANNED = default_rescanned
        times = {setting: [] for setting in compiled}
        for _ in range(args.repeats):
            for setting, run in compiled.items():
                start = time.perf_counter()
                jax.block_until_ready(run(*inputs))
                times[setting].append(time.perf_counter() - start)
        lines += [
            f"\n{name}: {len(queries)} queries (8 images), bank {bank.shape[0]} rows\n",
            "| setting (rescanned, C) | fallbacks | s / 8 images (best) | all runs |",
            "|---|---:|---:|---|",
        ]
        for setting, values in times.items():
            cells = f"{fallbacks.get(setting, '-')} | {min(values):.3f} | "
            cells += " ".join(f"{v:.3f}" for v in values)
            lines.append(f"| {setting} | {cells} |")
    load = f"Load average (1 min) before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}"
    write_results(args.out, "Certified k-NN knobs", machine(), [load], lines)


if __name__ == "__main__":
    main()
