"""Threshold calibration: self-excluded and held-out nominal scores on real bottle images,
thresholds and normalisation against independent computations."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import BOTTLE
from float_rounding import squared_distance_error

from patchcore_jax import PatchCore, PatchCoreConfig, calibration, checkpoint, coreset
from patchcore_jax.preprocess import load_images

CONFIG = PatchCoreConfig(backbone="mobilenet_v2", coreset_fraction=0.05)


@pytest.fixture(scope="module")
def train_images():
    # 11 images that the demo category shares with the full one (it keeps every 3rd)
    return load_images([BOTTLE / "train/good" / f"{i:03d}.png" for i in range(0, 198, 18)])


@pytest.fixture(scope="module")
def fitted(train_images):
    """(default-calibrated model, its training patch features [N * P, D])."""
    model = PatchCore(CONFIG)
    features = model.patch_features(train_images)
    return model.fit_features(features), features


def _brute_force_scores(per_image, bank, sources, images, k=1):
    """Self-excluded image scores in float64 numpy: max over patches of the mean k smallest
    squared distances to bank rows whose source is not the image."""
    bank = bank.astype(np.float64)
    scores = []
    for features, image in zip(per_image.astype(np.float64), images, strict=True):
        distances = ((features[:, None, :] - bank[None, :, :]) ** 2).sum(-1)
        distances[:, sources == image] = np.inf
        scores.append(np.sort(distances, axis=1)[:, :k].mean(axis=1).max())
    return np.array(scores)


def test_self_excluded_calibration_keeps_the_bank_and_stores_the_numpy_quantile(fitted):
    model, features = fitted
    uncalibrated = PatchCore(CONFIG.replace(calibration="none"), backbone=model.backbone)
    uncalibrated.fit_features(features)
    reference = coreset.build_memory_bank(
        features,
        sampler=CONFIG.sampler,
        fraction=CONFIG.coreset_fraction,
        key=jax.random.key(CONFIG.seed),
        mesh=model.mesh,
    )
    bank = np.asarray(model.memory_bank)
    np.testing.assert_array_equal(bank, np.asarray(uncalibrated.memory_bank))
    np.testing.assert_array_equal(bank, np.asarray(reference))
    assert uncalibrated.calibration is None

    num_patches = int(np.prod(model.grid_shape))
    per_image = features.reshape(-1, num_patches, features.shape[1])
    sources = model.bank_source_images
    # Each bank row is a patch of the image it is attributed to.
    for row, source in zip(bank[::37], sources[::37], strict=True):
        assert (per_image[source] == row).all(axis=1).any()

    stored = model.calibration
    expected = _brute_force_scores(per_image, bank, sources, np.arange(len(per_image)))
    np.testing.assert_allclose(stored.image_scores, expected, rtol=1e-4)
    # Without exclusion every image would find its own patches (score far lower).
    assert stored.method == "self-excluded" and stored.rule == "quantile"
    assert stored.image_threshold == pytest.approx(
        np.quantile(stored.image_scores, CONFIG.threshold_quantile), rel=1e-7
    )
    assert stored.pixel_threshold == pytest.approx(
        np.quantile(stored.pixel_maxima, CONFIG.threshold_quantile), rel=1e-7
    )
    assert (stored.image_min, stored.image_max) == (
        stored.image_scores.min(),
        stored.image_scores.max(),
    )


def test_held_out_calibration_scores_images_kept_out_of_the_bank(fitted, train_images):
    base, features = fitted
    config = CONFIG.replace(calibration="held-out", calibration_fraction=0.25, seed=3)
    model = PatchCore(config, backbone=base.backbone).fit_features(features)
    held_out = calibration.held_out_images(len(train_images), 0.25, 3)
    assert model.calibration.images == tuple(held_out) and len(held_out) == 3
    kept = np.setdiff1d(np.arange(len(train_images)), held_out)
    num_patches = int(np.prod(model.grid_shape))
    kept_features = features.reshape(len(train_images), num_patches, -1)[kept].reshape(
        -1, features.shape[1]
    )
    reference = coreset.build_memory_bank(
        kept_features,
        sampler=config.sampler,
        fraction=config.coreset_fraction,
        key=jax.random.key(3),
        mesh=model.mesh,
    )
    np.testing.assert_array_equal(np.asarray(model.memory_bank), np.asarray(reference))
    assert set(model.bank_source_images) <= set(kept)
    prediction = model.predict(train_images[held_out])
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    np.testing.assert_allclose(model.calibration.image_scores, scores, rtol=1e-6)
    assert model.calibration.image_threshold == pytest.approx(
        np.quantile(scores, config.threshold_quantile), rel=1e-6
    )
    assert model.calibration.pixel_max == pytest.approx(maps.max(), rel=1e-6)


def test_held_out_fraction_that_leaves_no_training_images_is_refused():
    with pytest.raises(ValueError, match="leaves no training images"):
        calibration.held_out_images(1, 0.5, 0)
    with pytest.raises(ValueError, match="calibration_fraction must be in"):
        PatchCoreConfig(calibration="held-out", calibration_fraction=1.0)
    with pytest.raises(ValueError, match="learned_proxies"):
        PatchCoreConfig(sampler="learned_proxies")  # default self-excluded needs image rows


def test_calibration_survives_a_checkpoint_round_trip(fitted, tmp_path):
    model, _ = fitted
    restored = checkpoint.load(checkpoint.save(model, tmp_path / "model"), backbone=model.backbone)
    assert restored.calibration.to_dict() == model.calibration.to_dict()
    np.testing.assert_array_equal(restored.calibration.image_scores, model.calibration.image_scores)


def test_normalised_scores_put_the_threshold_at_one_half_and_clip():
    values = np.array([0.0, 2.0, 3.0, 5.0, 100.0], np.float32)
    normalised = calibration.normalize(values, threshold=3.0, minimum=1.0, maximum=5.0)
    np.testing.assert_allclose(normalised, [0.0, 0.25, 0.5, 1.0, 1.0])
    as_jax = calibration.normalize(jax.numpy.asarray(values), 3.0, 1.0, 5.0)
    np.testing.assert_allclose(np.asarray(as_jax), normalised)


def test_labelled_validation_gives_the_f1_optimal_threshold():
    rng = np.random.default_rng(1)
    labels = np.array([0] * 12 + [1] * 8)
    scores = rng.normal(size=20).astype(np.float32) + 1.5 * labels
    maps = rng.random((20, 4, 4)).astype(np.float32)
    result = calibration.calibrate(scores, maps, method="validation", quantile=0.99, labels=labels)

    def f1(threshold):
        predicted = scores >= threshold
        tp = np.sum(predicted & (labels == 1))
        return 2 * tp / (predicted.sum() + labels.sum())

    candidates = np.sort(scores)
    best = max(candidates, key=lambda t: (f1(t), -t))  # the lowest of the best
    assert result.rule == "f1" and result.image_threshold == pytest.approx(best)
    nominal_only = calibration.calibrate(scores, maps, method="validation", quantile=0.9)
    assert nominal_only.image_threshold == pytest.approx(np.quantile(scores, 0.9))


# ----------------------------------------------------------------------------------------------
# Images without a self-excluded score (issue 19, item 1)


def _without_foreign_rows(sources: np.ndarray, num_images: int) -> np.ndarray:
    """[N] bool: images every bank row of which is their own (no self-excluded score)."""
    return np.array([np.all(sources == image) for image in range(num_images)])


def test_copies_of_one_image_leave_the_image_holding_the_bank_out_of_the_threshold(fitted):
    base, features = fitted
    per_image = features.reshape(len(base.calibration.pixel_maxima), -1, features.shape[1])
    copies = np.concatenate([per_image[0]] * 4)  # four copies of one golden sample
    model = PatchCore(CONFIG, backbone=base.backbone).fit_features(copies)
    left_out = _without_foreign_rows(model.bank_source_images, 4)
    assert left_out.sum() >= 1  # the case of the issue: its score was inf and the threshold NaN
    stored = model.calibration
    assert stored.left_out == left_out.sum() and len(stored.image_scores) == 4 - left_out.sum()
    assert np.isfinite(stored.image_threshold) and np.isfinite(stored.image_scores).all()
    assert stored.image_threshold == np.quantile(stored.image_scores, CONFIG.threshold_quantile)
    assert f"{left_out.sum()} image(s) without a score left out" in stored.describe()


def test_a_one_row_bank_scores_the_other_images_or_refuses_when_too_few_remain(fitted):
    base, features = fitted
    per_image = features.reshape(len(base.calibration.pixel_maxima), -1, features.shape[1])
    one_row = CONFIG.replace(coreset_fraction=1e-4)  # max(1, int(3 * 784 * 1e-4)) = 1 row
    model = PatchCore(one_row, backbone=base.backbone).fit_features(
        per_image[:3].reshape(-1, features.shape[1])
    )
    (source,) = model.bank_source_images
    row = np.asarray(model.memory_bank)[0]
    others = [image for image in range(3) if image != source]
    # Each other image's score: its largest squared distance to the one row (k = 1).
    expected = np.array([((per_image[i] - row) ** 2).sum(-1).max() for i in others])
    bound = np.array([squared_distance_error(per_image[i], row[None]).max() for i in others])
    stored = model.calibration
    assert stored.left_out == 1 and len(stored.image_scores) == 2
    assert np.all(np.abs(stored.image_scores - expected) <= bound)
    with pytest.raises(ValueError, match=r"self-excluded calibration: 1 of 2 image\(s\) have no"):
        PatchCore(one_row, backbone=base.backbone).fit_features(
            per_image[:2].reshape(-1, features.shape[1])
        )


def test_calibrate_leaves_out_non_finite_scores_and_says_how_many():
    scores = np.array([1.0, np.nan, 3.0, np.inf, 2.0], np.float32)
    maps = np.arange(5 * 4, dtype=np.float32).reshape(5, 2, 2)
    maps[3] = np.inf
    labels = np.array([0, 1, 1, 0, 0])
    kept = np.array([0, 2, 4])
    result = calibration.calibrate(scores, maps, method="validation", quantile=0.5, labels=labels)
    reference = calibration.calibrate(
        scores[kept], maps[kept], method="validation", quantile=0.5, labels=labels[kept]
    )
    assert result.left_out == 2 and reference.left_out == 0
    assert {**result.to_dict(), "left_out": 0} == {**reference.to_dict(), "left_out": 0}
    assert "left_out" not in reference.to_dict()  # records of fully scored sets are unchanged
    assert calibration.Calibration.from_dict(result.to_dict()).left_out == 2
    with pytest.raises(ValueError, match="held-out calibration: 2 of 2 image"):
        calibration.calibrate(scores[[1, 3]], maps[[1, 3]], method="held-out", quantile=0.5)


@pytest.mark.parametrize("field", ["image_threshold", "image_max", "pixel_threshold", "pixel_min"])
def test_a_calibration_never_holds_a_non_finite_threshold_or_range(fitted, field, tmp_path):
    model, _ = fitted
    with pytest.raises(ValueError, match=f"calibration {field} is nan"):
        dataclasses.replace(model.calibration, **{field: float("nan")})
    with pytest.raises(ValueError, match=f"calibration {field} is inf"):
        calibration.Calibration.from_dict({**model.calibration.to_dict(), field: float("inf")})
    # A checkpoint written before the record checksum existed, with a NaN threshold in it.
    path = checkpoint.save(model, tmp_path / "model")
    record_file = path / (path / "CURRENT").read_text().strip() / "record" / "metadata"
    record = json.loads(record_file.read_text())
    del record["record_sha256"]
    record["calibration"][field] = float("nan")
    record_file.write_text(json.dumps(record))
    with pytest.raises(checkpoint.CheckpointError, match=f"calibration {field} is nan"):
        checkpoint.load(path, backbone=model.backbone)


@pytest.mark.parametrize("num_images, quantile", [(30, 0.995), (209, 0.995), (12, 0.9)])
def test_the_expected_false_alarm_rate_is_what_new_nominal_images_get(num_images, quantile):
    """Exchangeable nominal scores: the share of new ones at or above the quantile threshold of
    ``num_images`` calibration scores matches ``expected_false_alarm_rate`` within 4 standard
    errors of the simulation (not ``1 - quantile`` when images are few)."""
    rng = np.random.default_rng(0)
    trials = 20000
    scores = rng.standard_normal((trials, num_images + 1)).astype(np.float32)
    thresholds = np.quantile(scores[:, :num_images], quantile, axis=1)
    simulated = float(np.mean(scores[:, num_images] >= thresholds))
    calibrated = calibration.calibrate(
        scores[0, :num_images], np.zeros((num_images, 2, 2)), method="held-out", quantile=quantile
    )
    rate = calibrated.expected_false_alarm_rate()
    assert abs(simulated - rate) <= 4 * np.sqrt(rate * (1 - rate) / trials)
    flagged, nominal = calibrated.false_alarms()
    assert nominal == num_images and flagged == np.sum(scores[0, :num_images] >= thresholds[0])
    assert f"expected false-alarm rate {rate:.2%}" in calibrated.describe_false_alarms()


def test_the_expected_false_alarm_rate_of_an_f1_threshold_is_the_validation_share():
    scores = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], np.float32)
    labels = np.array([0, 0, 0, 1, 0, 1])  # F1-optimal: 4.0, one nominal (5.0) above it
    calibrated = calibration.calibrate(
        scores, np.zeros((6, 2, 2)), method="validation", quantile=0.995, labels=labels
    )
    assert calibrated.rule == "f1" and calibrated.image_threshold == 4.0
    assert calibrated.false_alarms() == (1, 4) and calibrated.expected_false_alarm_rate() == 0.25
