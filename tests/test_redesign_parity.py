"""The one fit engine computes what the two engines before it computed (issue 18).

``tests/regression/redesign_golden.npz`` holds the outputs of ``fit`` and ``fit_features`` before
the redesign (``tests/make_redesign_fixture.py``, on the demo bottle slice, 8 CPU devices) for
every sampler and calibration; each case is recomputed here and compared exactly: the bank's
rows (as indices into the training features) and first rows, the bank's source images, the
test scores and maps (every 8th pixel), and the calibration. ``fit`` and ``fit_features`` must
also agree bit for bit in the same run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixture_data import REPO_ROOT
from make_redesign_fixture import CASES, CONFIG, MAP_STEP, case_images, row_indices

from patchcore_jax import PatchCore, PatchCoreConfig, sharding


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


def _outputs(model: PatchCore, features: np.ndarray, test: np.ndarray) -> dict:
    scores, maps = model.predict(test)
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
def test_fit_and_fit_features_equal_the_golden_outputs(case, golden, images, reference_model):
    arrays, records = golden
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
        for name in ("bank_indices", "memory_bank_head", "image_scores", "anomaly_maps"):
            np.testing.assert_array_equal(out[name], arrays[f"{key}/{name}"], err_msg=key + name)
        if f"{key}/bank_source_images" in arrays:
            np.testing.assert_array_equal(
                out["bank_source_images"], arrays[f"{key}/bank_source_images"]
            )
        else:
            assert "bank_source_images" not in out, key
        assert out["calibration"] == records[key], key
    fit, fit_features = outputs["fit"], outputs["fit_features"]
    for name in ("memory_bank", "image_scores", "anomaly_maps"):
        np.testing.assert_array_equal(fit[name], fit_features[name], err_msg=name)
    assert fit["calibration"] == fit_features["calibration"]
