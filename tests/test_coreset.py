"""Tests of patchcore_jax.coreset: reference parity, sharding, memory, samplers."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture
from float_rounding import GreedyComparison, compare_greedy_selection
from jax.extend.core import Jaxpr
from jax.sharding import PartitionSpec as P

from patchcore_jax import coreset, sharding
from patchcore_jax.config import SAMPLERS

FIXTURE_GROUPS = ("coreset_d1024", "coreset_d128")
METHODS = ("full", "pruned")


def numpy_greedy(features, num_samples, start_indices, projection=None):
    """Plain float64 greedy coreset (the paper's Algorithm 1), independent of the JAX code."""
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


def fixture_coreset(group: str, mesh, method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    case = load_fixture("reference_parity", group)
    selected = coreset.approximate_greedy_coreset(
        case["features"],
        len(case["indices"]),
        projection=case.get("projection"),
        start_indices=case["start_points"],
        mesh=mesh,
        method=method,
    )
    return np.asarray(selected), case["indices"]


def compare_with_fixture(group: str, selected: np.ndarray) -> GreedyComparison:
    """``selected`` against the reference's indices, up to float32 near-ties (counted)."""
    case = load_fixture("reference_parity", group)
    return compare_greedy_selection(
        case["features"], selected, case["indices"], case["start_points"], case.get("projection")
    )


def test_conftest_gives_eight_devices():
    assert jax.device_count() == 8


# ------------------------------------------------------------------ reference parity


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_devices", [1, 2, 3, 8])
@pytest.mark.parametrize("group", FIXTURE_GROUPS)
def test_fixture_indices_identical_to_reference(group, num_devices, method):
    """Same indices in the same order as the authors' code, on 1, 2, 3 and 8 devices, except
    where two rows are a float32 near-tie (CPUs and GPUs round differently; counted)."""
    selected, _ = fixture_coreset(group, mesh_of(num_devices), method)
    assert selected.dtype == np.int32
    comparison = compare_with_fixture(group, selected)
    print(comparison.summary())
    assert comparison.ok, comparison.summary()


def test_fixture_comparison_accepts_only_near_ties():
    """The comparison's own check: the swap an AVX-only XLA build makes at step 167 (rows
    1429 and 1523, a float32 near-tie; ``XLA_FLAGS=--xla_cpu_max_isa=AVX`` reproduces it) is
    accepted and counted; a deliberate non-tie difference in the order or a wrong row fails."""
    case = load_fixture("reference_parity", "coreset_d1024")
    expected = case["indices"]
    assert list(expected[167:169]) == [1523, 1429]
    swapped = expected.copy()
    swapped[[167, 168]] = swapped[[168, 167]]
    comparison = compare_with_fixture("coreset_d1024", swapped)
    assert comparison.ok and comparison.tie_steps == [167] and comparison.diverged_steps == 1
    for group in FIXTURE_GROUPS:
        expected = load_fixture("reference_parity", group)["indices"]
        for first, second in [(0, 1), (20, 21), (5, 100)]:
            reordered = expected.copy()
            reordered[[first, second]] = reordered[[second, first]]
            comparison = compare_with_fixture(group, reordered)
            assert not comparison.ok and f"step {first}:" in comparison.violation
        replaced = expected.copy()
        replaced[50] = next(i for i in range(3000) if i not in set(expected))
        assert not compare_with_fixture(group, replaced).ok
        assert not compare_with_fixture(group, expected[:-1]).ok


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
    for num_devices, method in itertools.product((1, 8), METHODS):
        selected = coreset.approximate_greedy_coreset(
            features,
            num_samples,
            projection=projection,
            start_indices=starts,
            projection_dim=dim,  # without a projection: D == projection_dim skips it
            mesh=mesh_of(num_devices),
            method=method,
        )
        np.testing.assert_array_equal(np.asarray(selected), expected, err_msg=method)
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


@pytest.mark.parametrize("method", METHODS)
def test_sharded_identical_on_uneven_bank(method):
    rng = np.random.default_rng(5)
    features = rng.normal(size=(1001, 96)).astype(np.float32)
    projection = rng.uniform(-0.1, 0.1, size=(24, 96)).astype(np.float32)
    starts = rng.choice(1001, 10, replace=False)
    results = {
        n: np.asarray(
            coreset.approximate_greedy_coreset(
                features,
                150,
                projection=projection,
                start_indices=starts,
                mesh=mesh_of(n),
                method=method,
            )
        )
        for n in (1, 2, 3, 8)
    }
    for n in (2, 3, 8):
        np.testing.assert_array_equal(results[n], results[1], err_msg=f"{n} devices")
    np.testing.assert_array_equal(results[1], numpy_greedy(features, 150, starts, projection))


@pytest.mark.parametrize("method", METHODS)
def test_exact_ties_go_to_lowest_global_index(method):
    """Row i duplicates base row i % 37, so every distance is tied across all copies, which
    sit on different devices (and blocks); the first copy must always win, as on one device."""
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
            method=method,
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


@pytest.mark.parametrize("method", METHODS)
def test_no_n_by_n_intermediate(method):
    num_rows, dim = 4096, 256
    mesh = sharding.single_device_mesh()
    args = (
        jnp.zeros((num_rows, dim), jnp.float32),
        jnp.zeros((128, dim), jnp.float32),
        jnp.arange(10, dtype=jnp.int32),
    )
    static = {"method": method, "mesh": mesh}
    init = jax.make_jaxpr(
        lambda f, p, s: coreset._greedy_init(f, p, s, num_valid=num_rows, **static)
    )
    state = jax.eval_shape(
        lambda f, p, s: coreset._greedy_init(f, p, s, num_valid=num_rows, **static), *args
    )
    selected = jax.ShapeDtypeStruct((64,), jnp.int32)
    step = jnp.int32(0)
    steps = jax.make_jaxpr(lambda c, r, s: coreset._greedy_steps(c, r, s, step, step, **static))
    for jaxpr in (init(*args).jaxpr, steps(*state, selected).jaxpr):
        largest = max(
            int(np.prod(aval.shape)) for aval in _all_avals(jaxpr) if hasattr(aval, "shape")
        )
        assert largest <= num_rows * dim  # the input itself; an N x N matrix would be 4x larger
    memory = coreset._greedy_init.lower(*args, num_valid=num_rows, **static).compile()
    analysis = memory.memory_analysis()
    if analysis is not None:
        assert analysis.temp_size_in_bytes < num_rows * num_rows * 4 // 4


@pytest.mark.parametrize("method", METHODS)
def test_compiles_once_per_shape(method, monkeypatch):
    """One program for the set-up and one for every chunk of steps, whatever the chunk."""
    monkeypatch.setattr(coreset, "_ROW_VISITS_PER_CHUNK", 300 * 3)  # 3 or 12 steps per chunk
    rng = np.random.default_rng(8)
    features = rng.normal(size=(300, 16)).astype(np.float32)
    starts = np.arange(10)
    kwargs = {"projection": np.eye(16, dtype=np.float32), "start_indices": starts}
    coreset.approximate_greedy_coreset(features, 20, method=method, **kwargs)
    before = coreset._greedy_init._cache_size(), coreset._greedy_steps._cache_size()
    for _ in range(3):
        coreset.approximate_greedy_coreset(features + 1.0, 20, method=method, **kwargs)
    after = coreset._greedy_init._cache_size(), coreset._greedy_steps._cache_size()
    assert after == before
    # Coreset sizes are bucketed (17..32 share the steps' program); a greedy selection is the
    # prefix of a longer one.
    longer = coreset.approximate_greedy_coreset(features, 29, method=method, **kwargs)
    assert coreset._greedy_steps._cache_size() == before[1]
    shorter = coreset.approximate_greedy_coreset(features, 20, method=method, **kwargs)
    np.testing.assert_array_equal(np.asarray(longer)[:20], np.asarray(shorter))
    assert longer.shape == (29,)


# ------------------------------------------------------------------ pruned path: exactness


def _both_methods(features, num_samples, num_devices=1, **kwargs) -> np.ndarray:
    """The pruned path's indices, after checking them against the full pass's."""
    results = {
        method: np.asarray(
            coreset.approximate_greedy_coreset(
                features, num_samples, mesh=mesh_of(num_devices), method=method, **kwargs
            )
        )
        for method in METHODS
    }
    np.testing.assert_array_equal(results["pruned"], results["full"])
    return results["pruned"]


@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize(
    "case", ["duplicates", "all_equal", "far_outlier", "far_from_origin", "clustered"]
)
def test_pruned_identical_to_full_on_adversarial_banks(case, num_devices):
    """Ties, zero distances, one huge distance, large norms (the distance formula's rounding
    is largest there, so the skip margin matters); N = 3000 is not a multiple of the blocks.
    One shape for all cases, so the programs compile once."""
    rng = np.random.default_rng(10)
    if case == "duplicates":
        features = rng.normal(size=(40, 24))[rng.integers(0, 40, 3000)]
    elif case == "all_equal":
        features = np.full((3000, 24), 0.5)
    elif case == "far_outlier":
        features = rng.normal(size=(3000, 24))
        features[1234] = 1e4
    elif case == "far_from_origin":
        features = 300.0 + rng.normal(scale=0.05, size=(3000, 24))
    else:
        centres = rng.normal(scale=5.0, size=(30, 24))
        features = centres[rng.integers(0, 30, 3000)] + rng.normal(size=(3000, 24))
    features = features.astype(np.float32)
    num_samples = 700
    selected = _both_methods(
        features, num_samples, num_devices, projection_dim=24, key=jax.random.key(3)
    )
    if case == "far_outlier":
        assert 1234 in selected[:1]
    if case in ("far_outlier", "clustered"):  # elsewhere float32 rounding makes ties
        assert len(set(selected.tolist())) == num_samples


def test_pruned_reads_few_rows_on_clustered_bank():
    """The bound works: late steps on a clustered bank read a small part of the rows."""
    rng = np.random.default_rng(11)
    centres = rng.normal(scale=6.0, size=(64, 16))
    features = (centres[rng.integers(0, 64, 20000)] + rng.normal(size=(20000, 16))).astype(
        np.float32
    )
    mesh = sharding.single_device_mesh()
    args = (
        coreset._rows_on_mesh(features, mesh),
        None,
        sharding.replicate(np.arange(10, dtype=np.int32), mesh),
    )
    constants, carry = coreset._greedy_init(*args, method="pruned", num_valid=20000, mesh=mesh)
    selected = sharding.replicate(np.zeros(2000, np.int32), mesh)
    carry, selected, _ = coreset._greedy_steps(
        constants, carry, selected, 0, 1000, method="pruned", mesh=mesh
    )
    read_early = float(carry[-1][0])
    carry, selected, _ = coreset._greedy_steps(
        constants, carry, selected, 1000, 2000, method="pruned", mesh=mesh
    )
    assert (float(carry[-1][0]) - read_early) / 1000 < 0.1  # fraction of rows read per step
    expected = coreset.approximate_greedy_coreset(
        features, 2000, start_indices=np.arange(10), projection_dim=16, method="full"
    )
    np.testing.assert_array_equal(np.asarray(selected), np.asarray(expected))


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, Jaxpr):
                    names |= _primitives(inner)
    return names


def test_pruned_step_needs_no_cumulative_sum_sort_or_argmax():
    """The fixed cost of a pruned step: rows and blocks are compacted with bit words (no
    ``jnp.nonzero``: two cumulative sums over the rows listed) and block maxima found with two
    plain reductions (no variadic argmax over every listed row)."""
    num_rows, dim = 4096, 16
    mesh = sharding.single_device_mesh()
    args = (jnp.zeros((num_rows, dim), jnp.float32), None, jnp.arange(10, dtype=jnp.int32))
    static = {"method": "pruned", "mesh": mesh}
    state = jax.eval_shape(
        lambda f, s: coreset._greedy_init(f, None, s, num_valid=num_rows, **static),
        args[0],
        args[2],
    )
    selected = jax.ShapeDtypeStruct((64,), jnp.int32)
    step = jnp.int32(0)
    steps = jax.make_jaxpr(lambda c, r, s: coreset._greedy_steps(c, r, s, step, step, **static))
    used = _primitives(steps(*state, selected).jaxpr)
    assert not used & {"cumsum", "sort", "argmax"}, used & {"cumsum", "sort", "argmax"}


@pytest.mark.parametrize("length", [1, 31, 32, 33, 1000])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.9, 1.0])
def test_compact_lists_true_positions_in_order(length, density):
    mask = np.random.default_rng(length).random(length) < density
    expected = np.flatnonzero(mask)
    for size in (length, max(1, len(expected) // 2)):  # room for all, or truncated
        positions, count = jax.jit(coreset._compact, static_argnums=1)(jnp.asarray(mask), size)
        positions = np.asarray(positions)
        assert int(count) == len(expected)
        kept = min(size, len(expected))
        np.testing.assert_array_equal(positions[:kept], expected[:kept])
        unused = positions[kept:]
        assert (unused >= length).all() and len(set(unused.tolist())) == len(unused)


def test_block_maxima_equal_max_and_first_argmax():
    rng = np.random.default_rng(12)
    distances = rng.integers(0, 4, size=(50, 24)).astype(np.float32)  # many ties
    distances[3] = -np.inf  # a block of padding only
    distances[7, 5:] = -np.inf
    largest, first = coreset._block_maxima(jnp.asarray(distances))
    np.testing.assert_array_equal(np.asarray(largest), distances.max(axis=1))
    np.testing.assert_array_equal(np.asarray(first), distances.argmax(axis=1))


def test_tile_layout_distances_identical_to_column_layout():
    """The pruned path's 8-row tiles [t, p, 8] give bit-identical distances to the full pass's
    columns [p, n]: the same chain per row, only the memory layout differs."""
    rng = np.random.default_rng(13)
    rows = (rng.normal(size=(512, 128)) * rng.lognormal(size=(512, 1))).astype(np.float32)
    point = jnp.asarray(rows[17] * 3.0)

    @jax.jit
    def both(rows, point):
        columns = rows.T
        tiles = jnp.swapaxes(rows.reshape(-1, 8, rows.shape[1]), 1, 2)
        point_sq_norm = coreset._column_dots(point[:, None], point[:, None])[0]
        by_columns = coreset._distances_to(
            columns, coreset._column_dots(columns, columns), point, point_sq_norm
        )
        by_tiles = coreset._distances_to(
            tiles, coreset._column_dots(tiles, tiles, axis=1), point, point_sq_norm, axis=1
        )
        return by_columns, by_tiles.reshape(-1)

    by_columns, by_tiles = both(jnp.asarray(rows), point)
    np.testing.assert_array_equal(np.asarray(by_tiles), np.asarray(by_columns))


@pytest.fixture(scope="module")
def bottle_features(bottle_dir) -> np.ndarray:
    """Real bank: MobileNetV2 patch features of the 209 bottle training images [163856, 1024]."""
    from patchcore_jax import PatchCore, PatchCoreConfig, preprocess
    from patchcore_jax.datasets import folders

    model = PatchCore(PatchCoreConfig(backbone="mobilenet_v2"), mesh=mesh_of(1))
    paths = folders.load_dataset(bottle_dir).train_paths
    return model.patch_features(preprocess.iter_image_batches(paths, 8, 256, 224))


def test_pruned_identical_to_full_on_real_bottle_features(bottle_features):
    selected = _both_methods(
        bottle_features, int(len(bottle_features) * 0.01), key=jax.random.key(0)
    )
    assert len(set(selected.tolist())) == len(selected)


@pytest.mark.slow
def test_pruned_identical_to_full_on_real_bottle_features_10_percent_8_devices(
    bottle_features,
):
    _both_methods(
        bottle_features, int(len(bottle_features) * 0.1), num_devices=8, key=jax.random.key(1)
    )


def test_auto_method_picks_pruned_for_large_selections(monkeypatch):
    calls = []
    monkeypatch.setattr(coreset, "_PRUNED_MIN_ROW_VISITS", 500 * 5)
    original = coreset._greedy_selection
    monkeypatch.setattr(
        coreset,
        "_greedy_selection",
        lambda *args, **kwargs: calls.append(kwargs["method"]) or original(*args, **kwargs),
    )
    for num_rows in (499, 500):
        features = np.random.default_rng(0).normal(size=(num_rows, 8)).astype(np.float32)
        coreset.approximate_greedy_coreset(features, 5, key=jax.random.key(0), projection_dim=8)
    assert calls == ["full", "pruned"]


# ------------------------------------------------------------------ chunks, progress, Ctrl-C


@pytest.mark.parametrize("method", METHODS)
def test_chunks_keep_indices_and_report_progress(method, monkeypatch):
    rng = np.random.default_rng(12)
    features = rng.normal(size=(3000, 32)).astype(np.float32)
    kwargs = {"key": jax.random.key(5), "mesh": mesh_of(8), "method": method}
    one_chunk = np.asarray(coreset.approximate_greedy_coreset(features, 333, **kwargs))
    monkeypatch.setattr(coreset, "_ROW_VISITS_PER_CHUNK", 3072 * 10)  # 10 or 40 steps each
    done = []
    chunked = coreset.approximate_greedy_coreset(features, 333, progress=done.append, **kwargs)
    np.testing.assert_array_equal(np.asarray(chunked), one_chunk)
    assert sum(done) == 333 and len(done) > 5


def test_keyboard_interrupt_from_progress_stops_after_one_chunk(monkeypatch):
    monkeypatch.setattr(coreset, "_ROW_VISITS_PER_CHUNK", 1024)  # one step per chunk
    dispatched = []
    original = coreset._greedy_steps

    def counting(*args, **kwargs):
        dispatched.append(1)
        return original(*args, **kwargs)

    def interrupt(steps):
        raise KeyboardInterrupt

    monkeypatch.setattr(coreset, "_greedy_steps", counting)
    features = np.random.default_rng(13).normal(size=(1000, 8)).astype(np.float32)
    with pytest.raises(KeyboardInterrupt):
        coreset.approximate_greedy_coreset(
            features, 500, key=jax.random.key(0), projection_dim=8, progress=interrupt
        )
    assert len(dispatched) <= 2  # the reported chunk and the one queued behind it


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 51}, "num_samples"),
        ({"start_indices": np.array([0, 50])}, "start_indices"),
        ({"start_indices": np.array([], np.int64)}, "start_indices"),
        ({"projection": np.ones((8, 5), np.float32)}, "projection"),
        ({"key": None}, "key"),
        ({"method": "fast"}, "method"),
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


@pytest.mark.parametrize("sampler", SAMPLERS)
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


def test_select_rows_dispatches_every_sampler():
    key = jax.random.key(0)
    calls = []

    def greedy(num_samples):
        calls.append(num_samples)
        return jnp.arange(num_samples)[::-1]

    select = functools.partial(coreset.select_rows, key=key, greedy=greedy)
    np.testing.assert_array_equal(select("identity", 7, 0.5), np.arange(7))
    np.testing.assert_array_equal(
        select("random", 100, 0.1), np.asarray(coreset.random_subsample(100, 10, key))
    )
    np.testing.assert_array_equal(select("approx_greedy_coreset", 100, 0.05), np.arange(5)[::-1])
    assert calls == [5]
    assert select("learned_proxies", 100, 0.1) is None
    with pytest.raises(ValueError, match="sampler"):
        select("kmeans", 100, 0.1)


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


def _numpy_continued_greedy(rows: np.ndarray, anchors: np.ndarray, steps: int) -> list[int]:
    """The greedy selection in float64, every row starting at its nearest anchor's distance."""
    rows, anchors = rows.astype(np.float64), anchors.astype(np.float64)
    distances = np.sqrt(((rows[:, None] - anchors[None]) ** 2).sum(-1)).min(1)
    selected = []
    for _ in range(steps):
        index = int(np.argmax(distances))
        selected.append(index)
        distances = np.minimum(distances, np.sqrt(((rows - rows[index]) ** 2).sum(-1)))
    return selected


@pytest.mark.parametrize("method", ["full", "pruned"])
def test_selection_continues_from_selected_rows_as_if_they_had_been_selected(method):
    rng = np.random.default_rng(0)
    anchors = rng.normal(size=(37, 16)).astype(np.float32)
    rows = rng.normal(size=(1001, 16)).astype(np.float32)
    expected = _numpy_continued_greedy(rows, anchors, 50)
    for mesh in (sharding.single_device_mesh(), sharding.make_mesh()):
        indices = coreset.approximate_greedy_coreset(
            rows, 50, key=jax.random.key(0), projection_dim=16, selected_rows=anchors,
            method=method, mesh=mesh,
        )  # fmt: skip
        assert np.asarray(indices).tolist() == expected
    with pytest.raises(ValueError, match=r"selected_rows must be a non-empty \[m, D=16\]"):
        coreset.approximate_greedy_coreset(
            rows, 5, key=jax.random.key(0), selected_rows=anchors[:, :8]
        )


def test_auto_method_prunes_large_selections_within_the_memory_budget():
    big = coreset._PRUNED_MIN_ROW_VISITS
    assert coreset.resolve_method("auto", 10, big // 100, 128) == "full"  # small: full is faster
    assert coreset.resolve_method("auto", 16385, 163856, 128) == "pruned"
    # The pruned working set of the 163,856 x 128 bottle rows (~320 MB) exceeds a 64 MB budget.
    assert coreset.resolve_method("auto", 16385, 163856, 128, memory_budget_mb=64) == "full"
    assert coreset.resolve_method("auto", 16385, 163856, 128, memory_budget_mb=1024) == "pruned"
    assert coreset.resolve_method("pruned", 10, 100, 128, memory_budget_mb=0) == "pruned"


# ------------------------------------------------------------------ traceable selection


@pytest.mark.parametrize(("method", "num_devices"), [("full", 8), ("pruned", 1)])
def test_traceable_greedy_coreset_under_jit_equals_the_host_driver(method, num_devices):
    """The host driver's indices from one jitted program (key, projection and start points
    drawn inside it), on 1 and 8 devices and with either method."""
    rng = np.random.default_rng(11)
    features = rng.normal(size=(700, 40)).astype(np.float32)
    mesh = mesh_of(num_devices)
    expected = coreset.approximate_greedy_coreset(
        features, 60, key=jax.random.key(4), projection_dim=12, mesh=mesh, method=method
    )
    select = jax.jit(
        functools.partial(
            coreset.traceable_greedy_coreset,
            num_samples=60,
            projection_dim=12,
            mesh=mesh,
            method=method,
        )
    )
    selected = select(jnp.asarray(features), key=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(selected), np.asarray(expected))
    assert len(set(np.asarray(selected).tolist())) == 60
    with pytest.raises(jax.errors.TracerArrayConversionError):  # the host driver cannot trace
        jax.jit(lambda x: coreset.approximate_greedy_coreset(x, 5, key=jax.random.key(4)))(
            jnp.asarray(features)
        )


def test_traceable_greedy_coreset_on_shard_inside_your_own_shard_map():
    """Inside a user's jitted ``shard_map`` over 8 devices, on padded rows split by rows, with
    traced projection and start points: the fixture's reference indices."""
    case = load_fixture("reference_parity", "coreset_d128")
    mesh = mesh_of(8)
    num_rows = case["features"].shape[0]
    rows = sharding.pad_rows(case["features"], coreset.padded_rows(num_rows, mesh))
    num_samples = len(case["indices"])

    @jax.jit
    def select(rows, starts):
        def on_shard(rows, starts):
            return coreset.traceable_greedy_coreset_on_shard(
                rows, num_samples, projection=None, start_indices=starts, num_valid=num_rows
            )

        return jax.shard_map(
            on_shard,
            mesh=mesh,
            in_specs=(P(sharding.ALL_AXES), P()),
            out_specs=P(),
            check_vma=False,
        )(rows, starts)

    selected = select(jnp.asarray(rows), jnp.asarray(case["start_points"], jnp.int32))
    np.testing.assert_array_equal(np.asarray(selected), case["indices"])
    with pytest.raises(ValueError, match="rows per device must be a multiple of 256"):
        coreset.traceable_greedy_coreset_on_shard(
            jnp.zeros((100, 8)), 5, projection=None, start_indices=jnp.zeros(1), num_valid=100
        )
