"""The one fit engine computes what the two engines before it computed (issue 18).

``tests/regression/redesign_golden.npz`` holds the outputs of ``fit`` and ``fit_features`` before
the redesign (``tests/make_redesign_fixture.py``, on the demo bottle slice, 8 CPU devices) for
every sampler and calibration, and of the benchmark's evaluation; each case is recomputed here.
Where the backbone computes the same training features as the machine that made the file (their
sha256 is stored), every output is compared exactly: the bank's rows (as indices into the
training features) and first rows, the bank's source images, the test scores and maps (every
8th pixel), the calibration and the benchmark's metrics. On a CPU that rounds the backbone's
float32 sums differently the features differ in their last bits, and no tolerance on the
outputs can be derived from that (an identity bank's nearest distances cancel: maps moved by
up to 7e-4 relative under ``--xla_cpu_max_isa=AVX``), so there the golden comparison does not
apply: the bank must still be rows of this machine's features, the outputs must have the
golden's structure, and ``fit`` and ``fit_features`` must agree bit for bit in the same run (as
everywhere); the benchmark comparison is skipped, saying why.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixture_data import REPO_ROOT
from make_redesign_fixture import (
    BOTTLE,
    CASES,
    CONFIG,
    MAP_STEP,
    NUM_TRAIN,
    case_images,
    features_digest,
    row_indices,
)

from patchcore_jax import PatchCore, PatchCoreConfig, benchmark, sharding


@pytest.fixture(scope="module")
def golden() -> tuple[dict[str, np.ndarray], dict]:
    with np.load(REPO_ROOT / "tests" / "regression" / "redesign_golden.npz") as data:
        arrays = {key: data[key] for key in data.files}
    return arrays, json.loads(bytes(arrays.pop("records")).decode())


@pytest.fixture(scope="module")
def images():
    train, test, _ = case_images()
    return train, test


@pytest.fixture(scope="module")
def reference_model(images):
    """A model whose backbone (probed once) every case shares, and the training features."""
    model = PatchCore(PatchCoreConfig(**CONFIG), mesh=sharding.make_mesh())
    return model, model.patch_features(images[0])


@pytest.fixture(scope="module")
def same_features(golden, reference_model) -> bool:
    """Whether this machine's backbone computes the golden file's features bit for bit."""
    arrays, _ = golden
    return features_digest(reference_model[1]) == bytes(arrays["features_sha256"]).decode()


def _outputs(model: PatchCore, features: np.ndarray, test: np.ndarray) -> dict:
    prediction = model.predict(test)
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    memory_bank = np.asarray(model.memory_bank)
    out = {
        "bank_indices": row_indices(memory_bank, features),
        "memory_bank_head": memory_bank[:64],
        "image_scores": np.asarray(scores),
        "anomaly_maps": np.asarray(maps)[:, ::MAP_STEP, ::MAP_STEP],
        "memory_bank": memory_bank,
    }
    if model.bank_source_images is not None:
        out["bank_source_images"] = np.asarray(model.bank_source_images)
    calibration = None if model.calibration is None else model.calibration.to_dict()
    out["calibration"] = json.loads(json.dumps(calibration, default=float))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_fit_and_fit_features_equal_the_golden_outputs(
    case, golden, images, reference_model, same_features
):
    arrays, records = golden
    arrays = {k: v for k, v in arrays.items() if k != "features_sha256"}
    base, features = reference_model
    train, test = images
    config = PatchCoreConfig(**{**CONFIG, **CASES[case]})
    outputs = {}
    for engine in ("fit", "fit_features"):
        model = PatchCore(config, backbone=base.backbone, mesh=base.mesh)
        if engine == "fit":
            model.fit(train)
            assert set(model.fit_timings) == {"features", "coreset", "calibration"}
        else:
            model.fit_features(model.patch_features(train))
        out = outputs[engine] = _outputs(model, features, test)
        key = f"{case}/{engine}"
        if same_features:
            for name in ("bank_indices", "memory_bank_head"):
                np.testing.assert_array_equal(out[name], arrays[f"{key}/{name}"], err_msg=key)
        elif case != "proxies_none":  # a sampled bank: rows of this machine's features
            assert np.all(out["bank_indices"] >= 0), key
        for name in ("image_scores", "anomaly_maps"):
            assert out[name].shape == arrays[f"{key}/{name}"].shape, key + name
            if same_features:
                np.testing.assert_array_equal(out[name], arrays[f"{key}/{name}"], err_msg=key)
        if f"{key}/bank_source_images" in arrays and same_features:
            np.testing.assert_array_equal(
                out["bank_source_images"], arrays[f"{key}/bank_source_images"]
            )
        assert ("bank_source_images" in out) == (f"{key}/bank_source_images" in arrays), key
        if same_features or out["calibration"] is None:
            assert out["calibration"] == records[key], key
        else:
            assert out["calibration"].keys() == records[key].keys(), key
    fit, fit_features = outputs["fit"], outputs["fit_features"]
    for name in ("memory_bank", "image_scores", "anomaly_maps"):
        np.testing.assert_array_equal(fit[name], fit_features[name], err_msg=name)
    assert fit["calibration"] == fit_features["calibration"]


def test_a_benchmark_row_equals_the_golden_evaluation(golden, same_features):
    """``benchmark.evaluate_category`` (fit + evaluate, the bounded-memory engine) gives the
    metrics the benchmark gave before the redesign."""
    _, records = golden
    if not same_features:
        pytest.skip("this CPU's backbone features differ from the golden file's in their last bits")
    result = benchmark.evaluate_category(
        BOTTLE,
        [PatchCoreConfig(**CONFIG, calibration="none")],
        train_images=NUM_TRAIN,
        mesh=sharding.make_mesh(),
    )
    assert result.metrics["train_images"] == records["benchmark_train_images"]
    metrics = json.loads(json.dumps(result.metrics, default=float))
    assert {name: metrics[name] for name in records["benchmark"]} == records["benchmark"]
