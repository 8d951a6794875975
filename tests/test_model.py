"""PatchCore end to end on real MVTec AD bottle images with the bundled MobileNetV2."""

import re

import jax
import numpy as np
import pytest
from conftest import BOTTLE, REPO_ROOT
from sklearn.metrics import roc_auc_score

import patchcore_jax
from patchcore_jax import PatchCore, PatchCoreConfig, sharding
from patchcore_jax.datasets.folders import load_dataset
from patchcore_jax.preprocess import load_images, load_mask


@pytest.fixture(scope="module")
def bottle():
    return load_dataset(BOTTLE)


@pytest.fixture(scope="module")
def small_split(bottle):
    """12 train images, and 4 good + 4 defective test images with masks."""
    good = [s for s in bottle.test_samples if s.label == 0][:4]
    bad = [s for s in bottle.test_samples if s.label == 1][::16][:4]
    samples = good + bad
    return (
        load_images(bottle.train_paths[::17]),
        load_images([s.image_path for s in samples]),
        np.array([s.label for s in samples]),
    )


@pytest.fixture(scope="module")
def fitted_small(small_split):
    """A calibrated model fitted on ``small_split``'s training images (2 devices, batch 4)."""
    config = PatchCoreConfig(backbone="mobilenet_v2", coreset_fraction=0.05, batch_size=4)
    return PatchCore(config, mesh=sharding.make_mesh(1, jax.devices()[:2])).fit(small_split[0])


def test_fit_predict_is_independent_of_the_device_count(small_split):
    """1 device vs 8 devices (data-parallel) and 4x2 (bank-sharded): same bank, scores and maps."""
    train, test, _ = small_split
    config = PatchCoreConfig(backbone="mobilenet_v2", coreset_fraction=0.05, batch_size=8)
    single = PatchCore(config, mesh=sharding.single_device_mesh()).fit(train)
    prediction = single.predict(test)
    scores_1, maps_1 = prediction.image_scores, prediction.anomaly_maps
    assert len(jax.devices()) == 8
    for mesh in (sharding.make_mesh(1), sharding.make_mesh(2)):
        model = PatchCore(config, backbone=single.backbone, mesh=mesh).fit(train)
        np.testing.assert_array_equal(np.asarray(model.memory_bank), np.asarray(single.memory_bank))
        prediction = model.predict(test)
        scores, maps = prediction.image_scores, prediction.anomaly_maps
        np.testing.assert_allclose(scores, scores_1, rtol=1e-5)
        np.testing.assert_allclose(maps, maps_1, rtol=1e-5, atol=1e-5 * np.abs(maps_1).max())


def test_predict_compiles_once_and_accepts_batches(small_split):
    train, test, _ = small_split
    config = PatchCoreConfig(backbone="mobilenet_v2", coreset_fraction=0.05, batch_size=4)
    model = PatchCore(config, mesh=sharding.make_mesh(1, jax.devices()[:4]))
    model.fit(iter([train[:5], train[5:]]))  # an iterable of uneven batches
    prediction = model.predict(test)
    scores_all, maps_all = prediction.image_scores, prediction.anomaly_maps
    prediction = model.predict(iter([test[:3], test[3:]]))
    scores_split, maps_split = prediction.image_scores, prediction.anomaly_maps
    np.testing.assert_allclose(scores_split, scores_all, rtol=1e-6)
    np.testing.assert_allclose(maps_split, maps_all, rtol=1e-6, atol=1e-6 * maps_all.max())
    assert model._embed._cache_size() == 1  # every batch padded to one shape
    assert model._predict._cache_size() == 1


def test_fused_predict_equals_embedding_then_scoring_and_is_shared(small_split, fitted_small):
    """``predict`` runs backbone + features + k-NN as one program per batch: the same results
    as the two programs one after the other, and a second model of the same configuration
    reuses the compiled programs instead of compiling its own."""
    _, test, _ = small_split
    model, config = fitted_small, fitted_small.config
    prediction = model.predict(test)
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    scoring_bank = (*model._scoring_bank, model._search)  # the certified k-NN on CPU: its arrays
    two_step = [model._score(features, *scoring_bank) for features, _ in model.embed(test)]
    np.testing.assert_allclose(
        scores, np.concatenate([r.image_scores for r in two_step]), rtol=1e-6
    )
    np.testing.assert_allclose(
        maps, np.concatenate([r.anomaly_maps for r in two_step]), rtol=1e-6, atol=1e-6 * maps.max()
    )
    other = PatchCore(config, backbone=model.backbone, mesh=model.mesh)
    assert other._predict is model._predict and other._embed is model._embed
    other.memory_bank = model.memory_bank
    compiled = model._predict._cache_size()
    np.testing.assert_array_equal(other.predict(test).image_scores, scores)
    assert model._predict._cache_size() == compiled  # nothing compiled for the second model


def test_predict_counts_progress_and_its_inference_function_scores_alike(small_split, fitted_small):
    """``inference_function`` (what ``export`` serialises) is ``predict``'s computation on one
    device, without the bank's bucket padding: equal to float32 rounding."""
    _, test, _ = small_split
    model = fitted_small
    counted = []
    prediction = model.predict(test, progress=counted.append)
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    assert counted == [4, 4]
    result = jax.jit(model.inference_function())(test)
    np.testing.assert_allclose(result.image_scores, scores, rtol=1e-5)
    np.testing.assert_allclose(result.anomaly_maps, maps, rtol=1e-5, atol=1e-5 * maps.max())
    assert model.members == [model]


def test_banks_of_nearby_sizes_share_the_scoring_program(small_split):
    """The bank is padded to ``bank_bucket`` rows for scoring: a bank a few rows smaller (e.g.
    after fewer training images) reuses the compiled program, and the padding changes nothing:
    scores equal ``score_patch_features`` on the unpadded bank, neighbours are real rows."""
    from patchcore_jax import scoring
    from patchcore_jax.programs import bank_bucket

    assert [bank_bucket(n) for n in (1, 63, 64, 65, 16385, 16896, 16897)] == [
        1, 63, 64, 66, 16896, 16896, 17408,
    ]  # fmt: skip
    train, test, _ = small_split
    config = PatchCoreConfig(backbone="mobilenet_v2", coreset_fraction=0.05, batch_size=4)
    fitted = PatchCore(config, mesh=sharding.make_mesh(1, jax.devices()[:1])).fit(train)
    # The largest prefix of the fitted bank whose bucket has padding, and room for one row less.
    num_rows = next(
        m
        for m in range(fitted.memory_bank.shape[0], 2, -1)
        if bank_bucket(m) > m and bank_bucket(m - 1) == bank_bucket(m)
    )
    bank = np.asarray(fitted.memory_bank)[:num_rows]
    model = PatchCore(config, backbone=fitted.backbone, mesh=fitted.mesh, memory_bank=bank)
    assert model._scoring_bank[0].shape[0] == bank_bucket(num_rows) > num_rows
    prediction = model.predict(test)
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    compiled = model._predict._cache_size()
    features = np.concatenate([np.asarray(f)[:n] for f, n in model.embed(test)])
    direct = scoring.score_patch_features(features, bank, **model.scoring_options())
    np.testing.assert_allclose(scores, np.asarray(direct.image_scores), rtol=1e-6)
    np.testing.assert_allclose(maps, np.asarray(direct.anomaly_maps), rtol=1e-6, atol=1e-6)
    smaller = PatchCore(config, backbone=model.backbone, mesh=model.mesh, memory_bank=bank[:-1])
    smaller_scores = smaller.predict(test).image_scores
    assert model._predict._cache_size() == compiled  # one row fewer: same bucket, no compile
    assert np.all(smaller_scores >= scores * (1 - 1e-6))  # fewer rows: never nearer


def test_bad_images_are_refused(small_split):
    train, _, _ = small_split
    model = PatchCore(PatchCoreConfig(backbone="mobilenet_v2"), mesh=sharding.single_device_mesh())
    with pytest.raises(RuntimeError, match="before fit"):
        model.predict(train[:1])
    with pytest.raises(ValueError, match=r"\[B, 224, 224, 3\]"):
        model.fit(train[:, :100])
    with pytest.raises(ValueError, match="no images"):
        model.fit(iter([]))


def test_predict_returns_raw_and_normalised_scores_decisions_and_maps(small_split, fitted_small):
    """``predict``'s result carries the calibration's decisions and normalised scores beside
    the raw scores and maps; without a calibration those two are None (nothing is decided)."""
    from float_rounding import UNIT_ROUNDOFF

    _, test, _ = small_split
    model = fitted_small
    prediction = model.predict(test)
    calibration = model.calibration
    assert prediction.calibration is calibration is not None
    scores = prediction.image_scores
    assert scores.shape == (8,) and prediction.anomaly_maps.shape == (8, 224, 224)
    np.testing.assert_array_equal(prediction.decisions, scores >= calibration.image_threshold)
    # anomalib's normalisation in float64; float32 rounds each of its 4 operations once.
    offset = scores.astype(np.float64) - calibration.image_threshold
    spread = calibration.image_max - calibration.image_min
    expected = np.clip(offset / spread + 0.5, 0, 1)
    bound = 4 * UNIT_ROUNDOFF * (np.abs(offset) / spread + 1)
    assert np.all(np.abs(prediction.normalized_scores - expected) <= bound)
    assert prediction.normalized_scores.dtype == np.float32
    np.testing.assert_array_equal(prediction.normalized_scores >= 0.5, prediction.decisions)
    uncalibrated = PatchCore(
        model.config, backbone=model.backbone, mesh=model.mesh, memory_bank=model.memory_bank
    ).predict(test)
    assert uncalibrated.normalized_scores is None and uncalibrated.decisions is None
    np.testing.assert_array_equal(uncalibrated.image_scores, scores)
    # A list of single images is not a list of batches: one line says so.
    with pytest.raises(ValueError, match=r"got one image \(224, 224, 3\) .*np\.stack") as error:
        model.predict(list(test))
    assert "an iterable of such batches" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"got \(1, 256, 256, 3\).*preprocess\.image_from_array"):
        model.predict(np.zeros((1, 256, 256, 3), np.uint8))


def test_readme_array_example_runs_as_written(subset, tmp_path, monkeypatch):
    """README's ``PatchCore`` example on arrays, run as written on conftest's subset of bottle
    (10 training images; 3 good and 3 defective test images)."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme[readme.index("<!-- readme-example: arrays -->") :]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    assert '"data/mvtec_ad_demo/bottle"' in code
    monkeypatch.chdir(tmp_path)  # the example saves into runs/lib/arrays
    namespace = {}
    exec(code.replace('"data/mvtec_ad_demo/bottle"', repr(str(subset))), namespace)
    model, prediction, one = namespace["model"], namespace["prediction"], namespace["one"]
    labels = namespace["data"].test_labels
    assert prediction.image_scores.shape == (6,) and prediction.anomaly_maps.shape == (6, 224, 224)
    assert roc_auc_score(labels, prediction.image_scores) >= 0.8
    np.testing.assert_array_equal(
        prediction.decisions, prediction.image_scores >= model.calibration.image_threshold
    )
    assert one.image_scores.shape == (1,) and one.decisions.shape == (1,)
    restored = patchcore_jax.load(tmp_path / "runs/lib/arrays", mesh=model.mesh)
    test_images = load_images(namespace["data"].test_image_paths[:2])
    np.testing.assert_array_equal(
        restored.predict(test_images).image_scores, model.predict(test_images).image_scores
    )


def _bottle_aurocs(bottle, coreset_fraction: float) -> tuple[float, float]:
    """Fits on every train image, scores every test image: (image AUROC, full-pixel AUROC)."""
    config = PatchCoreConfig(
        backbone="mobilenet_v2", coreset_fraction=coreset_fraction, batch_size=16
    )
    model = PatchCore(config).fit(load_images(bottle.train_paths))
    samples = bottle.test_samples
    prediction = model.predict(load_images([s.image_path for s in samples]))
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    labels = np.array([s.label for s in samples])
    masks = np.stack([load_mask(s.mask_path) for s in samples])
    image_auroc = roc_auc_score(labels, scores)
    pixel_auroc = roc_auc_score(masks.ravel(), maps.ravel())
    print(
        f"bottle, mobilenet_v2, {coreset_fraction:.0%} coreset: image AUROC {image_auroc:.4f}, "
        f"pixel AUROC {pixel_auroc:.4f}"
    )
    return image_auroc, pixel_auroc


def test_bottle_real_data_separates_defects(bottle):
    """The CI-sized real-data run: all 209 train and 83 test images, 1% coreset."""
    image_auroc, pixel_auroc = _bottle_aurocs(bottle, 0.01)
    assert image_auroc >= 0.98
    assert pixel_auroc >= 0.95


@pytest.mark.slow
def test_bottle_real_data_reference_coreset(bottle):
    """The reference's 10% coreset (about 2.5 minutes on 2 CPU cores)."""
    image_auroc, pixel_auroc = _bottle_aurocs(bottle, 0.1)
    assert image_auroc >= 0.98
    assert pixel_auroc >= 0.95


# ----------------------------------------------------------------------------------------------
# Non-finite features (issue 13, item 1)


@pytest.fixture(scope="module")
def tiny_model():
    """MobileNetV2 on 64-pixel crops (an 8 x 8 grid), unfitted; cheap to compile. Without
    calibration, so that ``fit_features`` takes any rows, not only whole images'."""
    config = PatchCoreConfig(
        backbone="mobilenet_v2",
        resize=64,
        crop=64,
        pretrain_embed_dimension=64,
        target_embed_dimension=32,
        sampler="identity",
        batch_size=4,
        calibration="none",
    )
    return PatchCore(config, mesh=sharding.single_device_mesh())


def test_fit_features_refuses_non_finite_rows_and_counts_them(tiny_model):
    rows = np.random.default_rng(0).normal(size=(100, 32)).astype(np.float32)
    rows[[3, 50]] = np.nan
    rows[70, 5] = np.inf
    rows[71, :2] = -np.inf
    with pytest.raises(ValueError, match=r"patch features: 4 of 100 rows are non-finite"):
        tiny_model.fit_features(rows)
    assert tiny_model.memory_bank is None  # nothing entered a bank
    with pytest.raises(ValueError, match=r"memory bank: 1 of 20 rows are non-finite"):
        PatchCore(tiny_model.config, backbone=tiny_model.backbone, memory_bank=rows[40:60])


def test_predict_scores_nan_for_an_image_with_non_finite_features(tiny_model, monkeypatch):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    test = rng.integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8)
    model = PatchCore(tiny_model.config, backbone=tiny_model.backbone, mesh=tiny_model.mesh)
    model.fit(train)
    prediction = model.predict(test)
    clean_scores, clean_maps = prediction.image_scores, prediction.anomaly_maps
    embed, score = model._embed, model._score

    def poisoned(variables, images, *bank_and_search):  # one NaN in image 2, patch 5
        return score(embed(variables, images).at[2, 5, 0].set(np.nan), *bank_and_search)

    monkeypatch.setattr(model, "_predict", poisoned)  # the fused embed + score program
    prediction = model.predict(test)
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    assert np.isnan(scores[2]) and np.isnan(maps[2]).any()
    assert np.all(np.isfinite(clean_scores)) and clean_scores.min() > 0
    np.testing.assert_array_equal(scores[[0, 1, 3]], clean_scores[[0, 1, 3]])
    np.testing.assert_array_equal(maps[[0, 1, 3]], clean_maps[[0, 1, 3]])


def test_fit_refuses_a_bank_smaller_than_k_or_b(tiny_model):
    rows = np.random.default_rng(2).normal(size=(5, 32)).astype(np.float32)
    for changes, message in [
        ({"num_neighbors": 6}, r"num_neighbors \(k, --k\) = 6 exceeds the memory bank's 5 rows"),
        ({"reweight": True}, r"reweight_neighbors \(b, --reweight-neighbors\) = 9 exceeds"),
    ]:
        config = tiny_model.config.replace(**changes)
        model = PatchCore(config, backbone=tiny_model.backbone, mesh=tiny_model.mesh)
        with pytest.raises(ValueError, match=message):
            model.fit_features(rows)
        assert model.memory_bank is None  # nothing to save
    config = tiny_model.config.replace(num_neighbors=5, reweight=True, reweight_neighbors=5)
    model = PatchCore(config, backbone=tiny_model.backbone, mesh=tiny_model.mesh)
    assert model.fit_features(rows).memory_bank.shape == (5, 32)


@pytest.mark.parametrize(
    "images, described",
    [
        (np.full((1, 224, 224, 3), 0.5, np.float32), "dtype float32, values 0.5..0.5"),
        (np.full((1, 224, 224, 3), np.nan, np.float32), "dtype float32, 150528 non-finite"),
        (np.full((1, 224, 224, 3), 1000, np.uint16), "dtype uint16, values 1000..1000"),
        (np.full((1, 224, 224, 3), -3, np.int64), "dtype int64, values -3..-3"),
        (np.ones((1, 224, 224, 3), bool), "dtype bool"),
    ],
)
def test_images_other_than_uint8_pixels_are_refused_naming_dtype_and_range(images, described):
    model = PatchCore(PatchCoreConfig(backbone="mobilenet_v2"), mesh=sharding.single_device_mesh())
    with pytest.raises(ValueError, match="images must be uint8") as error:
        model.fit(images)
    assert described in str(error.value)
    with pytest.raises(ValueError, match="images must be uint8"):
        list(model.embed(images))


def test_images_smaller_than_the_deepest_grid_get_a_warning():
    with pytest.warns(UserWarning, match=r"image size 32x32 gives a 2x2 grid at stride16"):
        PatchCore(PatchCoreConfig(backbone="mobilenet_v2", resize=32, crop=32))


def test_extend_continues_the_greedy_selection_from_the_fitted_bank(tiny_model):
    """The old bank stays first; the new rows are the selection continued from it (checked
    against a float64 numpy greedy whose rows start at their nearest bank row's distance)."""
    from test_coreset import _numpy_continued_greedy

    rng = np.random.default_rng(3)
    first = rng.normal(size=(200, 32)).astype(np.float32)
    second = rng.normal(loc=0.5, size=(300, 32)).astype(np.float32)
    config = tiny_model.config.replace(
        sampler="approx_greedy_coreset", coreset_fraction=0.1, projection_dim=32
    )
    model = PatchCore(config, backbone=tiny_model.backbone, mesh=tiny_model.mesh)
    old_bank = np.asarray(model.fit_features(first).memory_bank)
    assert old_bank.shape == (20, 32)
    steps = []
    model.extend_features(second, progress=steps.append)
    bank = np.asarray(model.memory_bank)
    assert bank.shape == (50, 32) and sum(steps) == 30
    np.testing.assert_array_equal(bank[:20], old_bank)
    expected = _numpy_continued_greedy(second, old_bank, 30)
    np.testing.assert_array_equal(bank[20:], second[expected])
    with pytest.raises(RuntimeError, match="before fit"):
        PatchCore(config, backbone=tiny_model.backbone, mesh=tiny_model.mesh).extend_features(
            second
        )


def test_a_layer3_layer4_model_takes_layer3s_grid():
    """Any stage pair fits (the paper's mSTC layer3 + layer4): the patch grid is the finest
    listed stage's (64 px: layer3 4 x 4, layer4 2 x 2), the bank has one row per patch."""
    from patchcore_jax.backbones import init_backbone

    config = PatchCoreConfig(
        backbone="resnet18",
        layers=("layer4", "layer3"),
        resize=64,
        crop=64,
        pretrain_embed_dimension=32,
        target_embed_dimension=16,
        sampler="identity",
        calibration="none",
        batch_norm_probe=False,  # init_backbone's statistics; the probe is test_resnet's
    )
    backbone = init_backbone("resnet18", config.layers)
    with pytest.warns(UserWarning, match="2x2 grid at layer4"):
        model = PatchCore(config, backbone=backbone, mesh=sharding.single_device_mesh())
    assert model.backbone.layers == ("layer3", "layer4") and model.grid_shape == (4, 4)
    images = np.random.default_rng(0).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    model.fit(images)
    assert model.memory_bank.shape == (2 * 16, 16)
