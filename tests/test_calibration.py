"""Threshold calibration: self-excluded and held-out nominal scores on real bottle images,
thresholds and normalisation against independent computations."""

import jax
import numpy as np
import pytest
from conftest import BOTTLE

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
    scores, maps = model.predict(train_images[held_out])
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
