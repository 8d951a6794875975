"""Writes tests/regression/redesign_golden.npz: what today's fit engines and benchmark compute on
a small slice of the demo bottle category (MobileNetV2, exact, 10% coreset, every sampler that
the fit engines dispatch, self-excluded and held-out calibration).

Run once on the main before the "one of everything" redesign (commit e7d2e02, on an AVX-512
CPU); the redesign's test (tests/test_redesign_parity.py) compares the redesigned engines with
these outputs. ``features_sha256`` was added afterwards from the same features (every stored
bank row is one of their rows, bit for bit), written by the code below.
Usage: python tests/make_redesign_fixture.py [OUT]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from patchcore_jax import PatchCore, PatchCoreConfig, benchmark, sharding  # noqa: E402
from patchcore_jax.datasets.folders import load_dataset  # noqa: E402
from patchcore_jax.preprocess import load_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BOTTLE = REPO / "data" / "mvtec_ad_demo" / "bottle"
NUM_TRAIN = 10
MAP_STEP = 8  # maps are stored at every 8th pixel (the fixture stays small)
CASES = {
    # name: config changes (on top of CONFIG)
    "greedy_self_excluded": {},
    "greedy_held_out": {"calibration": "held-out", "calibration_fraction": 0.2},
    "random_none": {"sampler": "random", "calibration": "none"},
    "identity_none": {"sampler": "identity", "calibration": "none", "coreset_fraction": 1.0},
    "proxies_none": {"sampler": "learned_proxies", "calibration": "none"},
    "greedy_fast_self_excluded": {"precision": "fast"},
    "greedy_pruned_budget": {"coreset_method": "pruned", "feature_memory_budget": 1.0},
}
CONFIG = {"backbone": "mobilenet_v2", "coreset_fraction": 0.1, "batch_size": 4}


def case_images() -> tuple[np.ndarray, np.ndarray, list[Path]]:
    dataset = load_dataset(BOTTLE)
    train = list(dataset.train_paths)[:: len(dataset.train_paths) // NUM_TRAIN][:NUM_TRAIN]
    test = list(dataset.test_image_paths)[::14]
    return load_images(train), load_images(test), train


def features_digest(features: np.ndarray) -> str:
    """sha256 of the training patch features' float32 bytes."""
    return hashlib.sha256(np.ascontiguousarray(features, np.float32).tobytes()).hexdigest()


def row_indices(memory_bank: np.ndarray, features: np.ndarray) -> np.ndarray:
    """The row of ``features`` that each bank row equals (learned proxies: -1, not a row)."""
    lookup = {row.tobytes(): i for i, row in enumerate(features)}
    return np.array([lookup.get(row.tobytes(), -1) for row in memory_bank], np.int32)


def main(out: Path) -> None:
    train, test, train_paths = case_images()
    mesh = sharding.make_mesh()
    features = PatchCore(PatchCoreConfig(**CONFIG), mesh=mesh).patch_features(train)
    arrays: dict[str, np.ndarray] = {}
    records: dict[str, object] = {}
    # Which machines can expect bit-identical outputs: those whose backbone computes these bits.
    arrays["features_sha256"] = np.frombuffer(features_digest(features).encode(), np.uint8)
    for name, changes in CASES.items():
        config = PatchCoreConfig(**{**CONFIG, **changes})
        for engine in ("fit", "fit_features"):
            model = PatchCore(config, mesh=mesh)
            if engine == "fit":
                model.fit(train)
            else:
                model.fit_features(model.patch_features(train))
            prediction = model.predict(test)
            scores, maps = prediction.image_scores, prediction.anomaly_maps
            key = f"{name}/{engine}"
            memory_bank = np.asarray(model.memory_bank)
            arrays[f"{key}/bank_indices"] = row_indices(memory_bank, features)
            arrays[f"{key}/memory_bank_head"] = memory_bank[:64]
            if model.bank_source_images is not None:
                arrays[f"{key}/bank_source_images"] = np.asarray(model.bank_source_images)
            arrays[f"{key}/image_scores"] = np.asarray(scores)
            arrays[f"{key}/anomaly_maps"] = np.asarray(maps)[:, ::MAP_STEP, ::MAP_STEP]
            records[key] = None if model.calibration is None else model.calibration.to_dict()
    result = benchmark.evaluate_category(
        BOTTLE, [PatchCoreConfig(**CONFIG, calibration="none")], train_images=NUM_TRAIN, mesh=mesh
    )
    records["benchmark"] = {k: v for k, v in result.metrics.items() if k != "train_images"}
    records["benchmark_train_images"] = result.metrics["train_images"]
    arrays["records"] = np.frombuffer(json.dumps(records, default=float).encode(), np.uint8)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}: {len(arrays)} arrays")


if __name__ == "__main__":
    default = REPO / "tests" / "regression" / "redesign_golden.npz"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
