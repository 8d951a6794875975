"""Tests of patchcore_jax.coreset: reference parity, sharding, memory, samplers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture
from jax.extend.core import Jaxpr

from patchcore_jax import coreset, sharding

FIXTURE_GROUPS = ("coreset_d1024", "coreset_d128")


def numpy_greedy(features, num_samples, start_indices, projection=None):
    """Plain float64 greedy coreset (SPEC section 4), independent of the JAX implementation."""
    points = features.astype(np.float64)
    if projection is not None:
        points = points @ projection.astype(np.float64).T

    def distances(point):
        return np.sqrt(((points - point) ** 2).sum(axis=1))

    min_distances = np.mean([distances(points[i]) for i in start_indices], axis=0)
    selected = []
    for _ in range(num_samples):
        index = int(np.argmax(min_distances))
        selected.append(index)
        min_distances = np.minimum(min_distances, distances(points[index]))
    return np.asarray(selected)


def mesh_of(num_devices: int):
    return sharding.make_mesh(devices=jax.devices()[:num_devices])


def fixture_coreset(group: str, mesh) -> tuple[np.ndarray, np.ndarray]:
    case = load_fixture("reference_parity", group)
    selected = coreset.approximate_greedy_coreset(
        case["features"],
        len(case["indices"]),
        projection=case.get("projection"),
        start_indices=case["start_points"],
        mesh=mesh,
    )
    return np.asarray(selected), case["indices"]


def test_conftest_gives_eight_devices():
    assert jax.device_count() == 8


# ------------------------------------------------------------------ reference parity


@pytest.mark.parametrize("num_devices", [1, 2, 3, 8])
@pytest.mark.parametrize("group", FIXTURE_GROUPS)
def test_fixture_indices_identical_to_reference(group, num_devices):
    """Same indices in the same order as the authors' code, on 1, 2, 3 and 8 devices."""
    selected, expected = fixture_coreset(group, mesh_of(num_devices))
    assert selected.dtype == np.int32
    np.testing.assert_array_equal(selected, expected)


def test_fixture_fraction_matches_sample_count():
    for group in FIXTURE_GROUPS:
        case = load_fixture("reference_parity", group)
        assert len(case["indices"]) == int(len(case["features"]) * float(case["fraction"]))


def test_start_distances_are_summed_in_torch_cpu_order():
    """The mean over the start points adds terms in the order torch's CPU sum kernel does."""
    torch = pytest.importorskip("torch")
    for num_start_points in (3, 5, 10, 13):
        distances = np.random.default_rng(num_start_points).random((20000, num_start_points))
        distances = (distances * 100).astype(np.float32)
        total = np.zeros(len(distances), np.float32)
        for k in coreset._start_order(num_start_points):
            total = total + distances[:, k]
        expected = torch.mean(torch.from_numpy(distances), dim=-1).numpy()
        np.testing.assert_array_equal(total / np.float32(num_start_points), expected)
        assert sorted(coreset._start_order(num_start_points)) == list(range(num_start_points))


# ------------------------------------------------------------------ independent implementation


@pytest.mark.parametrize(
    ("seed", "num_rows", "dim", "projection_dim", "num_samples"),
    [
        (0, 257, 16, None, 60),  # no projection
        (1, 1001, 32, 8, 100),  # projection path, N not a multiple of anything
        (2, 600, 48, 16, 600),  # select every row
        (3, 9, 4, None, 9),  # fewer rows than start points
    ],
)
def test_equals_numpy_greedy(seed, num_rows, dim, projection_dim, num_samples):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_rows, dim)).astype(np.float32)
    projection = (
        None
        if projection_dim is None
        else rng.uniform(-0.3, 0.3, size=(projection_dim, dim)).astype(np.float32)
    )
    starts = rng.choice(num_rows, min(10, num_rows), replace=False)
    expected = numpy_greedy(features, num_samples, starts, projection)
    for num_devices in (1, 8):
        selected = coreset.approximate_greedy_coreset(
            features,
            num_samples,
            projection=projection,
            start_indices=starts,
            projection_dim=dim,  # without a projection: D == projection_dim skips it
            mesh=mesh_of(num_devices),
        )
        np.testing.assert_array_equal(np.asarray(selected), expected)
    if num_samples == num_rows:
        assert sorted(expected) == list(range(num_rows))


def test_greedy_invariant_on_high_dimensional_bank():
    """128-d Gaussian rows have near-equal distances, so float32 and float64 may swap rows that
    differ in the 9th digit; each selected row must still be a farthest row to 1e-6."""
    rng = np.random.default_rng(4)
    features = rng.normal(size=(4000, 128)).astype(np.float32)
    starts = rng.choice(4000, 10, replace=False)
    selected = np.asarray(
        coreset.approximate_greedy_coreset(features, 200, start_indices=starts, key=None)
    )
    points = features.astype(np.float64)

    def distances(point):
        return np.sqrt(((points - point) ** 2).sum(axis=1))

    min_distances = np.mean([distances(points[i]) for i in starts], axis=0)
    for index in selected:
        assert min_distances[index] >= min_distances.max() * (1 - 1e-6)
        min_distances = np.minimum(min_distances, distances(points[index]))
    assert len(set(selected.tolist())) == len(selected)


# ------------------------------------------------------------------ sharding


def test_sharded_identical_on_uneven_bank():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(1001, 96)).astype(np.float32)
    projection = rng.uniform(-0.1, 0.1, size=(24, 96)).astype(np.float32)
    starts = rng.choice(1001, 10, replace=False)
    results = {
        n: np.asarray(
            coreset.approximate_greedy_coreset(
                features, 150, projection=projection, start_indices=starts, mesh=mesh_of(n)
            )
        )
        for n in (1, 2, 3, 8)
    }
    for n in (2, 3, 8):
        np.testing.assert_array_equal(results[n], results[1], err_msg=f"{n} devices")
    np.testing.assert_array_equal(results[1], numpy_greedy(features, 150, starts, projection))


def test_exact_ties_go_to_lowest_global_index():
    """Row i duplicates base row i % 37, so every distance is tied across all copies, which
    sit on different devices; the first copy must always win, as on one device."""
    rng = np.random.default_rng(6)
    base = rng.normal(size=(37, 20)).astype(np.float32)
    features = base[np.arange(1001) % 37]
    starts = rng.choice(1001, 10, replace=False)
    expected = numpy_greedy(features, 37, starts)
    assert (expected < 37).all()  # the lowest copy of each base row
    for n in (1, 2, 3, 8):
        selected = coreset.approximate_greedy_coreset(
            features,
            37,
            start_indices=starts,
            projection=np.eye(20, dtype=np.float32),
            mesh=mesh_of(n),
        )
        np.testing.assert_array_equal(np.asarray(selected), expected, err_msg=f"{n} devices")


def test_accepts_device_arrays_and_returns_replicated_indices():
    case = load_fixture("reference_parity", "coreset_d128")
    mesh = mesh_of(8)
    features = jax.device_put(jnp.asarray(case["features"], jnp.float16), jax.devices()[0])
    selected = coreset.approximate_greedy_coreset(
        features, len(case["indices"]), start_indices=case["start_points"], mesh=mesh
    )
    assert selected.sharding.is_fully_replicated
    assert set(selected.sharding.device_set) == set(mesh.devices.flat)
    np.testing.assert_array_equal(np.asarray(selected), case["indices"])  # float16 input is exact


# ------------------------------------------------------------------ defaults, memory, compile


def test_key_draws_projection_and_start_points():
    rng = np.random.default_rng(7)
    features = rng.normal(size=(700, 200)).astype(np.float32)
    first = coreset.approximate_greedy_coreset(features, 50, key=jax.random.key(1))
    again = coreset.approximate_greedy_coreset(features, 50, key=jax.random.key(1))
    sharded = coreset.approximate_greedy_coreset(
        features, 50, key=jax.random.key(1), mesh=mesh_of(8)
    )
    other = coreset.approximate_greedy_coreset(features, 50, key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(sharded))
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    assert len(set(np.asarray(first).tolist())) == 50


def _all_avals(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield var.aval
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, Jaxpr):
                    yield from _all_avals(inner)


def test_no_n_by_n_intermediate():
    num_rows, dim = 4096, 256
    mesh = sharding.single_device_mesh()
    args = (
        jnp.zeros((num_rows, dim), jnp.float32),
        jnp.zeros((128, dim), jnp.float32),
        jnp.arange(10, dtype=jnp.int32),
    )
    static = {"num_samples": 64, "num_valid": num_rows, "mesh": mesh}
    jaxpr = jax.make_jaxpr(lambda f, p, s: coreset._greedy_selection(f, p, s, **static))(
        *args
    ).jaxpr
    largest = max(int(np.prod(aval.shape)) for aval in _all_avals(jaxpr) if hasattr(aval, "shape"))
    assert largest <= num_rows * dim  # the input itself; an N x N matrix would be 4x larger
    memory = coreset._greedy_selection.lower(*args, **static).compile().memory_analysis()
    if memory is not None:
        assert memory.temp_size_in_bytes < num_rows * num_rows * 4 // 4


def test_compiles_once_per_shape():
    rng = np.random.default_rng(8)
    features = rng.normal(size=(300, 16)).astype(np.float32)
    starts = np.arange(10)
    kwargs = {"projection": np.eye(16, dtype=np.float32), "start_indices": starts}
    coreset.approximate_greedy_coreset(features, 20, **kwargs)
    before = coreset._greedy_selection._cache_size()
    for _ in range(3):
        coreset.approximate_greedy_coreset(features + 1.0, 20, **kwargs)
    assert coreset._greedy_selection._cache_size() == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 51}, "num_samples"),
        ({"start_indices": np.array([0, 50])}, "start_indices"),
        ({"start_indices": np.array([], np.int64)}, "start_indices"),
        ({"projection": np.ones((8, 5), np.float32)}, "projection"),
        ({"key": None}, "key"),
    ],
)
def test_greedy_rejects_bad_arguments(kwargs, message):
    arguments = {"num_samples": 5, "key": jax.random.key(0)} | kwargs
    with pytest.raises(ValueError, match=message):
        coreset.approximate_greedy_coreset(np.ones((50, 4), np.float32), **arguments)


# ------------------------------------------------------------------ other samplers, memory bank


def test_random_subsample_is_distinct_and_in_range():
    indices = np.asarray(coreset.random_subsample(1000, 300, jax.random.key(3)))
    assert indices.dtype == np.int32 and indices.shape == (300,)
    assert len(set(indices.tolist())) == 300 and indices.min() >= 0 and indices.max() < 1000
    every_row = np.asarray(coreset.random_subsample(50, 50, jax.random.key(3)))
    assert sorted(every_row.tolist()) == list(range(50))
    with pytest.raises(ValueError, match="num_samples"):
        coreset.random_subsample(10, 11, jax.random.key(0))


def test_learned_proxies_reduce_the_objective_on_clustered_data():
    rng = np.random.default_rng(9)
    centres = rng.normal(scale=4.0, size=(8, 16))
    features = (centres[rng.integers(0, 8, 3000)] + rng.normal(size=(3000, 16))).astype(np.float32)
    key = jax.random.key(4)
    proxies = coreset.learned_proxies(features, 8, key=key)  # default steps and rate
    assert proxies.shape == (8, 16) and proxies.dtype == jnp.float32
    initial = features[np.asarray(coreset.random_subsample(3000, 8, jax.random.split(key)[0]))]
    before = float(coreset.proxy_objective(features, initial))
    after = float(coreset.proxy_objective(features, proxies))
    assert after < 0.8 * before
    # The objective against numpy: mean squared distance to the nearest proxy.
    expected = ((features[:, None] - np.asarray(proxies)[None]) ** 2).sum(-1).min(1).mean()
    np.testing.assert_allclose(after, expected, rtol=1e-4)


@pytest.mark.parametrize("sampler", coreset.SAMPLERS)
def test_build_memory_bank_samplers(sampler):
    case = load_fixture("reference_parity", "coreset_d128")
    features = case["features"]
    bank = coreset.build_memory_bank(
        features, sampler=sampler, fraction=0.05, key=jax.random.key(0), mesh=mesh_of(8)
    )
    expected_rows = len(features) if sampler == "identity" else int(len(features) * 0.05)
    assert bank.shape == (expected_rows, 128) and bank.dtype == jnp.float32
    rows = {row.tobytes() for row in features}
    if sampler != "learned_proxies":
        assert all(row.tobytes() in rows for row in np.asarray(bank))
    if sampler == "approx_greedy_coreset":
        indices = coreset.approximate_greedy_coreset(features, expected_rows, key=jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(bank), features[np.asarray(indices)])


def test_build_memory_bank_keeps_at_least_one_row():
    bank = coreset.build_memory_bank(
        np.ones((5, 3), np.float32), sampler="random", fraction=0.01, key=jax.random.key(0)
    )
    assert bank.shape == (1, 3)


@pytest.mark.parametrize(
    ("features", "kwargs", "message"),
    [
        (np.ones((10, 4)), {"sampler": "kmeans"}, "sampler"),
        (np.ones((10, 4)), {"fraction": 0.0}, "fraction"),
        (np.ones((10, 4)), {"fraction": 1.5}, "fraction"),
        (np.ones((0, 4)), {}, "features"),
        (np.ones(10), {}, "features"),
    ],
)
def test_build_memory_bank_rejects_bad_arguments(features, kwargs, message):
    arguments = {"sampler": "random", "fraction": 0.5, "key": jax.random.key(0)} | kwargs
    with pytest.raises(ValueError, match=message):
        coreset.build_memory_bank(features, **arguments)
