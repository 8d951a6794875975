"""The k-NN (knn.py): blocked and sharded against dense numpy, ties, padding, non-finite
values, the same-image exclusion, and the ``fast`` candidates + exact re-rank."""

from __future__ import annotations

import numpy as np
import pytest
from float_rounding import low_rank_distance_bound, squared_distance_error

from patchcore_jax import candidates, knn, reranking, sharding

NO_INDEX = np.iinfo(np.int32).max


def _dense_knn(queries: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain float64 k-NN with lowest-index tie-breaking (stable sort)."""
    queries, bank = queries.astype(np.float64), bank.astype(np.float64)
    distances = ((queries[:, None, :] - bank[None, :, :]) ** 2).sum(-1)
    indices = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, indices, axis=1), indices


@pytest.mark.parametrize("k,squared", [(1, True), (4, True), (3, False)])
def test_blocked_knn_equals_dense_numpy(k, squared):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(1001, 16)).astype(np.float32)
    queries = rng.normal(size=(130, 16)).astype(np.float32)
    distances, indices = knn.nearest_neighbors(
        queries, bank, k, squared=squared, bank_block_size=96, query_block_size=50
    )
    expected_distances, expected_indices = _dense_knn(queries, bank, k)
    if not squared:
        expected_distances = np.sqrt(expected_distances)
    np.testing.assert_array_equal(np.asarray(indices), expected_indices)
    np.testing.assert_allclose(np.asarray(distances), expected_distances, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bank_shards", [1, 2, 8])
def test_ties_go_to_lowest_index_and_padding_is_never_matched(bank_shards):
    rng = np.random.default_rng(1)
    # Integer entries make every distance exact, so the three copies of each row tie exactly.
    rows = rng.integers(-3, 4, size=(67, 8)).astype(np.float32) + 10.0
    bank = np.concatenate([rows, rows, rows])  # 201 rows: not a multiple of tiles or shards
    queries = np.concatenate([rows[:20], np.zeros((5, 8), np.float32)])  # zeros = padding rows
    mesh = sharding.make_mesh(bank_shards=bank_shards)
    distances, indices = knn.nearest_neighbors(
        queries, bank, 3, bank_block_size=16, query_block_size=8, mesh=mesh
    )
    expected_distances, expected_indices = _dense_knn(queries, bank, 3)
    np.testing.assert_array_equal(np.asarray(indices), expected_indices)
    np.testing.assert_array_equal(np.asarray(indices)[:20], np.arange(20)[:, None] + [0, 67, 134])
    np.testing.assert_allclose(np.asarray(distances), expected_distances, rtol=1e-6)


def test_bad_input_raises():
    bank = np.zeros((10, 4), np.float32)
    features = np.zeros((1, 6, 4), np.float32)
    with pytest.raises(ValueError, match="k=11"):
        knn.nearest_neighbors(features[0], bank, 11)
    with pytest.raises(ValueError, match="queries"):
        knn.nearest_neighbors(np.zeros((3, 5), np.float32), bank)


@pytest.mark.parametrize("k", [1, 2])
def test_a_nan_bank_row_is_never_anyones_nearest_neighbor(k):
    rng = np.random.default_rng(12)
    bank = rng.normal(size=(30, 8)).astype(np.float32)
    queries = np.concatenate([bank[:10] + 1e-3, rng.normal(size=(5, 8)).astype(np.float32)])
    poisoned = bank.copy()
    poisoned[3, 2] = np.nan  # queries[3] sits right next to this row
    distances, indices = knn.nearest_neighbors(queries, poisoned, k, bank_block_size=8)
    kept = np.delete(np.arange(30), 3)
    expected_distances, expected_positions = _dense_knn(queries, bank[kept], k)
    np.testing.assert_array_equal(np.asarray(indices), kept[expected_positions])
    np.testing.assert_allclose(np.asarray(distances), expected_distances, rtol=1e-4, atol=1e-5)
    # A bank with fewer finite rows than k leaves the missing neighbour NaN, not inf or 0.
    distances, _ = knn.nearest_neighbors(queries[:2], poisoned[2:5], 3)
    assert np.all(np.isfinite(np.asarray(distances)[:, :2]))
    assert np.all(np.isnan(np.asarray(distances)[:, 2]))


@pytest.mark.parametrize("squared", [True, False])
def test_rounding_below_zero_clamps_to_positive_zero(squared):
    rng = np.random.default_rng(13)
    bank = (rng.normal(size=(64, 32)) * 100).astype(np.float32)
    distances, indices = knn.nearest_neighbors(bank, bank, 1, squared=squared)
    np.testing.assert_array_equal(np.asarray(indices)[:, 0], np.arange(64))
    # |q|^2 + |b|^2 - 2 q.b of a row with itself rounds to a few ulps of |q|^2 either side of
    # zero (which side depends on the CPU's summation order): never below +0, and within the
    # derived rounding bound above it.
    distances = np.asarray(distances)[:, 0]
    bound = squared_distance_error(bank, bank)
    assert np.all(distances <= (bound if squared else np.sqrt(bound)))
    assert not np.any(np.signbit(distances))  # +0, so "-0" is never printed


# ----------------------------------------------------------------------------------------------
# The fast precision: candidates re-ranked in float32


def _check_reranked(queries, bank, k, min_recall, candidate_search="bfloat16"):
    """fast vs exact k-NN: identical wherever the exact neighbours are candidates; returns the
    fraction of such queries (asserted >= ``min_recall``)."""
    options = {"bank_block_size": 512, "query_block_size": 256}
    search = knn.search_arrays("fast", candidate_search, bank)
    exact_d, exact_i = map(np.asarray, knn.nearest_neighbors(queries, bank, k, **options))
    fast_d, fast_i = map(
        np.asarray,
        knn.nearest_neighbors(
            queries,
            bank,
            k,
            precision="fast",
            candidate_search=candidate_search,
            search=search,
            **options,
        ),
    )
    count = knn.candidates_for("fast", k, None, "low-rank")
    _, candidates = knn.fast_candidates(queries, bank, count, search=search, k=k, **options)
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
    sharded = knn.nearest_neighbors(
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
    basis = candidates.low_rank_basis(bank, 64)
    assert basis.shape == (200, 64) and basis.dtype == np.float32
    np.testing.assert_allclose(basis.T @ basis, np.eye(64), atol=1e-5)
    np.testing.assert_array_equal(candidates.low_rank_basis(bank.copy(), 64), basis)
    assert candidates.low_rank_basis(bank, 500).shape == (200, 200)  # r <= D
    _check_lower_bound(bank[::3] + 0.01, bank)
    with pytest.raises(ValueError, match="candidate_search must be one of"):
        knn.nearest_neighbors(bank, bank, precision="fast", candidate_search="pca")


def _check_lower_bound(queries, bank):
    """Low-rank candidate distances never exceed the exact ones (up to float32 rounding)."""
    search = knn.low_rank_search(bank)
    approx, candidates = map(np.asarray, knn.fast_candidates(queries, bank, 16, search=search))
    bound = low_rank_distance_bound(queries[:, None, :], bank[candidates], np.asarray(search[0]))
    print(f"low-rank distances reach at most {np.max(approx / bound):.6f} of their upper bound")
    assert np.all(approx <= bound)


def test_ties_go_to_the_lowest_index_and_num_candidates_is_validated():
    bank = np.repeat(np.eye(8, 16, dtype=np.float32), 3, axis=0)  # each row three times
    distances, indices = knn.nearest_neighbors(bank[::3], bank, 2, precision="fast")
    np.testing.assert_array_equal(np.asarray(indices), np.arange(0, 24, 3)[:, None] + [0, 1])
    np.testing.assert_array_equal(np.asarray(distances), 0.0)
    with pytest.raises(ValueError, match="num_candidates must be an integer >= k = 2"):
        knn.nearest_neighbors(bank, bank, 2, precision="fast", num_candidates=1)
    with pytest.raises(ValueError, match="precision must be one of"):
        knn.nearest_neighbors(bank, bank, 2, precision="half")


# ----------------------------------------------------------------------------------------------
# Same-image exclusion


def _excluded_knn(queries, bank, query_images, bank_images, k):
    """Float64 brute force: k nearest rows of another image (stable: lowest index on ties);
    slots without such a row are NaN with index ``NO_INDEX``."""
    distances = ((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(
        -1
    )
    distances[query_images[:, None] == bank_images[None, :]] = np.inf
    indices = np.argsort(distances, axis=1, kind="stable")[:, :k]
    distances = np.take_along_axis(distances, indices, axis=1)
    indices = np.where(np.isinf(distances), NO_INDEX, indices)
    return np.where(np.isinf(distances), np.nan, distances), indices


@pytest.mark.parametrize(
    "precision,candidate_search",
    [("exact", "bfloat16"), ("fast", "bfloat16"), ("fast", "low-rank")],
)
@pytest.mark.parametrize("bank_shards", [1, 2, 8])
def test_exclusion_equals_numpy_brute_force(precision, candidate_search, bank_shards):
    rng = np.random.default_rng(21)
    bank = rng.normal(size=(43, 16)).astype(np.float32)  # not a multiple of tiles or shards
    bank_images = rng.integers(0, 6, size=43).astype(np.int32)
    queries = rng.normal(size=(61, 16)).astype(np.float32)
    queries[:10] = bank[:10] + 1e-2  # next to rows of their own image or of another
    query_images = rng.integers(0, 6, size=61).astype(np.int32)
    query_images[:5] = bank_images[:5]
    k = 3
    # fast: every row a candidate, so the re-ranked answer must be the exact one
    options = dict(precision=precision, candidate_search=candidate_search, num_candidates=43)
    if precision == "exact":
        options = {}
    distances, indices = knn.nearest_neighbors(
        queries,
        bank,
        k,
        bank_block_size=8,
        query_block_size=16,
        mesh=sharding.make_mesh(bank_shards=bank_shards),
        query_images=query_images,
        bank_images=bank_images,
        **options,
    )
    expected_distances, expected_indices = _excluded_knn(
        queries, bank, query_images, bank_images, k
    )
    np.testing.assert_array_equal(np.asarray(indices), expected_indices)
    np.testing.assert_allclose(np.asarray(distances), expected_distances, rtol=1e-5, atol=1e-5)
    assert not np.any(bank_images[np.minimum(np.asarray(indices), 42)] == query_images[:, None])


def test_exclusion_with_k_1_and_low_rank_candidates_skips_own_rows():
    rng = np.random.default_rng(22)
    bank = rng.normal(size=(200, 32)).astype(np.float32)
    bank_images = np.repeat(np.arange(10, dtype=np.int32), 20)
    queries = bank[::5] + 1e-3  # each query's nearest row is of its own image: excluded
    query_images = bank_images[::5]
    expected_distances, expected_indices = _excluded_knn(
        queries, bank, query_images, bank_images, 1
    )
    for precision, candidate_search in (("exact", "bfloat16"), ("fast", "low-rank")):
        distances, indices = knn.nearest_neighbors(
            queries,
            bank,
            precision=precision,
            candidate_search=candidate_search,
            bank_block_size=64,
            query_images=query_images,
            bank_images=bank_images,
        )
        np.testing.assert_array_equal(np.asarray(indices), expected_indices)
        np.testing.assert_allclose(np.asarray(distances), expected_distances, rtol=1e-5)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_a_slot_no_other_images_row_can_fill_is_nan(precision):
    bank = np.arange(20, dtype=np.float32).reshape(5, 4)
    bank_images = np.array([0, 0, 1, 0, 0], np.int32)  # image 0 owns 4 of the 5 rows
    distances, indices = map(
        np.asarray,
        knn.nearest_neighbors(
            bank[[0, 2]],
            bank,
            2,
            precision=precision,
            query_images=np.array([0, 1], np.int32),
            bank_images=bank_images,
        ),
    )
    np.testing.assert_array_equal(indices, [[2, NO_INDEX], [1, 3]])
    np.testing.assert_array_equal(distances[0], [256.0, np.nan])
    np.testing.assert_array_equal(distances[1], [64.0, 64.0])


@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("k", [1, 3])
def test_nan_rule_is_the_same_with_and_without_exclusion(precision, k):
    rng = np.random.default_rng(23)
    bank = rng.normal(size=(30, 8)).astype(np.float32)
    bank[3, 2] = np.nan  # never anyone's neighbour
    queries = np.concatenate([bank[:10] + 1e-3, rng.normal(size=(6, 8)).astype(np.float32)])
    queries[3] = bank[3] + 1e-3
    queries[3, 2] = 0.0  # right next to the NaN row
    queries[11, 4], queries[12, 0], queries[13, 7] = np.nan, np.inf, -np.inf
    options = dict(precision=precision, bank_block_size=8, query_block_size=8)
    plain = knn.nearest_neighbors(queries, bank, k, **options)
    # Ids that exclude nothing: bit for bit the k-NN without exclusion, NaNs included.
    nothing = knn.nearest_neighbors(
        queries,
        bank,
        k,
        query_images=np.full(16, 99, np.int32),
        bank_images=np.arange(30, dtype=np.int32),
        **options,
    )
    for ours, theirs in zip(nothing, plain, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    # A real exclusion: the same rule for what is left.
    query_images = np.arange(16, dtype=np.int32) % 5
    bank_images = np.arange(30, dtype=np.int32) % 5
    distances, indices = map(
        np.asarray,
        knn.nearest_neighbors(
            queries, bank, k, query_images=query_images, bank_images=bank_images, **options
        ),
    )
    for result in (np.asarray(plain[0]), distances):
        assert np.all(np.isnan(result[11:14]))  # non-finite queries: NaN, never 0 or inf
        assert np.all(np.isfinite(np.delete(result, [11, 12, 13], axis=0)))
    for result in (np.asarray(plain[1]), indices):
        assert not np.any(result == 3)  # the NaN row
        assert np.all(result[11:14] == NO_INDEX)
    finite = np.isfinite(queries).all(axis=1)
    kept = np.delete(np.arange(30), 3)
    expected_distances, expected_positions = _excluded_knn(
        queries[finite], bank[kept], query_images[finite], bank_images[kept], k
    )
    np.testing.assert_array_equal(indices[finite], kept[expected_positions])
    np.testing.assert_allclose(distances[finite], expected_distances, rtol=1e-4, atol=1e-5)


def test_exclusion_ids_are_validated():
    bank = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="both query and bank-row image ids"):
        knn.nearest_neighbors(bank, bank, query_images=np.zeros(10, np.int32))
    with pytest.raises(ValueError, match=r"shapes \(10,\) and \(10,\)"):
        knn.nearest_neighbors(
            bank, bank, query_images=np.zeros(9, np.int32), bank_images=np.zeros(10, np.int32)
        )


# ----------------------------------------------------------------------------------------------
# The certified search: exact mode's answer from low-rank candidates, a proof, a fallback


@pytest.fixture
def certify_small_banks(monkeypatch):
    """Certified search on this test's small banks (it runs from ``CERTIFIED_MIN_ROWS`` rows
    per shard, where it is measured faster)."""
    monkeypatch.setattr(knn, "CERTIFIED_MIN_ROWS", 0)


def _certified(queries, bank, k, mesh=None, **options):
    """Plain exact scan, certified search (with its fallback flags), both as numpy."""
    options = {"bank_block_size": 300, "query_block_size": 120, "mesh": mesh, **options}
    plain = knn.nearest_neighbors(queries, bank, k, **options)
    certified = knn.nearest_neighbors(
        queries, bank, k, candidate_search="low-rank", with_fallbacks=True, **options
    )
    return [np.asarray(x) for x in plain], [None if x is None else np.asarray(x) for x in certified]


def _adversarial(rng, num_rows=800, dim=160):
    """A bank with decaying scales (low rank captures most of it), duplicates, exact ties, a
    far outlier and a NaN row; queries next to rows, equal to rows, random, and non-finite."""
    scales = np.geomspace(1.0, 1e-2, dim)
    centres = np.repeat(rng.standard_normal((num_rows // 5, dim)), 5, axis=0)  # clusters of 5
    bank = ((centres + 0.1 * rng.standard_normal((num_rows, dim))) * scales).astype(np.float32)
    bank[100:110] = bank[:10]  # duplicates: ties go to the lower index
    bank[200] = 50.0  # a far outlier
    bank[300, 7] = np.nan  # never anyone's neighbour
    queries = (rng.standard_normal((400, dim)) * scales).astype(np.float32)
    queries[:40] = bank[:40]  # equal to bank rows (with duplicates among them)
    queries[40:80] = bank[40:80] + 1e-3 * queries[40:80]
    queries[80] = bank[200] * 0.9  # nearest the outlier
    queries[81] = bank[300] + 1e-3  # next to the NaN row
    queries[81, 7] = 0.0
    queries[90, 3], queries[91, 0] = np.nan, np.inf
    # Most like test patches: near some bank row (the rest, random, are far from every row).
    near = rng.choice(num_rows, 250)
    queries[100:350] = bank[near] + 0.05 * queries[100:350]
    queries[100:350][near == 300] = 0.0
    return queries, bank


@pytest.mark.parametrize("k,bank_shards", [(1, 1), (3, 2), (1, 8)])
def test_certified_knn_is_exact_mode_bit_for_bit_and_the_float64_brute_force(
    k, bank_shards, certify_small_banks
):
    rng = np.random.default_rng(k + bank_shards)
    queries, bank = _adversarial(rng)
    mesh = sharding.make_mesh(bank_shards=bank_shards)
    plain, (distances, indices, fallbacks) = _certified(queries, bank, k, mesh)
    # The plain scan's arithmetic, bit for bit: same indices, same float32 distances, NaNs too.
    np.testing.assert_array_equal(indices, plain[1])
    np.testing.assert_array_equal(distances, plain[0])
    # Against float64: the lowest index on ties, distances within the derived rounding bound.
    finite = np.all(np.isfinite(queries), axis=1)
    kept = np.delete(np.arange(len(bank)), 300)
    expected_distances, positions = _dense_knn(queries[finite], bank[kept], k)
    np.testing.assert_array_equal(indices[finite], kept[positions])
    np.testing.assert_array_equal(indices[:10, 0], np.arange(10))  # not their duplicates
    bound = squared_distance_error(queries[finite][:, None, :], bank[kept[positions]])
    assert np.all(np.abs(distances[finite] - expected_distances) <= bound)
    assert np.all(np.isnan(distances[~finite])) and np.all(indices[~finite] == NO_INDEX)
    # Most queries are proven; non-finite ones always fall back (to the plain scan's NaN).
    assert fallbacks[~finite].all() and 0.5 < 1 - fallbacks.mean() < 1
    print(f"k={k}, {bank_shards} bank shards: {fallbacks.sum()} of {len(queries)} fell back")


@pytest.mark.parametrize("num_failing", [3, 200, 700])
def test_certified_knn_falls_back_to_the_exact_scan_for_few_some_or_all_queries(
    num_failing, certify_small_banks
):
    rng = np.random.default_rng(num_failing)
    queries, bank = _adversarial(rng, dim=128)
    # 32 more dimensions, where the bank barely varies: the low-rank search (r = 128) misses
    # them, so queries far out in them cannot be proven (and all other queries are).
    extra = 1e-3 * rng.standard_normal((len(bank), 32)).astype(np.float32)
    wide_bank = np.concatenate([bank, extra], axis=1)
    wide = np.concatenate([queries[rng.choice(250, 700) + 100], np.zeros((700, 32))], axis=1)
    failing = rng.choice(700, num_failing, replace=False)
    wide[failing, 128:] = rng.standard_normal((num_failing, 32))
    wide = wide.astype(np.float32)
    plain, (distances, indices, fallbacks) = _certified(wide, wide_bank, 2)
    np.testing.assert_array_equal(indices, plain[1])
    np.testing.assert_array_equal(distances, plain[0])
    assert fallbacks[failing].mean() > 0.9 and fallbacks.sum() <= num_failing + 10
    trips = -(-fallbacks.sum() // candidates.FALLBACK_QUERIES)  # rescans of 64 queries
    print(f"{fallbacks.sum()} fell back: {trips} rescans")
    assert trips == -(-num_failing // candidates.FALLBACK_QUERIES)


def test_certified_knn_with_the_same_image_exclusion_equals_the_plain_scan(certify_small_banks):
    rng = np.random.default_rng(30)
    queries, bank = _adversarial(rng)
    bank_images = rng.integers(0, 8, size=len(bank)).astype(np.int32)
    query_images = rng.integers(0, 8, size=len(queries)).astype(np.int32)
    query_images[:40] = bank_images[:40]  # queries equal to a row of their own image
    exclusion = dict(query_images=query_images, bank_images=bank_images)
    plain, (distances, indices, fallbacks) = _certified(queries, bank, 2, **exclusion)
    np.testing.assert_array_equal(indices, plain[1])
    np.testing.assert_array_equal(distances, plain[0])
    own = bank_images[np.minimum(indices, len(bank) - 1)] == query_images[:, None]
    assert not np.any(own & (indices != NO_INDEX))
    assert fallbacks.mean() < 0.5


@pytest.mark.parametrize("k,bank_block_size", [(1, 72), (3, 67), (1, 800)])
def test_certified_knn_merging_several_tiles_groups_at_once_is_the_plain_scan(
    k, bank_block_size, certify_small_banks
):
    """The grouped searches merge up to 8 tiles' groups in one top-k (a divisor of the tile
    count): 12 tiles of 72 rows (6 at a time), 13 (a prime: one at a time), 2 (both)."""
    rng = np.random.default_rng(50 + k)
    queries, bank = _adversarial(rng, num_rows=860)
    tile, rows = knn._tiling(len(bank), 1, bank_block_size)
    assert rows // tile == {72: 12, 67: 13, 800: 2}[bank_block_size]
    plain, (distances, indices, fallbacks) = _certified(
        queries, bank, k, bank_block_size=bank_block_size
    )
    np.testing.assert_array_equal(indices, plain[1])
    np.testing.assert_array_equal(distances, plain[0])
    assert 0.5 < 1 - fallbacks.mean() < 1


def test_tiled_rows_is_the_row_count_the_knn_scans_unpadded():
    """``knn.tiled_rows``: a bank of that many rows is tiled as the original size is, unpadded
    (block sizes that are multiples of 8, the defaults); otherwise the size itself."""
    for shards, block in [(1, 4096), (2, 304), (8, 64), (2, 300), (1, 100)]:
        for rows in [1, 7, 64, 999, 4097, 16385, 16896, 40000]:
            padded = knn.tiled_rows(rows, shards, block)
            tile, per_shard = knn._tiling(rows, shards, block)
            assert knn._tiling(padded, shards, block) == (tile, per_shard)
            assert padded in (rows, shards * per_shard) and per_shard % tile == 0
            if block % 8 == 0:
                assert padded == shards * per_shard


def test_certified_search_is_plain_exact_where_banks_or_tiles_are_small_and_validates():
    rng = np.random.default_rng(32)
    queries, bank = _adversarial(rng, num_rows=400, dim=64)  # tiles of 48 rows
    plain, (distances, indices, fallbacks) = _certified(queries, bank, 1, bank_block_size=48)
    np.testing.assert_array_equal(indices, plain[1])
    np.testing.assert_array_equal(distances, plain[0])
    assert fallbacks is None  # no certified search ran
    plain, (distances, indices, fallbacks) = _certified(queries, bank, 1, bank_block_size=64)
    assert fallbacks is None  # 400 rows: under CERTIFIED_MIN_ROWS
    assert knn.candidates_for("exact", 2) is None
    least = candidates.CERTIFIED_CANDIDATES  # max(4 k, least)
    assert knn.candidates_for("exact", 2, candidate_search="low-rank") == max(8, least)
    assert knn.candidates_for("exact", 9, candidate_search="low-rank") == 36
    with pytest.raises(ValueError, match="num_candidates must be an integer >= k = 3"):
        knn.nearest_neighbors(bank, bank, 3, candidate_search="low-rank", num_candidates=2)


def test_a_symbolic_number_of_queries_is_tiled_without_padding_where_a_tile_divides_it():
    """Exported programs (batch symbolic, images x patches queries): a tile that divides every
    batch's query count pads nothing (batch 1 of a 28 x 28 grid scans 784 queries, not 1024)."""
    import jax

    (batch,) = jax.export.symbolic_shape("batch")
    assert knn._tiling(batch * 784, 1, 1024) == (784, batch * 784)
    assert knn._tiling(batch * 1000, 1, 1024) == (1000, batch * 1000)
    tile, rows = knn._tiling(batch * 196, 1, 1024)  # no multiple of 8 divides 196 b for all b
    assert tile == 1024 and not isinstance(rows, int)
    assert knn._tiling(784, 1, 1024) == (784, 784)  # static: balanced tiles, as before


def test_certified_candidates_bound_every_row_that_is_no_candidate():
    """``reranking.group_candidates``: the C + 1 nearest rows of the C nearest groups, a bound
    below which no other row's low-rank distance lies (float64, less the float32 error of a computed
    low-rank distance, gamma_{r+2} (|q'| + |b'|)^2)."""
    import functools

    import jax

    rng = np.random.default_rng(40)
    rank, num_rows, num_candidates = 16, 640, 8
    rows = rng.standard_normal((num_rows, rank)).astype(np.float32)
    rows[100:108] = rows[7]  # duplicates, in one group and across groups
    queries = np.concatenate([rows[:20] + 1e-3, rng.standard_normal((44, rank))]).astype(np.float32)
    images = rng.integers(0, 4, size=num_rows).astype(np.int32)
    query_images = rng.integers(0, 4, size=len(queries)).astype(np.int32)
    norms = np.sum(rows * rows, axis=1)
    tiles = (
        rows.reshape(-1, 320, rank),
        norms.reshape(-1, 320),
        np.arange(num_rows).reshape(-1, 320),
    )
    tiles += (images.reshape(-1, 320),)
    query_norms = np.sum(queries * queries, axis=1)
    scan = jax.jit(functools.partial(knn._scan, width=num_candidates, grouped="groups"))
    groups = scan(queries, query_norms, query_images, tiles)
    candidates_of = jax.jit(reranking.group_candidates, static_argnums=9)
    distances, indices, bound = candidates_of(
        queries, query_norms, query_images, rows, norms, images, 0, *groups, num_candidates
    )
    exact = np.sum((queries[:, None].astype(np.float64) - rows[None]) ** 2, axis=2)
    exact[query_images[:, None] == images[None]] = np.inf
    scale = (np.linalg.norm(queries, axis=1)[:, None] + np.linalg.norm(rows, axis=1)[None]) ** 2
    error = candidates.gamma(rank + 2) * scale
    for query in range(len(queries)):
        others = np.setdiff1d(np.arange(num_rows), np.asarray(indices[query]))
        assert np.all(exact[query, others] + error[query, others] >= bound[query])
        nearest = np.sort(exact[query])[:num_candidates]  # all in the C nearest groups
        assert np.all(np.abs(distances[query, :num_candidates] - nearest) <= error[query].max())
