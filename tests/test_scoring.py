"""Scoring (scoring.py): reference fixture, dense k-NN, scipy maps, Eq. 7, sharded == single."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as torch_f
from conftest import load_fixture
from float_rounding import nearest_index_differences
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcore_jax import knn, scoring, sharding


def _relative_error(ours, expected) -> float:
    return float(np.abs(np.asarray(ours) - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def score_fixture() -> dict[str, np.ndarray]:
    return load_fixture("reference_parity", "score")


def test_reference_fixture(score_fixture):
    data = score_fixture
    result = scoring.score_patch_features(
        data["queries"].reshape(3, 784, 1024), data["memory_bank"], (28, 28), (224, 224)
    )
    assert _relative_error(result.patch_scores.ravel(), data["patch_scores"]) < 1e-4
    assert _relative_error(result.image_scores, data["image_scores"]) < 1e-4
    assert _relative_error(result.anomaly_maps, data["maps"]) < 1e-4
    # The reference's nearest rows, except where two rows are a float32 near-tie.
    ties, violations = nearest_index_differences(
        data["queries"],
        data["memory_bank"],
        np.asarray(result.nearest_indices).ravel(),
        data["nearest_index"],
    )
    print(f"{ties} nearest-row near-ties")
    assert violations == 0
    assert result.nearest_indices.dtype == np.int32


@pytest.mark.parametrize(
    "grid,out_shape,sigma",
    [((28, 28), (224, 224), 4.0), ((7, 9), (30, 41), 1.5), ((5, 3), (12, 8), 0.0)],
)
def test_anomaly_maps_equal_torch_interpolate_then_scipy_gaussian(grid, out_shape, sigma):
    scores = np.random.default_rng(2).gamma(2.0, 10.0, size=(2, *grid)).astype(np.float32)
    upsampled = torch_f.interpolate(
        torch.from_numpy(scores)[:, None], size=out_shape, mode="bilinear", align_corners=False
    )[:, 0].numpy()
    expected = np.stack([scipy.ndimage.gaussian_filter(image, sigma=sigma) for image in upsampled])
    ours = scoring.anomaly_maps(scores, out_shape, sigma)
    assert ours.shape == (2, *out_shape)
    assert _relative_error(ours, expected) < 1e-5


@pytest.mark.parametrize("size,sigma", [(5, 4.0), (40, 4.0), (9, 0.7), (1, 2.0)])
def test_gaussian_blur_matrix_equals_scipy_including_kernels_wider_than_input(size, sigma):
    values = np.random.default_rng(3).normal(size=size)
    expected = scipy.ndimage.gaussian_filter1d(values, sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(
        scoring.gaussian_blur_matrix(size, sigma) @ values, expected, atol=1e-12
    )


def _eq7_numpy(patch_features, bank, patch_scores, nearest, b):
    """Eq. 7 written out plainly in float64 (as anomalib: softmax over N_b(m*) incl. m*)."""
    out = []
    for image in range(len(patch_features)):
        top = int(np.argmax(patch_scores[image]))
        test, star = patch_features[image, top], int(nearest[image, top])
        neighbourhood = np.argsort(((bank - bank[star]) ** 2).sum(1), kind="stable")[:b]
        distances = np.sqrt(((bank[neighbourhood] - test) ** 2).sum(1))
        star_distance = np.sqrt(((bank[star] - test) ** 2).sum())
        weight = 1 - np.exp(star_distance) / np.exp(distances).sum()
        out.append(weight * patch_scores[image, top])
    return np.array(out)


def test_reweighting_equals_plain_numpy_eq7():
    rng = np.random.default_rng(4)
    bank = rng.normal(size=(300, 12)).astype(np.float32)
    patch_features = rng.normal(size=(3, 20, 12)).astype(np.float32) * 1.3
    result = scoring.score_patch_features(
        patch_features,
        bank,
        (4, 5),
        (8, 10),
        reweight=True,
        reweight_neighbors=5,
        bank_block_size=64,
    )
    plain = scoring.score_patch_features(patch_features, bank, (4, 5), (8, 10), bank_block_size=64)
    expected = _eq7_numpy(
        patch_features.astype(np.float64),
        bank.astype(np.float64),
        np.asarray(result.patch_scores, np.float64),
        np.asarray(result.nearest_indices)[..., 0],
        5,
    )
    np.testing.assert_allclose(np.asarray(result.image_scores), expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(result.patch_scores), np.asarray(plain.patch_scores))
    assert np.all(np.asarray(result.image_scores) < np.asarray(plain.image_scores))


@settings(max_examples=12, deadline=None)
@given(
    scale=st.floats(min_value=1.0, max_value=5000.0),
    neighbours=st.integers(min_value=2, max_value=12),
    seed=st.integers(min_value=0, max_value=2**16),
    distance=st.sampled_from(["squared_l2", "l2"]),
)
def test_reweighting_is_finite_and_within_zero_and_max_score(scale, neighbours, seed, distance):
    rng = np.random.default_rng(seed)
    bank = (rng.normal(size=(50, 8)) * scale).astype(np.float32)
    bank[7] = bank[3]  # exact duplicates: m* may not be its own first neighbour
    patch_features = (rng.normal(size=(2, 6, 8)) * 2 * scale).astype(np.float32)
    result = scoring.score_patch_features(
        patch_features,
        bank,
        (2, 3),
        (4, 6),
        distance=distance,
        reweight=True,
        reweight_neighbors=neighbours,
    )
    top_scores = np.asarray(result.patch_scores).max(axis=1)
    image_scores = np.asarray(result.image_scores)
    assert np.all(np.isfinite(image_scores))
    assert np.all(image_scores >= 0) and np.all(image_scores <= top_scores)


def test_reweight_neighbors_outside_two_to_bank_size_is_refused():
    bank = np.random.default_rng(7).normal(size=(10, 4)).astype(np.float32)
    features = np.zeros((1, 6, 4), np.float32)
    for b in (1, 11):
        with pytest.raises(
            ValueError, match=rf"reweight_neighbors={b} .*\[2, memory bank size 10\]"
        ):
            scoring.score_patch_features(
                features, bank, (2, 3), (4, 4), reweight=True, reweight_neighbors=b
            )
    result = scoring.score_patch_features(
        features, bank, (2, 3), (4, 4), reweight=True, reweight_neighbors=10
    )
    assert np.all(np.asarray(result.image_scores) < np.asarray(result.patch_scores).max(axis=1))


@pytest.fixture(scope="module")
def bottle_features():
    """MobileNetV2 patch features of real bottle images: (bank [235, 256], test [4, 784, 256])."""
    from conftest import BOTTLE

    from patchcore_jax import PatchCore, PatchCoreConfig
    from patchcore_jax.datasets.folders import load_dataset
    from patchcore_jax.preprocess import load_images

    dataset = load_dataset(BOTTLE)
    config = PatchCoreConfig(
        backbone="mobilenet_v2",
        pretrain_embed_dimension=256,
        target_embed_dimension=256,
        sampler="random",
        coreset_fraction=0.1,
    )
    model = PatchCore(config, mesh=sharding.single_device_mesh())
    # Images that the demo category shares with the full one (it keeps every 3rd): the same
    # features whichever is beside the repository.
    model.fit(load_images([BOTTLE / "train/good" / f"{i:03d}.png" for i in (0, 3, 6)]))
    good = [s.image_path for s in dataset.test_samples if s.label == 0][:2]
    bad = [s.image_path for s in dataset.test_samples if s.label == 1][::30][:2]
    test = np.asarray(model.patch_features(load_images(good + bad))).reshape(4, 784, 256)
    return np.asarray(model.memory_bank), test


@pytest.mark.parametrize("b", [2, 3, 9])
def test_reweighting_on_real_bottle_features_changes_scores_and_equals_float64_eq7(
    bottle_features, b
):
    bank, test = bottle_features
    weights = {}
    for distance in ("squared_l2", "l2"):
        options = dict(distance=distance, num_neighbors=1, sigma=4.0)
        plain = scoring.score_patch_features(test, bank, (28, 28), (224, 224), **options)
        result = scoring.score_patch_features(
            test, bank, (28, 28), (224, 224), reweight=True, reweight_neighbors=b, **options
        )
        expected = _eq7_numpy(
            test.astype(np.float64),
            bank.astype(np.float64),
            np.asarray(result.patch_scores, np.float64),
            np.asarray(result.nearest_indices)[..., 0],
            b,
        )
        np.testing.assert_allclose(np.asarray(result.image_scores), expected, rtol=2e-6)
        weights[distance] = np.asarray(result.image_scores) / np.asarray(plain.image_scores)
        assert np.all(weights[distance] < 1.0)  # the option changes every image score
    # The weights use Euclidean distances whatever the patch-score distance is.
    np.testing.assert_allclose(weights["squared_l2"], weights["l2"], rtol=1e-6)
    if b == 2:  # the smallest neighbourhood: weights visibly below 1 (0.994 here)
        assert weights["l2"].min() < 0.999


@pytest.mark.parametrize("bank_shards", [1, 2, 8])
def test_sharded_equals_single_device(bank_shards, score_fixture):
    rng = np.random.default_rng(5)
    bank = score_fixture["memory_bank"][:1003]  # not a multiple of 8
    patch_features = score_fixture["queries"][: 6 * 49 + 0].reshape(6, 49, 1024)
    patch_features = patch_features + rng.normal(size=patch_features.shape).astype(np.float32)
    options = dict(num_neighbors=3, reweight=True, bank_block_size=100, query_block_size=40)
    single = scoring.score_patch_features(patch_features, bank, (7, 7), (20, 20), **options)
    mesh = sharding.make_mesh(bank_shards=bank_shards)
    sharded = scoring.score_patch_features(
        patch_features, bank, (7, 7), (20, 20), mesh=mesh, **options
    )
    np.testing.assert_array_equal(
        np.asarray(sharded.nearest_indices), np.asarray(single.nearest_indices)
    )
    for name in ("image_scores", "anomaly_maps", "patch_scores"):
        assert _relative_error(getattr(sharded, name), np.asarray(getattr(single, name))) < 1e-5


@pytest.mark.parametrize("distance", ["squared_l2", "l2"])
def test_masked_knn_ignores_the_query_images_own_rows_on_a_sharded_mesh(distance):
    rng = np.random.default_rng(0)
    per_image = rng.normal(size=(5, 12, 16)).astype(np.float32)  # 5 images, 3x4 grid
    bank = rng.normal(size=(37, 16)).astype(np.float32)
    sources = rng.integers(0, 5, size=37).astype(np.int32)
    image_ids = np.array([0, 1, 2, 4, -2], np.int32)  # the last one matches no source
    result = scoring.score_patch_features(
        per_image,
        bank,
        (3, 4),
        (6, 8),
        image_ids=image_ids,
        bank_source_images=sources,
        num_neighbors=3,
        distance=distance,
        reweight=False,
        reweight_neighbors=9,
        sigma=1.0,
        bank_block_size=8,
        query_block_size=8,
        mesh=sharding.make_mesh(2),  # 4 x 2 devices
    )
    squared = ((per_image[:, :, None, :] - bank[None, None]) ** 2).sum(-1).astype(np.float64)
    squared = np.where(sources[None, None, :] == image_ids[:, None, None], np.inf, squared)
    distances = np.sort(squared, axis=-1)[..., :3]
    if distance == "l2":
        distances = np.sqrt(distances)
    np.testing.assert_allclose(result.patch_scores, distances.mean(-1), rtol=2e-5)
    np.testing.assert_allclose(result.image_scores, distances.mean(-1).max(1), rtol=2e-5)
    assert not (sources[np.asarray(result.nearest_indices)] == image_ids[:, None, None]).any()


@pytest.mark.parametrize("mode", ["plain", "certified", "fast"])
@pytest.mark.parametrize("bank_shards", [1, 2])
def test_padded_images_score_nan_and_the_others_as_without_padding(mode, bank_shards, monkeypatch):
    # A batch's padded images (valid_images False): NaN scores and maps, no neighbour, no
    # fallback; a query tile of padding only is skipped. Every other image's result is the
    # unpadded call's, bit for bit, whatever the k-NN (the certified one on a small bank too).
    monkeypatch.setattr(knn, "CERTIFIED_MIN_ROWS", 0)
    rng = np.random.default_rng(40 + bank_shards)
    scales = np.geomspace(1.0, 1e-2, 160)
    bank = (rng.standard_normal((900, 160)) * scales).astype(np.float32)
    near = bank[rng.integers(0, 900, (7, 30))]
    features = (near + 0.05 * rng.standard_normal((7, 30, 160)) * scales).astype(np.float32)
    valid = np.array([1, 1, 0, 1, 0, 0, 0], bool)  # on 4 data shards: the last is all padding
    options = dict(
        num_neighbors=2,
        sigma=1.0,
        bank_block_size=128,
        query_block_size=32,
        mesh=sharding.make_mesh(bank_shards=bank_shards),
        image_ids=np.arange(7, dtype=np.int32),
        bank_source_images=rng.integers(0, 7, 900).astype(np.int32),
        precision="fast" if mode == "fast" else "exact",
        candidate_search="bfloat16" if mode == "plain" else "low-rank",
    )
    full = scoring.score_patch_features(features, bank, (5, 6), (10, 12), **options)
    padded = scoring.score_patch_features(
        features, bank, (5, 6), (10, 12), valid_images=valid, **options
    )
    for name in ("image_scores", "anomaly_maps", "patch_scores", "nearest_indices", "fallbacks"):
        ours, expected = np.asarray(getattr(padded, name)), np.asarray(getattr(full, name))
        np.testing.assert_array_equal(ours[valid], expected[valid])
        if name == "nearest_indices":
            assert np.all(ours[~valid] == np.iinfo(np.int32).max)
        elif name == "fallbacks":
            assert np.all(ours[~valid] == (0 if mode == "certified" else -1))
        else:
            assert np.all(np.isnan(ours[~valid]))
    if mode == "certified":  # the certificate ran, and proved most queries
        assert 0 <= np.asarray(full.fallbacks).sum() < 0.2 * features.shape[0] * 30
    with pytest.raises(ValueError, match="valid_images"):
        scoring.score_patch_features(features, bank, (5, 6), (10, 12), valid_images=valid[:3])


def test_compiled_once_per_shape():
    rng = np.random.default_rng(6)
    bank = rng.normal(size=(40, 4)).astype(np.float32)
    before = scoring._score_patch_features._cache_size()
    for _ in range(3):
        patch_features = rng.normal(size=(2, 6, 4)).astype(np.float32)
        scoring.score_patch_features(patch_features, bank, (2, 3), (5, 5), sigma=1.0)
    assert scoring._score_patch_features._cache_size() == before + 1


def test_bad_input_raises():
    bank = np.zeros((10, 4), np.float32)
    features = np.zeros((1, 6, 4), np.float32)
    with pytest.raises(ValueError, match="grid_shape"):
        scoring.score_patch_features(features, bank, (2, 2), (4, 4))
    with pytest.raises(ValueError, match="memory_bank"):
        scoring.score_patch_features(features, np.zeros((10, 5), np.float32), (2, 3), (4, 4))
    with pytest.raises(ValueError, match="distance"):
        scoring.score_patch_features(features, bank, (2, 3), (4, 4), distance="cosine")
    with pytest.raises(ValueError, match="num_neighbors"):
        scoring.score_patch_features(features, bank, (2, 3), (4, 4), num_neighbors=11)


# ----------------------------------------------------------------------------------------------
# Non-finite values (issue 13, item 1)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("bank_shards", [1, 4])
def test_non_finite_patch_features_score_nan_and_leave_other_scores_unchanged(
    k, bad_value, bank_shards
):
    rng = np.random.default_rng(11)
    bank = rng.normal(size=(37, 16)).astype(np.float32)
    features = rng.normal(size=(3, 6, 16)).astype(np.float32)
    clean = scoring.score_patch_features(
        features, bank, (2, 3), (4, 6), num_neighbors=k, sigma=1.0, bank_block_size=16
    )
    poisoned = features.copy()
    poisoned[1, 4, 7] = bad_value
    mesh = sharding.make_mesh(bank_shards=bank_shards)
    result = scoring.score_patch_features(
        poisoned, bank, (2, 3), (4, 6), num_neighbors=k, sigma=1.0, bank_block_size=16, mesh=mesh
    )
    image_scores = np.asarray(result.image_scores)
    patch_scores = np.asarray(result.patch_scores)
    assert np.isnan(image_scores[1])  # never 0 ("perfectly normal"), never a finite number
    assert np.isnan(patch_scores[1, 4]) and np.all(np.isnan(np.asarray(result.anomaly_maps)[1]))
    assert np.all(np.asarray(result.nearest_indices)[1, 4] == np.iinfo(np.int32).max)
    # Every other patch and image is exactly what it is without the bad value.
    others = np.ones(patch_scores.shape, bool)
    others[1, 4] = False
    np.testing.assert_array_equal(patch_scores[others], np.asarray(clean.patch_scores)[others])
    np.testing.assert_array_equal(image_scores[[0, 2]], np.asarray(clean.image_scores)[[0, 2]])
