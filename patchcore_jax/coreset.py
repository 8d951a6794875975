"""Memory-bank subsampling: approximate greedy coreset, random subsampling, learned proxies.

Approximate greedy coreset (SPEC section 4): features are projected to ``projection_dim`` dims
by a random linear map, every point starts at its mean Euclidean distance to
``num_start_points`` random points, and each step selects the farthest point (lowest index on
ties) and lowers every point's distance to its distance from the selected one. Distances are
``sqrt(max((-2 a.b + |a|^2) + |b|^2, 0))`` in float32, in the reference's operation order, and
the start distances are summed in the order torch's CPU ``mean`` uses. Given the reference's
projection and start points, the selected indices equal the reference's (the fixtures); the
random projection and start points drawn from a ``key`` differ from the reference's RNG, as
any two seeds do.

The whole selection is one ``lax.fori_loop`` inside one compiled program: memory is O(N) (the
bank, its projected rows and one distance per row, updated in place), there is never an N x N
matrix and no host round-trip per step; each step streams the projected rows once, close to
the memory-bandwidth floor (benchmarks/results/coreset.md). Because the loop runs on the
device there is no progress callback; ``jax.block_until_ready`` on the result marks its end.
Each device's rows are padded to a multiple of 256 (see ``_CHUNK_ROWS``); padded rows start
at distance -inf and are never selected.

Rows are split over every device of the mesh (``sharding.ALL_AXES``). Each step every device
updates its own rows and proposes its farthest row; one all-gather of the proposals lets every
device pick the same global winner (largest distance, then lowest global index, exactly the
single-device choice) together with its projected row. Selected indices are therefore identical
on 1, 8 or 512 devices, on one host or many.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from patchcore_jax.sharding import (
    ALL_AXES,
    mesh_size,
    replicate,
    row_sharding,
    single_device_mesh,
)

SAMPLERS = ("approx_greedy_coreset", "random", "identity", "learned_proxies")

# Rows are projected in chunks of this many rows, and each device's share of rows is padded to
# a multiple of it. Every chunk then covers the same global rows on every mesh and runs the
# same fixed-shape matmul, so projections are bit-identical on 1 or many devices (a matmul's
# rounding depends on its shape: XLA and cuBLAS pick kernels per shape).
_CHUNK_ROWS = 256
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- greedy coreset


def _column_dots(columns: jax.Array, point: jax.Array) -> jax.Array:
    """Dot product of every column with ``point``: [p, n], [p] or [p, n] -> [n].

    Written as one explicit chain ``((c_0 * x_0 + c_1 * x_1) + c_2 * x_2) + ...`` that XLA fuses
    into a single pass over contiguous rows of ``columns`` (memory-bound, like a matrix-vector
    product) but may not reorder: every column is summed in the same order whatever ``n`` or the
    backend's reduction tiling, so each shard computes bit-identical distances.
    """
    if point.ndim == 1:
        point = point[:, None]
    total = columns[0] * point[0]
    for k in range(1, columns.shape[0]):
        total = total + columns[k] * point[k]
    return total


def _distances_to(
    columns: jax.Array, sq_norms: jax.Array, point: jax.Array, point_sq_norm: jax.Array
) -> jax.Array:
    """Euclidean distances in the reference's op order: [p, n], [n], [p], [] -> [n]."""
    squared = -2.0 * _column_dots(columns, point) + sq_norms + point_sq_norm
    return jnp.sqrt(jnp.maximum(squared, 0.0))


def _start_order(num_start_points: int) -> tuple[int, ...]:
    """Order in which the start distances are summed: that of torch's CPU ``mean`` (float32).

    torch sums a row of 8..15 values as one 8-wide vector after the tail (8, 9, .. first, then
    lanes 0..7), and 4..7 values as four running sums (0, 4, 5, .., then 1, 2, 3). Fewer than 4
    are summed in order, and so are 16 or more (where torch's order is not reproduced).
    """
    if 8 <= num_start_points < 16:
        return tuple(range(8, num_start_points)) + tuple(range(8))
    if 4 <= num_start_points < 8:
        return (0, *range(4, num_start_points), 1, 2, 3)
    return tuple(range(num_start_points))


def _greedy_on_shard(
    features: jax.Array,
    projection: jax.Array | None,
    start_indices: jax.Array,
    *,
    num_samples: int,
    num_valid: int,
) -> jax.Array:
    """Greedy selection seen from one device (inside ``shard_map``).

    Args:
      features: [n, D] this device's rows (global rows ``offset .. offset + n``).
      projection: [p, D] replicated, or None to use the rows as they are.
      start_indices: [s] int32 global indices of the start points.
      num_samples: selection steps.
      num_valid: global number of real rows; rows at or past it are padding.

    Returns:
      [num_samples] int32 global indices in selection order, identical on every device.
    """
    num_local = features.shape[0]
    offset = jax.lax.axis_index(ALL_AXES) * num_local
    if projection is None:
        rows = features.astype(jnp.float32)
    else:
        chunks = features.reshape(-1, _CHUNK_ROWS, features.shape[1])
        rows = jax.lax.map(
            lambda chunk: jnp.dot(chunk.astype(jnp.float32), projection.T, precision=_HIGHEST),
            chunks,
        ).reshape(num_local, projection.shape[0])
    # Feature-major [p, n] layout: each step streams p contiguous rows of n values.
    columns = rows.T
    sq_norms = _column_dots(columns, columns)
    is_valid = offset + jnp.arange(num_local) < num_valid

    # Start rows: the owner contributes its row, every other device zeros; the sum is exact.
    local_start = start_indices - offset
    owns_start = (local_start >= 0) & (local_start < num_local)
    local_start = jnp.clip(local_start, 0, num_local - 1)
    start_rows = jax.lax.psum(
        jnp.where(owns_start[:, None], columns[:, local_start].T, 0.0), ALL_AXES
    )
    start_sq_norms = jax.lax.psum(jnp.where(owns_start, sq_norms[local_start], 0.0), ALL_AXES)

    order = jnp.asarray(_start_order(start_indices.shape[0]), jnp.int32)

    def add_start_distance(j, total):
        k = order[j]
        return total + _distances_to(columns, sq_norms, start_rows[k], start_sq_norms[k])

    total = jax.lax.fori_loop(0, order.shape[0], add_start_distance, jnp.zeros_like(sq_norms))
    min_distances = jnp.where(is_valid, total / jnp.float32(order.shape[0]), -jnp.inf)

    def select(step, carry):
        min_distances, selected = carry
        local_best = jnp.argmax(min_distances)  # first maximum: lowest local index
        proposal = jnp.concatenate(
            [columns[:, local_best], sq_norms[local_best][None], min_distances[local_best][None]]
        )
        proposals = jax.lax.all_gather(proposal, ALL_AXES)  # [devices, p + 2]
        proposal_indices = jax.lax.all_gather(offset + local_best, ALL_AXES)  # [devices]
        # Devices hold consecutive row ranges in mesh order, so the first device with the
        # largest distance holds the lowest global index among the tied maxima.
        winner = jnp.argmax(proposals[:, -1])
        selected = selected.at[step].set(proposal_indices[winner].astype(jnp.int32))
        distances = _distances_to(columns, sq_norms, proposals[winner, :-2], proposals[winner, -2])
        return jnp.minimum(min_distances, distances), selected

    selected = jnp.zeros((num_samples,), jnp.int32)
    _, selected = jax.lax.fori_loop(0, num_samples, select, (min_distances, selected))
    return selected  # the same on every device: each picks the winner from the same gather


def _padded_rows(num_rows: int, mesh: Mesh) -> int:
    multiple = mesh_size(mesh) * _CHUNK_ROWS
    return -(-num_rows // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("num_samples", "num_valid", "mesh"))
def _greedy_selection(
    features: jax.Array,
    projection: jax.Array | None,
    start_indices: jax.Array,
    *,
    num_samples: int,
    num_valid: int,
    mesh: Mesh,
) -> jax.Array:
    """Compiled once per (shapes, num_samples, num_valid, mesh); see ``_greedy_on_shard``."""
    padding = _padded_rows(features.shape[0], mesh) - features.shape[0]
    if padding:
        features = jnp.pad(features, ((0, padding), (0, 0)))

    def on_shard(features, projection, start_indices):
        return _greedy_on_shard(
            features, projection, start_indices, num_samples=num_samples, num_valid=num_valid
        )

    projection_spec = None if projection is None else P()
    return jax.shard_map(
        on_shard,
        mesh=mesh,
        in_specs=(P(ALL_AXES, None), projection_spec, P()),
        out_specs=P(),
        # Every device derives the selection from the same all-gathered proposals, so the
        # output is replicated; the replication checker cannot infer that through all_gather.
        check_vma=False,
    )(features, projection, start_indices)


def _rows_on_mesh(features: np.ndarray | jax.Array, mesh: Mesh) -> jax.Array:
    """``features`` as a global array split by rows over ``mesh``, padded with zero rows.

    A global (multi-process) jax.Array is returned as it is: the compiled program pads and
    reshards it. Host arrays must hold every row on every process.
    """
    if isinstance(features, jax.Array) and not features.is_fully_addressable:
        return features
    num_rows, dim = features.shape
    padded_shape = (_padded_rows(num_rows, mesh), dim)
    xp = jnp if isinstance(features, jax.Array) else np

    def shard(index: tuple[slice, ...]):
        start, stop, _ = index[0].indices(padded_shape[0])
        block = features[start : min(stop, num_rows)]
        if stop > num_rows:
            block = xp.concatenate(
                [block, xp.zeros((stop - max(start, num_rows), dim), block.dtype)]
            )
        return block

    return jax.make_array_from_callback(padded_shape, row_sharding(mesh), shard)


def _check_features(features) -> tuple[int, int]:
    shape = getattr(features, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"features must be a non-empty [N, D] array, got shape {shape}")
    return int(shape[0]), int(shape[1])


def approximate_greedy_coreset(
    features: np.ndarray | jax.Array,
    num_samples: int,
    *,
    key: jax.Array | None = None,
    projection: np.ndarray | jax.Array | None = None,
    start_indices: np.ndarray | jax.Array | None = None,
    projection_dim: int = 128,
    num_start_points: int = 10,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Indices of the approximate greedy coreset, in selection order (SPEC section 4).

    Args:
      features: [N, D] memory-bank rows (any float dtype; computed in float32). A host array,
        a single-process jax.Array, or a global jax.Array spanning several processes (e.g. from
        ``jax.make_array_from_process_local_data`` with ``sharding.row_sharding(mesh)``).
      num_samples: number of rows to select, 1 <= num_samples <= N.
      key: seeds the projection and start points that are not given.
      projection: [p, D] map to project with (``projected = features @ projection.T``).
        Default: uniform(-1/sqrt(D), 1/sqrt(D)) [projection_dim, D] like torch's Linear
        init, or no projection when D == projection_dim.
      start_indices: [s] distinct start rows. Default: ``min(num_start_points, N)`` rows
        drawn without replacement.
      projection_dim: dimension of the default projection.
      num_start_points: number of default start points.
      mesh: the rows are split over all its devices; default ``single_device_mesh()``.

    Returns:
      [num_samples] int32 indices into ``features``, replicated over ``mesh`` (every process
      can read it with ``np.asarray``).
    """
    num_rows, dim = _check_features(features)
    if not 1 <= num_samples <= num_rows:
        raise ValueError(f"num_samples must be in [1, N={num_rows}], got {num_samples}")
    mesh = single_device_mesh() if mesh is None else mesh
    need_projection = projection is None and dim != projection_dim
    if key is None and (need_projection or start_indices is None):
        raise ValueError(
            "approximate_greedy_coreset needs `key` unless projection and "
            "start_indices are both given"
        )
    if key is not None:
        projection_key, start_key = jax.random.split(key)
    if projection is not None:
        projection = np.asarray(projection, np.float32)
        if projection.ndim != 2 or projection.shape[1] != dim:
            raise ValueError(f"projection must be [p, D={dim}], got shape {projection.shape}")
    elif need_projection:
        if projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1, got {projection_dim}")
        bound = 1.0 / np.sqrt(dim)
        projection = np.asarray(
            jax.random.uniform(projection_key, (projection_dim, dim), jnp.float32, -bound, bound)
        )
    if start_indices is None:
        if num_start_points < 1:
            raise ValueError(f"num_start_points must be >= 1, got {num_start_points}")
        start_indices = random_subsample(num_rows, min(num_start_points, num_rows), start_key)
    start_indices = np.asarray(start_indices)
    if (
        start_indices.ndim != 1
        or start_indices.size < 1
        or not np.issubdtype(start_indices.dtype, np.integer)
        or start_indices.min() < 0
        or start_indices.max() >= num_rows
    ):
        raise ValueError(
            f"start_indices must be a non-empty 1-D integer array in [0, {num_rows}), "
            f"got {start_indices!r}"
        )
    return _greedy_selection(
        _rows_on_mesh(features, mesh),
        None if projection is None else replicate(projection, mesh),
        replicate(start_indices.astype(np.int32), mesh),
        num_samples=int(num_samples),
        num_valid=num_rows,
        mesh=mesh,
    )


# --------------------------------------------------------------------------- other samplers


def random_subsample(num_rows: int, num_samples: int, key: jax.Array) -> jax.Array:
    """``num_samples`` distinct indices in [0, num_rows), uniformly at random: int32 [M]."""
    if not 1 <= num_samples <= num_rows:
        raise ValueError(f"num_samples must be in [1, num_rows={num_rows}], got {num_samples}")
    return jax.random.choice(key, num_rows, (num_samples,), replace=False).astype(jnp.int32)


def proxy_objective(features: jax.Array, proxies: jax.Array) -> jax.Array:
    """Mean over rows of the squared distance to the nearest proxy: [N, D], [K, D] -> [].

    Builds an [N, K] matrix: call it on batches.
    """
    features = jnp.asarray(features, jnp.float32)
    proxies = jnp.asarray(proxies, jnp.float32)
    cross = jnp.dot(features, proxies.T, precision=_HIGHEST)
    squared = (
        -2.0 * cross + jnp.sum(features**2, axis=1)[:, None] + jnp.sum(proxies**2, axis=1)[None]
    )
    return jnp.mean(jnp.min(jnp.maximum(squared, 0.0), axis=1))


@functools.partial(jax.jit, static_argnames=("steps", "learning_rate", "batch_size"))
def _train_proxies(
    features: jax.Array,
    proxies: jax.Array,
    key: jax.Array,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
) -> jax.Array:
    """Adam on ``proxy_objective`` over random batches, as one ``lax.scan``: -> [K, D]."""
    optimizer = optax.adam(learning_rate)

    def train_step(carry, step_key):
        proxies, optimizer_state = carry
        batch = features[jax.random.randint(step_key, (batch_size,), 0, features.shape[0])]
        gradients = jax.grad(proxy_objective, argnums=1)(batch, proxies)
        updates, optimizer_state = optimizer.update(gradients, optimizer_state, proxies)
        return (optax.apply_updates(proxies, updates), optimizer_state), None

    (proxies, _), _ = jax.lax.scan(
        train_step, (proxies, optimizer.init(proxies)), jax.random.split(key, steps)
    )
    return proxies


def learned_proxies(
    features: np.ndarray | jax.Array,
    num_proxies: int,
    *,
    key: jax.Array,
    steps: int = 300,
    learning_rate: float = 1e-2,
    batch_size: int = 1024,
) -> jax.Array:
    """Learned basis proxies (paper Fig. 5): [N, D] -> [num_proxies, D] float32.

    Proxies start at random distinct rows and are trained with Adam to minimise the mean
    squared distance of sampled rows to their nearest proxy (a k-means-like objective). Unlike
    the coreset, the proxies are new points, not rows of ``features``. Runs on one process.
    """
    num_rows, _ = _check_features(features)
    if isinstance(features, jax.Array) and not features.is_fully_addressable:
        raise ValueError("learned_proxies needs features held by this process, got a global array")
    if steps < 1 or batch_size < 1 or learning_rate <= 0:
        raise ValueError(
            f"steps and batch_size must be >= 1 and learning_rate > 0, got steps={steps}, "
            f"batch_size={batch_size}, learning_rate={learning_rate}"
        )
    if not 1 <= num_proxies <= num_rows:
        raise ValueError(f"num_proxies must be in [1, N={num_rows}], got {num_proxies}")
    features = jnp.asarray(features, jnp.float32)
    init_key, train_key = jax.random.split(key)
    initial = features[random_subsample(num_rows, num_proxies, init_key)]
    return _train_proxies(
        features,
        initial,
        train_key,
        steps=int(steps),
        learning_rate=float(learning_rate),
        batch_size=int(batch_size),
    )


# --------------------------------------------------------------------------- memory bank


@jax.jit
def _take_rows(features: jax.Array, indices: jax.Array) -> jax.Array:
    return jnp.take(features, indices, axis=0).astype(jnp.float32)


def build_memory_bank(
    features: np.ndarray | jax.Array,
    *,
    sampler: str,
    fraction: float,
    key: jax.Array,
    projection_dim: int = 128,
    num_start_points: int = 10,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Subsamples all patch features into the memory bank: [N, D] -> [M, D] float32.

    Args:
      features: [N, D] patch features of the nominal images (see
        ``approximate_greedy_coreset`` for the accepted kinds of arrays).
      sampler: one of ``SAMPLERS``: "approx_greedy_coreset", "random", "identity" (all rows)
        or "learned_proxies".
      fraction: M = max(1, int(N * fraction)) rows are kept; in (0, 1].
      key: seeds the sampler.
      projection_dim, num_start_points: greedy coreset settings.
      mesh: devices the greedy coreset runs on; default ``single_device_mesh()``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    num_rows, _ = _check_features(features)
    num_samples = max(1, int(num_rows * fraction))
    if sampler == "identity":
        return jnp.asarray(features, jnp.float32)
    if sampler == "learned_proxies":
        return learned_proxies(features, num_samples, key=key)
    if sampler == "random":
        indices = random_subsample(num_rows, num_samples, key)
    else:
        indices = approximate_greedy_coreset(
            features,
            num_samples,
            key=key,
            projection_dim=projection_dim,
            num_start_points=num_start_points,
            mesh=mesh,
        )
    if isinstance(features, jax.Array) and not features.is_fully_addressable:
        mesh = single_device_mesh() if mesh is None else mesh
        return _take_rows(features, replicate(np.asarray(indices), mesh))
    if isinstance(features, jax.Array):
        return jnp.take(features, np.asarray(indices), axis=0).astype(jnp.float32)
    return jnp.asarray(np.asarray(features)[np.asarray(indices)], jnp.float32)
