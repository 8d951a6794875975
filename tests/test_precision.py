"""The ``fast`` precision: k-NN candidates (bfloat16 or low-rank) re-ranked in float32, and a
bfloat16 backbone on GPUs/TPUs (float32 on CPU).

``exact`` (the default) is covered bit for bit by the other tests; here ``fast`` is checked
against it: the re-ranked k-NN returns exact mode's neighbours and float32 distances whenever
the true neighbour is a candidate (nearly always), and on real bottle images the scores agree
within measured bounds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BOTTLE
from float_rounding import low_rank_distance_bound, squared_distance_error
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from patchcore_jax import PatchCore, PatchCoreConfig, calibration, scoring, sharding
from patchcore_jax.backbones import init_backbone, load_backbone
from patchcore_jax.datasets.folders import load_dataset
from patchcore_jax.model import backbone_variables, backend_numerics, embed_images
from patchcore_jax.preprocess import load_images


def _check_reranked(queries, bank, k, min_recall, candidate_search="bfloat16"):
    """fast vs exact k-NN: identical wherever the exact neighbours are candidates; returns the
    fraction of such queries (asserted >= ``min_recall``)."""
    options = {"bank_block_size": 512, "query_block_size": 256}
    search = scoring.search_arrays("fast", candidate_search, bank)
    exact_d, exact_i = map(np.asarray, scoring.nearest_neighbors(queries, bank, k, **options))
    fast_d, fast_i = map(
        np.asarray,
        scoring.nearest_neighbors(
            queries,
            bank,
            k,
            precision="fast",
            candidate_search=candidate_search,
            search=search,
            **options,
        ),
    )
    count = scoring.default_num_candidates(k)
    _, candidates = scoring.fast_candidates(queries, bank, count, search=search, k=k, **options)
    candidates = np.asarray(candidates)
    finite = np.all(np.isfinite(np.asarray(queries)), axis=1)
    found = finite & np.all(np.any(exact_i[:, :, None] == candidates[:, None, :], axis=2), axis=1)
    np.testing.assert_array_equal(fast_i[found], exact_i[found])
    # Both are float32 computations of the same squared distances (the re-rank may sum in
    # another order): each is within the derived rounding bound of the exact value.
    bound = squared_distance_error(queries[found][:, None, :], bank[exact_i[found]])
    difference = np.abs(fast_d[found] - exact_d[found])
    print(f"largest distance difference: {np.max(difference / (2 * bound)):.2e} of the bound")
    assert np.all(difference <= 2 * bound)
    # Elsewhere a near neighbour, at its exact distance: never closer than the true one.
    missed = finite & ~found
    slack = squared_distance_error(queries[missed], bank[exact_i[missed, 0]])
    slack += squared_distance_error(queries[missed], bank[fast_i[missed, 0]])
    assert np.all(fast_d[missed][:, 0] >= exact_d[missed][:, 0] - slack)
    recall = found[finite].mean()
    print(
        f"k={k}, {candidate_search}: exact neighbours among the {count} candidates for "
        f"{recall:.5f} of queries"
    )
    assert recall >= min_recall
    return fast_d, fast_i


@pytest.mark.parametrize("candidate_search", ["bfloat16", "low-rank"])
@pytest.mark.parametrize("k", [1, 3])
def test_reranked_knn_on_random_data_is_exact_where_the_neighbour_is_a_candidate(
    k, candidate_search
):
    rng = np.random.default_rng(k)
    # 256 dimensions with decaying scales: the low-rank search keeps the top 128 directions.
    scales = np.geomspace(1.0, 1e-2, 256)
    bank = (rng.standard_normal((1500, 256)) * scales).astype(np.float32)
    queries = (rng.standard_normal((700, 256)) * scales).astype(np.float32)
    queries[:50] = bank[:50] + 1e-3 * queries[:50]  # some near duplicates of bank rows
    queries[70, 5] = np.nan
    fast_d, fast_i = _check_reranked(queries, bank, k, 0.99, candidate_search)
    assert np.all(np.isnan(fast_d[70]))  # exact mode's NaN semantics
    assert np.all(fast_i[:50, 0] == np.arange(50))
    # Bank-sharded over 2 devices (and data-parallel over the rest): the same answer.
    sharded = scoring.nearest_neighbors(
        queries,
        bank,
        k,
        precision="fast",
        candidate_search=candidate_search,
        bank_block_size=512,
        query_block_size=256,
        mesh=sharding.make_mesh(2),
    )
    # Each of the 2 bank shards keeps its own C candidates: a superset of one device's.
    same = np.all(np.asarray(sharded[1]) == fast_i, axis=1)
    assert same.mean() >= 0.99
    np.testing.assert_allclose(np.asarray(sharded[0])[same], fast_d[same], rtol=1e-6)
    assert np.all(np.asarray(sharded[0])[~same][:, 0] <= fast_d[~same][:, 0] * (1 + 1e-6))


def test_low_rank_basis_is_orthonormal_deterministic_and_distances_are_lower_bounds():
    rng = np.random.default_rng(0)
    bank = (rng.standard_normal((900, 200)) * np.geomspace(1.0, 1e-2, 200)).astype(np.float32)
    basis = scoring.low_rank_basis(bank, 64)
    assert basis.shape == (200, 64) and basis.dtype == np.float32
    np.testing.assert_allclose(basis.T @ basis, np.eye(64), atol=1e-5)
    np.testing.assert_array_equal(scoring.low_rank_basis(bank.copy(), 64), basis)
    assert scoring.low_rank_basis(bank, 500).shape == (200, 200)  # r <= D
    _check_lower_bound(bank[::3] + 0.01, bank)
    with pytest.raises(ValueError, match="candidate_search must be one of"):
        scoring.nearest_neighbors(bank, bank, precision="fast", candidate_search="pca")


def _check_lower_bound(queries, bank):
    """Low-rank candidate distances never exceed the exact ones (up to float32 rounding)."""
    search = scoring.low_rank_search(bank)
    approx, candidates = map(np.asarray, scoring.fast_candidates(queries, bank, 16, search=search))
    bound = low_rank_distance_bound(queries[:, None, :], bank[candidates], np.asarray(search[0]))
    print(f"low-rank distances reach at most {np.max(approx / bound):.6f} of their upper bound")
    assert np.all(approx <= bound)


def test_ties_go_to_the_lowest_index_and_num_candidates_is_validated():
    bank = np.repeat(np.eye(8, 16, dtype=np.float32), 3, axis=0)  # each row three times
    distances, indices = scoring.nearest_neighbors(bank[::3], bank, 2, precision="fast")
    np.testing.assert_array_equal(np.asarray(indices), np.arange(0, 24, 3)[:, None] + [0, 1])
    np.testing.assert_array_equal(np.asarray(distances), 0.0)
    with pytest.raises(ValueError, match="num_candidates must be an integer >= k = 2"):
        scoring.nearest_neighbors(bank, bank, 2, precision="fast", num_candidates=1)
    with pytest.raises(ValueError, match="precision must be one of"):
        scoring.nearest_neighbors(bank, bank, 2, precision="half")


@pytest.fixture(scope="module")
def bottle_images():
    """40 train images and 24 test images (12 good, 12 defective), evenly spaced."""
    dataset = load_dataset(BOTTLE)
    good = [s for s in dataset.test_samples if s.label == 0]
    bad = [s for s in dataset.test_samples if s.label == 1]
    samples = good[:: max(1, len(good) // 12)][:12] + bad[:: max(1, len(bad) // 12)][:12]
    train = dataset.train_paths[:: max(1, len(dataset.train_paths) // 40)][:40]
    return (
        load_images(train),
        load_images([s.image_path for s in samples]),
        np.array([s.label for s in samples]),
    )


@pytest.fixture(scope="module")
def bottle_models(bottle_images):
    """The same 10%-coreset MobileNetV2 model fitted in exact and in fast precision."""
    train, test, _ = bottle_images
    backbone = load_backbone("mobilenet_v2")
    mesh = sharding.single_device_mesh()
    models, results = {}, {}
    for precision in ("exact", "fast"):
        config = PatchCoreConfig(
            backbone="mobilenet_v2", calibration="none", precision=precision, batch_size=8
        )
        models[precision] = PatchCore(config, backbone=backbone, mesh=mesh).fit(train)
        results[precision] = models[precision].predict(test)
    return models, results


@pytest.mark.parametrize("candidate_search", ["bfloat16", "low-rank"])
def test_reranked_knn_on_real_bottle_features(bottle_models, bottle_images, candidate_search):
    models, _ = bottle_models
    model = models["exact"]
    queries = np.concatenate([np.asarray(f)[:n] for f, n in model.embed(bottle_images[1][::3])])
    queries = queries.reshape(-1, queries.shape[-1])
    bank = np.asarray(model.memory_bank)
    # measured: bfloat16 1.0, low-rank (r = 128, C = 16) 0.9995 (6272 test patches)
    _check_reranked(queries, bank, 1, 0.995, candidate_search)
    if candidate_search == "low-rank":
        _check_lower_bound(queries[::7], bank)


def test_fast_scores_agree_with_exact_on_bottle(bottle_models, bottle_images):
    _, results = bottle_models
    labels = bottle_images[2]
    (exact_scores, exact_maps), (fast_scores, fast_maps) = results["exact"], results["fast"]
    image_rho = spearmanr(exact_scores, fast_scores).statistic
    pixels = np.random.default_rng(0).choice(exact_maps.size, 100_000, replace=False)
    pixel_rho = spearmanr(exact_maps.ravel()[pixels], fast_maps.ravel()[pixels]).statistic
    aurocs = [roc_auc_score(labels, s) for s in (exact_scores, fast_scores)]
    print(f"image Spearman {image_rho:.5f}, pixel Spearman {pixel_rho:.5f}, AUROCs {aurocs}")
    # On CPU fast keeps the float32 backbone (the bfloat16 one measured 0.979 / 0.942 here):
    # measured 1.00000 / 1.00000 with the low-rank candidates (40 train, 24 test images).
    assert image_rho >= 0.999
    assert pixel_rho >= 0.999
    assert abs(aurocs[1] - aurocs[0]) <= 0.005


@pytest.mark.parametrize("candidate_search", ["bfloat16", "low-rank"])
def test_fast_self_excluded_calibration_matches_exact_on_random_features(candidate_search):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((6, 16, 64)).astype(np.float32)
    rows = rng.choice(96, 40, replace=False)
    bank = features.reshape(96, 64)[rows]
    options = dict(
        grid_shape=(4, 4),
        out_shape=(8, 8),
        num_neighbors=2,
        distance="squared_l2",
        reweight=True,
        reweight_neighbors=3,
        sigma=1.0,
        bank_block_size=16,
        query_block_size=32,
        mesh=sharding.single_device_mesh(),
    )
    ids = np.arange(6, dtype=np.int32)
    sources = (rows // 16).astype(np.int32)
    exact = calibration.self_excluded_scores(features, ids, bank, sources, **options)
    search = scoring.search_arrays("fast", candidate_search, bank)
    fast = calibration.self_excluded_scores(
        features,
        ids,
        bank,
        sources,
        search,
        precision="fast",
        candidate_search=candidate_search,
        **options,
    )
    np.testing.assert_array_equal(np.asarray(fast.nearest_indices), exact.nearest_indices)
    assert not np.any(sources[np.asarray(fast.nearest_indices)] == ids[:, None, None])
    np.testing.assert_allclose(fast.image_scores, exact.image_scores, rtol=1e-5)
    np.testing.assert_allclose(fast.anomaly_maps, exact.anomaly_maps, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_fast_backbone_computes_in_bfloat16_and_returns_float32(name):
    backbone = load_backbone(name) if name == "mobilenet_v2" else init_backbone(name)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8)
    for precision in ("exact", "fast"):
        variables = backbone_variables(backbone.variables, precision)

        def embed(v, x, precision=precision):
            return embed_images(
                backbone.module,
                v,
                x,
                pretrain_embed_dimension=32,
                target_embed_dimension=32,
                patch_size=3,
                precision=precision,
            )

        jaxpr = jax.make_jaxpr(embed)(variables, images)
        convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
        assert convs
        dtype = jnp.bfloat16 if precision == "fast" else jnp.float32
        for conv in convs:
            assert all(v.aval.dtype == dtype for v in (*conv.invars, *conv.outvars))
        assert jaxpr.out_avals[0].dtype == jnp.float32


def test_backend_choice_of_the_fast_precision():
    assert backend_numerics("exact", "cpu") == ("float32", None)
    assert backend_numerics("exact", "gpu") == ("float32", None)
    assert backend_numerics("fast", "cpu") == ("float32", "low-rank")
    assert backend_numerics("fast", "gpu") == ("bfloat16", "bfloat16")
    assert backend_numerics("fast", "tpu") == ("bfloat16", "bfloat16")
    with pytest.raises(ValueError, match="precision must be"):
        backend_numerics("half", "cpu")


def test_fast_model_calibrates_and_exports_in_its_precision(bottle_images):
    """On CPU a fast model keeps the float32 backbone and uses the low-rank candidates; its
    self-excluded calibration and its exported inference follow the same choice."""
    from patchcore_jax import export

    train, test, _ = bottle_images
    config = PatchCoreConfig(backbone="mobilenet_v2", coreset_fraction=0.05, precision="fast")
    logged = []
    model = PatchCore(config, mesh=sharding.single_device_mesh()).fit(train[:6], log=logged.append)
    assert (model.platform, model.backbone_dtype, model.candidate_search) == (
        "cpu",
        "float32",
        "low-rank",
    )
    assert logged[0] == model.describe() and "float32 backbone, low-rank" in logged[0]
    basis, projected = model.search_arrays()
    assert basis.shape == (config.target_embed_dimension, scoring.LOW_RANK_DIMS)
    assert projected.shape == (model.memory_bank.shape[0], scoring.LOW_RANK_DIMS)
    assert model.calibration is not None and model.calibration.method == "self-excluded"
    exact = PatchCore(
        PatchCoreConfig(backbone="mobilenet_v2", coreset_fraction=0.05),
        backbone=model.backbone,
        mesh=sharding.single_device_mesh(),
    ).fit(train[:6])
    # Same float32 features, same bank; the calibration k-NN agrees to float32 rounding.
    np.testing.assert_array_equal(np.asarray(model.memory_bank), np.asarray(exact.memory_bank))
    np.testing.assert_allclose(
        model.calibration.image_threshold, exact.calibration.image_threshold, rtol=1e-5
    )
    infer = export.export_function(model)
    text = str(jax.make_jaxpr(infer)(test[:2]))  # the backbone sits inside lax.map's scan
    convs = [line.split("=")[0] for line in text.splitlines() if "conv_general_dilated[" in line]
    assert convs and all("f32[" in out for out in convs)
    scores, _, _, maps = jax.jit(infer)(test[:2])
    expected_scores, expected_maps = model.predict(test[:2])
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4)
    np.testing.assert_allclose(maps, expected_maps, rtol=1e-4, atol=1e-4 * expected_maps.max())
