"""Memory-bank subsampling: approximate greedy coreset, random subsampling, learned proxies.

Approximate greedy coreset (the paper's Algorithm 1): features are projected to
``projection_dim`` dims by a random linear map, every point starts at its mean Euclidean distance to
``num_start_points`` random points, and each step selects the farthest point (lowest index on
ties) and lowers every point's distance to its distance from the selected one. Distances are
``sqrt(max((-2 a.b + |a|^2) + |b|^2, 0))`` in float32, in the reference's operation order, and
the start distances are summed in the order torch's CPU ``mean`` uses. Given the reference's
projection and start points, the selected indices equal the reference's (the fixtures); the
random projection and start points drawn from a ``key`` differ from the reference's RNG, as
any two seeds do.

The selection runs on the device as one compiled program per chunk of steps (a
``lax.fori_loop``, about a second of work; the loop state stays on the devices between
chunks, donated and updated in place): memory is O(N), there is never an N x N matrix, and the
host only waits once per chunk, to report ``progress`` and to let Ctrl-C through
(``interrupt.check``). Each device's
rows are padded to a multiple of 256 (see ``_CHUNK_ROWS``); padded rows start at distance -inf
and are never selected. Those drivers (``approximate_greedy_coreset``,
``greedy_coreset_from_projected``, ``build_memory_bank``) are host code and cannot be traced;
``traceable_greedy_coreset`` runs the same step functions as one traceable program (a fixed
number of steps, no callback) for use inside ``jax.jit`` and ``jax.shard_map``.

Two exact algorithms select the same indices (``method``):

* ``full``: each step streams every projected row once to lower the distances, then finds the
  next farthest row from the new distances alone (4 bytes a row) and sends one all-gather;
  close to the memory-bandwidth floor.
* ``pruned``: rows are grouped once into blocks of about ``_BLOCK_ROWS`` nearby rows (a
  principal-direction tree) and permuted so each block is contiguous. Triangle-inequality lower
  bounds on the new centre's distance (per block, then per row) skip the rows whose minimum
  cannot change, with a margin that covers float32 rounding of the computed distance; the
  8-row tiles holding the rest (stored feature-major, so an update loop runs over contiguous
  lanes) are gathered and updated with the full pass's formula, so every distance is
  bit-identical. Late steps read a few percent of the rows (benchmarks/results/coreset.md,
  coreset_step.md).

Rows are split over every device of the mesh (``sharding.ALL_AXES``); each device prunes its
own rows. Each step every device proposes its farthest row; one all-gather of the proposals
(row, norm, distance and index) lets every device pick the same global winner (largest
distance, then lowest global index, exactly the single-device choice). Selected indices are
therefore identical on 1, 8 or 512 devices, on one host or many, with either method.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from patchcore_jax import interrupt
from patchcore_jax.config import CORESET_METHODS, SAMPLERS, bank_rows
from patchcore_jax.sharding import (
    ALL_AXES,
    HIGHEST,
    make_mesh,
    mesh_size,
    replicate,
    row_sharding,
    single_device_mesh,
)

# Rows are projected in chunks of this many rows, and each device's share of rows is padded to
# a multiple of it. Every chunk then covers the same global rows on every mesh and runs the
# same fixed-shape matmul, so projections are bit-identical on 1 or many devices (a matmul's
# rounding depends on its shape: XLA and cuBLAS pick kernels per shape).
_CHUNK_ROWS = 256

# "auto" prunes when the full pass would visit at least this many rows (steps x N, about 25 s
# of full-pass steps on a 2-core CPU; benchmarks/results/coreset.md): below it the pruned
# path's one-off costs (compiling more code, grouping rows into blocks) exceed what it saves.
_PRUNED_MIN_ROW_VISITS = 10**9
# The pruned path's working set beyond the full one's, in copies of the projected rows (the
# permuted rows, their transpose, the block structure; measured: 360 MB more peak RSS for the
# 163,856 x 128 bottle rows).
_PRUNED_EXTRA_COPIES = 4
# Pruned path: rows per block (the tree halves groups down to 2**levels blocks of 1x..2x this),
# and power iterations per principal direction.
_BLOCK_ROWS = 32
# Pruned path: rows are gathered and updated in tiles of this many consecutive rows of a block
# (feature-major inside a tile: the update loop then runs over contiguous lanes of 8 rows).
_TILE_ROWS = 8
_POWER_ITERATIONS = 3
# Row visits per compiled chunk of steps: 2**25 is about a second of full-pass steps on a CPU.
_ROW_VISITS_PER_CHUNK = 2**25


# --------------------------------------------------------------------------- greedy coreset


def _column_dots(columns: jax.Array, point: jax.Array, axis: int = 0) -> jax.Array:
    """Dot product of every column with ``point``: [p, n], [p] or [p, n] -> [n].

    Written as one explicit chain ``((c_0 * x_0 + c_1 * x_1) + c_2 * x_2) + ...`` that XLA fuses
    into a single pass over contiguous rows of ``columns`` (memory-bound, like a matrix-vector
    product) but may not reorder: every column is summed in the same order whatever ``n`` or the
    backend's reduction tiling, so each shard computes bit-identical distances. ``axis``: the
    axis of ``columns`` (and of a non-vector ``point``) holding the p features, e.g. 1 for
    row tiles [t, p, 8] -> [t, 8].
    """

    def column(values, k):
        return jax.lax.index_in_dim(values, k, axis, keepdims=False)

    if point.ndim == 1:
        point = point[:, None]
        axis_of_point = 0
    else:
        axis_of_point = axis
    total = column(columns, 0) * jax.lax.index_in_dim(point, 0, axis_of_point, keepdims=False)
    for k in range(1, columns.shape[axis]):
        total = total + column(columns, k) * jax.lax.index_in_dim(
            point, k, axis_of_point, keepdims=False
        )
    return total


def _distances_to(
    columns: jax.Array,
    sq_norms: jax.Array,
    point: jax.Array,
    point_sq_norm: jax.Array,
    axis: int = 0,
) -> jax.Array:
    """Euclidean distances in the reference's op order: [p, n], [n], [p], [] -> [n] (or row
    tiles with ``axis=1``: [t, p, 8], [t, 8], [p], [] -> [t, 8])."""
    squared = -2.0 * _column_dots(columns, point, axis) + sq_norms + point_sq_norm
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


def _project_rows(features: jax.Array, projection: jax.Array | None) -> jax.Array:
    """This device's rows projected in ``_CHUNK_ROWS`` chunks: [n, D] -> [n, p] float32."""
    if projection is None:
        return features.astype(jnp.float32)
    chunks = features.reshape(-1, _CHUNK_ROWS, features.shape[1])
    return jax.lax.map(
        lambda chunk: jnp.dot(chunk.astype(jnp.float32), projection.T, precision=HIGHEST),
        chunks,
    ).reshape(features.shape[0], projection.shape[0])


def _start_distances(
    rows: jax.Array,
    start_indices: jax.Array,
    offset: jax.Array,
    columns: jax.Array,
    sq_norms: jax.Array,
    axis: int = 0,
) -> jax.Array:
    """Mean distance of every row of ``columns`` to the start rows, in torch's summation order.

    ``rows`` [n, p] are this device's rows in global order (global rows ``offset ..``);
    ``columns`` [p, ...] (features on ``axis``) and ``sq_norms`` [...] are the same rows in any
    layout.
    """
    # The owner contributes each start row, every other device zeros; the sum is exact.
    local_start = start_indices - offset
    owns_start = (local_start >= 0) & (local_start < rows.shape[0])
    local_start = jnp.clip(local_start, 0, rows.shape[0] - 1)
    start_rows = jax.lax.psum(jnp.where(owns_start[:, None], rows[local_start], 0.0), ALL_AXES)
    start_sq_norms = jax.lax.psum(
        jnp.where(owns_start, _column_dots(start_rows.T, start_rows.T), 0.0), ALL_AXES
    )
    order = jnp.asarray(_start_order(start_indices.shape[0]), jnp.int32)

    def add_start_distance(j, total):
        k = order[j]
        return total + _distances_to(columns, sq_norms, start_rows[k], start_sq_norms[k], axis)

    total = jax.lax.fori_loop(0, order.shape[0], add_start_distance, jnp.zeros_like(sq_norms))
    return total / jnp.float32(order.shape[0])


def _initial_distances(
    rows: jax.Array,
    start_indices: jax.Array,
    anchors: jax.Array | None,
    projection: jax.Array | None,
    offset: jax.Array,
    columns: jax.Array,
    sq_norms: jax.Array,
    axis: int = 0,
) -> jax.Array:
    """Every row's distance before the first step: the mean distance to the start rows, or,
    with ``anchors`` ([m, D] rows already in the coreset, replicated), the distance to the
    nearest anchor, computed as the steps' own min-update applied once per anchor (so the
    selection continues exactly as if the anchors had been selected)."""
    if anchors is None:
        return _start_distances(rows, start_indices, offset, columns, sq_norms, axis)
    points = _project_rows(anchors, projection)  # [m, p]
    point_sq_norms = _column_dots(points.T, points.T)

    def lower(j, distances):
        return jnp.minimum(
            distances, _distances_to(columns, sq_norms, points[j], point_sq_norms[j], axis)
        )

    return jax.lax.fori_loop(0, points.shape[0], lower, jnp.full_like(sq_norms, jnp.inf))


def _choose_winner(
    row: jax.Array, sq_norm: jax.Array, distance: jax.Array, index: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Global winner among every device's proposal, with one all-gather.

    Each device proposes its farthest row (``row`` [p], its squared norm, its distance and its
    global index, the lowest among its tied rows). The index travels as two float32 halves
    (exact below 2**24 each). Every device picks the same winner: the largest distance, then
    the lowest global index. Returns ``(row [p], sq_norm [], index [] int32)``.
    """
    index = index.astype(jnp.int32)
    halves = jnp.stack([index // 65536, index % 65536]).astype(jnp.float32)
    proposal = jnp.concatenate([row, sq_norm[None], distance[None], halves])
    proposals = jax.lax.all_gather(proposal, ALL_AXES)  # [devices, p + 4]
    indices = proposals[:, -2].astype(jnp.int32) * 65536 + proposals[:, -1].astype(jnp.int32)
    largest = jnp.max(proposals[:, -3])
    winner = jnp.argmin(jnp.where(proposals[:, -3] == largest, indices, jnp.iinfo(jnp.int32).max))
    return proposals[winner, :-4], proposals[winner, -4], indices[winner]


# ------------------------------------------------------------------ full pass per step


def _full_init_on_shard(features, projection, start_indices, anchors, *, num_valid):
    """Projected columns [p, n], squared norms [n], start distances [n], farthest row [1]."""
    num_local = features.shape[0]
    offset = jax.lax.axis_index(ALL_AXES) * num_local
    rows = _project_rows(features, projection)
    # Feature-major [p, n] layout: each step streams p contiguous rows of n values.
    columns = rows.T
    sq_norms = _column_dots(columns, columns)
    is_valid = offset + jnp.arange(num_local) < num_valid
    min_distances = jnp.where(
        is_valid,
        _initial_distances(rows, start_indices, anchors, projection, offset, columns, sq_norms),
        -jnp.inf,
    )
    best = jnp.argmax(min_distances)[None].astype(jnp.int32)
    return (columns, sq_norms), (min_distances, best)


def _full_steps_on_shard(constants, carry, selected, start, stop):
    """Greedy steps ``start .. stop``, each reading every row once.

    Each step lowers the distances (the one pass over the rows) and at once finds this
    device's next proposal from the new distances (first maximum: lowest index), so a step
    starts with its proposal ready and needs one all-gather to pick the winner.
    """
    columns, sq_norms = constants
    offset = jax.lax.axis_index(ALL_AXES) * sq_norms.shape[0]

    def select(step, state):
        (min_distances, best), selected = state
        local = best[0]
        row, row_sq_norm, index = _choose_winner(
            columns[:, local], sq_norms[local], min_distances[local], offset + local
        )
        selected = selected.at[step].set(index)
        distances = _distances_to(columns, sq_norms, row, row_sq_norm)
        min_distances = jnp.minimum(min_distances, distances)
        best = jnp.argmax(min_distances)[None].astype(jnp.int32)
        return (min_distances, best), selected

    return jax.lax.fori_loop(start, stop, select, (carry, selected))


# ------------------------------------------------------------------ pruned: skip far blocks


def _block_layout(num_local: int) -> tuple[int, int]:
    """(rows per block, tree levels): ``2**levels`` blocks of about ``_BLOCK_ROWS`` rows."""
    levels = max(0, int(np.floor(np.log2(num_local / _BLOCK_ROWS)))) if num_local else 0
    return -(-num_local // 2**levels), levels


def _block_order(rows: jax.Array, is_valid: jax.Array, block_rows: int, levels: int) -> jax.Array:
    """Local row ids grouped into ``2**levels`` blocks of nearby rows: -> [blocks, block_rows].

    A balanced principal-direction tree: each level splits every group at the median of its
    rows' projections on the group's top principal direction (a few power iterations). Groups
    are contiguous runs of whole blocks, so every level has the same shapes (one ``fori_loop``).
    Ids at or past ``len(rows)`` are padding; padding and invalid rows sort last in their
    groups. Within a block ids are ascending, so a block's first farthest row has its lowest
    index. The grouping only decides what can be skipped, never the result.
    """
    num_blocks = 1 << levels
    num_tree = block_rows * num_blocks
    num_features = rows.shape[1]
    points = jnp.pad(rows, ((0, num_tree - rows.shape[0]), (0, 0)))
    valid = jnp.pad(is_valid, (0, num_tree - rows.shape[0]))
    start = jnp.cos(1.0 + 2.3 * jnp.arange(num_features, dtype=jnp.float32))

    def split(level, ids):
        # Blocks of ``ids`` in their current order; block b belongs to group b >> (levels - l).
        group = jnp.arange(num_blocks) >> (levels - level)
        x = points[ids].reshape(num_blocks, block_rows, num_features)
        ok = valid[ids].reshape(num_blocks, block_rows, 1)

        def group_sum(per_block):
            total = jax.ops.segment_sum(per_block, group, num_segments=num_blocks)
            return total[group]

        count = jnp.maximum(group_sum(jnp.sum(ok, axis=1).astype(jnp.float32)), 1.0)
        mean = group_sum(jnp.sum(jnp.where(ok, x, 0.0), axis=1)) / count
        centred = jnp.where(ok, x - mean[:, None], 0.0)
        direction = jnp.broadcast_to(start, (num_blocks, num_features))
        for _ in range(_POWER_ITERATIONS):
            along = jnp.einsum("kbp,kp->kb", centred, direction)
            direction = group_sum(jnp.einsum("kbp,kb->kp", centred, along))
            direction = direction / jnp.maximum(
                jnp.linalg.norm(direction, axis=1, keepdims=True), 1e-30
            )
        along = jnp.where(ok[..., 0], jnp.einsum("kbp,kp->kb", centred, direction), jnp.inf)
        row_group = jnp.broadcast_to(group[:, None], along.shape).reshape(-1)
        _, _, ids = jax.lax.sort((row_group, along.reshape(-1), ids), num_keys=2)
        return ids

    ids = jax.lax.fori_loop(0, levels, split, jnp.arange(num_tree, dtype=jnp.int32))
    return jnp.sort(ids.reshape(num_blocks, block_rows), axis=1)


def _pruned_init_on_shard(features, projection, start_indices, anchors, *, num_valid):
    """Rows permuted into contiguous blocks of nearby rows, with each block's geometry.

    Each block is padded to whole tiles of ``_TILE_ROWS`` rows. Constants (n = blocks x W rows
    in block order, t = n / 8 tiles): the rows as tiles [t, p, 8] (feature-major inside a
    tile, so gathered tiles stream like the full pass's columns), squared norms [n], global
    indices [n], each row's distance to its block centre [n], block centres [blocks, p], radii
    [blocks] and largest row norms [blocks]. Carry: distances [n] (-inf for padding), each
    block's largest distance [blocks] and its first position [blocks], and the fraction of
    rows read so far [1].
    """
    num_local = features.shape[0]
    offset = jax.lax.axis_index(ALL_AXES) * num_local
    rows = _project_rows(features, projection)
    is_valid = offset + jnp.arange(num_local) < num_valid
    block_rows, levels = _block_layout(num_local)
    order = _block_order(rows, is_valid, block_rows, levels)  # [blocks, B]
    # Whole tiles per block; the slots added are padding (ids past the rows), like the tree's.
    order = jnp.pad(order, ((0, 0), (0, -block_rows % _TILE_ROWS)), constant_values=num_local)
    in_rows = order < num_local
    safe = jnp.minimum(order, num_local - 1)
    block_valid = in_rows & is_valid[safe]
    points = jnp.where(in_rows[..., None], rows[safe], 0.0)  # [blocks, W, p]
    num_blocks, width, num_features = points.shape
    tiles = jnp.swapaxes(points.reshape(-1, _TILE_ROWS, num_features), 1, 2)  # [t, p, 8]
    tile_sq_norms = _column_dots(tiles, tiles, axis=1)  # [t, 8]
    distances = _initial_distances(
        rows, start_indices, anchors, projection, offset, tiles, tile_sq_norms, axis=1
    )
    min_distances = jnp.where(block_valid, distances.reshape(num_blocks, width), -jnp.inf)
    sq_norms = tile_sq_norms.reshape(num_blocks, width)
    count = jnp.maximum(jnp.sum(block_valid, axis=1), 1)
    centres = jnp.sum(jnp.where(block_valid[..., None], points, 0.0), axis=1) / count[:, None]
    to_centre = jnp.sqrt(jnp.sum((points - centres[:, None]) ** 2, axis=2))  # [blocks, W]
    radii = jnp.max(jnp.where(block_valid, to_centre, 0.0), axis=1)
    norms = jnp.sqrt(jnp.max(jnp.where(block_valid, sq_norms, 0.0), axis=1))
    constants = (
        tiles,
        sq_norms.reshape(-1),
        (offset + order).astype(jnp.int32).reshape(-1),
        to_centre.reshape(-1),
        centres,
        radii,
        norms,
    )
    block_max, block_pos = _block_maxima(min_distances)
    carry = (min_distances.reshape(-1), block_max, block_pos, jnp.zeros((1,), jnp.float32))
    return constants, carry


def _capacities(total: int, factor: int, count: int, smallest: int) -> tuple[int, ...]:
    """Static sizes a step may gather: ``total`` divided by ``factor**k``, k < ``count``, and
    not below ``smallest`` (smaller ones save less than their compiled branch costs)."""
    sizes = {-(-total // factor**k) for k in range(count)}
    return tuple(sorted({total} | {size for size in sizes if size >= smallest}))


def _compact(mask: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """Positions of the True entries of ``mask`` [L], ascending, in a fixed [size] int32 array
    (positions past ``size`` are dropped; unused slots hold distinct values >= L), and how
    many there are [] int32.

    A stream compaction without a sort or a prefix sum over L (``jnp.nonzero`` needs two, slow
    on XLA CPU): each run of 32 entries becomes a bit word, an entry's rank is the set bits
    below it in its word plus those of the words before (a prefix sum over L / 32 words), and
    one scatter puts it there.
    """
    length = mask.shape[0]
    num_words = -(-length // 32)
    shifts = jnp.arange(32, dtype=jnp.uint32)
    bits = jnp.pad(mask, (0, num_words * 32 - length)).reshape(num_words, 32)
    words = jnp.sum(bits.astype(jnp.uint32) << shifts, axis=1, dtype=jnp.uint32)
    counts = jax.lax.population_count(words).astype(jnp.int32)
    starts = jax.lax.associative_scan(jnp.add, counts) - counts  # [words], exclusive
    below = jax.lax.population_count(words[:, None] & ((jnp.uint32(1) << shifts) - 1))
    rank = (starts[:, None] + below.astype(jnp.int32)).reshape(-1)[:length]
    # Entries left out get distinct targets past the end, so every scattered index is unique.
    entries = jnp.arange(length, dtype=jnp.int32)
    target = jnp.where(mask, rank, size + entries)
    unused = length + jnp.arange(size, dtype=jnp.int32)
    positions = unused.at[target].set(entries, mode="drop", unique_indices=True)
    return positions, starts[-1] + counts[-1]


def _block_maxima(distances: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each block's largest distance and its first position: [k, W] -> [k], [k] int32.

    ``argmax``'s result as a max and a min of positions: two plain reductions, several times
    faster on XLA CPU than its variadic argmax reduction.
    """
    largest = jnp.max(distances, axis=1)
    positions = jnp.arange(distances.shape[1], dtype=jnp.int32)
    first = jnp.min(jnp.where(distances == largest[:, None], positions, distances.shape[1]), axis=1)
    return largest, first


def _pruned_steps_on_shard(constants, carry, selected, start, stop):
    """Greedy steps ``start .. stop`` that read only the rows the new centre may change.

    Lower bounds on the new centre's distance to a row, by the triangle inequality: per block,
    the distance to the block centre minus the radius; per row, the difference of the distance
    to its block centre and its own. A row is skipped when its bound clears its current
    distance (a block's when it clears the block's largest) by a margin covering float32
    rounding of the computed distance, so its minimum could not change. The tiles holding the
    rows left are gathered into the smallest static capacity that holds them and updated with
    exactly the full pass's formula (a skipped row in such a tile gets its own minimum back),
    so distances and selected indices are bit-identical to it; when most tiles are left the
    step streams them all.
    """
    tiles, sq_norms, indices, offsets, centres, radii, norms = constants
    num_blocks, num_features = centres.shape
    num_rows = sq_norms.shape[0]
    num_tiles = tiles.shape[0]
    block_rows = num_rows // num_blocks
    block_tiles = block_rows // _TILE_ROWS
    block_caps = _capacities(num_blocks, 2, 8, 32)
    # Gathering a tile costs about twice streaming it (read, write, read back): past a quarter
    # of the tiles a step streams them all.
    gathered_limit = -(-num_tiles // 4)
    tile_caps = (*_capacities(gathered_limit, 2, 8, 64), num_tiles)
    # Rounding: the computed squared distance (-2 a.b + |a|^2) + |b|^2 (p-term dot products)
    # is within (p + 2) u (|a| + |b|)^2 of the exact one (u = 2**-24); doubled, gamma also
    # covers the rounding of the bounds themselves (direct distances: relative error < p u).
    gamma = jnp.float32(2 * (num_features + 8) * 2.0**-24)
    block_range = jnp.arange(num_blocks)

    def can_skip(lower, largest, error):
        return (largest < 0) | (
            (lower > 0) & (lower * lower * (1 - gamma) >= (error + largest * largest) * (1 + gamma))
        )

    def find_tiles(capacity, block_ids, min_distances, to_centre, error):
        """Tiles of the first ``capacity`` listed blocks with a row whose bound does not clear."""
        listed = block_ids[:capacity]
        safe = jnp.minimum(listed, num_blocks - 1)
        block_offsets = offsets.reshape(num_blocks, block_rows)[safe]
        distances = min_distances.reshape(num_blocks, block_rows)[safe]
        centre = to_centre[safe][:, None]
        lower = jnp.maximum(
            centre * (1 - gamma) - block_offsets * (1 + gamma),
            block_offsets * (1 - gamma) - centre * (1 + gamma),
        )
        active = ~can_skip(lower, distances, error[safe][:, None])
        active = active & (listed < num_blocks)[:, None]
        tile_active = jnp.any(active.reshape(capacity, block_tiles, _TILE_ROWS), axis=2)
        position, num_active = _compact(tile_active.reshape(-1), gathered_limit)
        tile_ids = jnp.where(
            position < capacity * block_tiles,
            safe[jnp.minimum(position // block_tiles, capacity - 1)] * block_tiles
            + position % block_tiles,
            num_tiles + position,  # unused: distinct, past the tiles
        )
        return tile_ids, num_active

    def update_tiles(capacity, tile_ids, min_distances, row, row_sq_norm):
        distances = min_distances.reshape(num_tiles, _TILE_ROWS)
        tile_sq_norms = sq_norms.reshape(num_tiles, _TILE_ROWS)
        if capacity == num_tiles:
            new = _distances_to(tiles, tile_sq_norms, row, row_sq_norm, axis=1)
            return jnp.minimum(distances, new).reshape(-1)
        # No loop over chunks here: a loop would copy the loop-invariant tiles every step.
        ids = tile_ids[:capacity]
        safe = jnp.minimum(ids, num_tiles - 1)
        new = jnp.minimum(
            distances[safe],
            _distances_to(tiles[safe], tile_sq_norms[safe], row, row_sq_norm, axis=1),
        )
        return distances.at[ids].set(new, mode="drop", unique_indices=True).reshape(-1)

    def rescan_blocks(capacity, block_ids, min_distances, block_max, block_pos):
        blocks = min_distances.reshape(num_blocks, block_rows)
        if capacity == num_blocks:
            return _block_maxima(blocks)
        ids = block_ids[:capacity]
        largest, first = _block_maxima(blocks[jnp.minimum(ids, num_blocks - 1)])
        return (
            block_max.at[ids].set(largest, mode="drop", unique_indices=True),
            block_pos.at[ids].set(first, mode="drop", unique_indices=True),
        )

    find_branches = [functools.partial(find_tiles, c) for c in block_caps]
    update_branches = [functools.partial(update_tiles, c) for c in tile_caps]
    rescan_branches = [functools.partial(rescan_blocks, c) for c in block_caps]

    def select(step, state):
        (min_distances, block_max, block_pos, fraction_read), selected = state
        # This device's farthest row: largest distance, then lowest global index.
        firsts = indices.reshape(num_blocks, block_rows)[block_range, block_pos]
        largest = jnp.max(block_max)
        block = jnp.argmin(jnp.where(block_max == largest, firsts, jnp.iinfo(jnp.int32).max))
        local = block * block_rows + block_pos[block]
        row, row_sq_norm, index = _choose_winner(
            tiles[local // _TILE_ROWS, :, local % _TILE_ROWS],
            sq_norms[local],
            largest,
            firsts[block],
        )
        selected = selected.at[step].set(index)

        to_centre = jnp.sqrt(jnp.sum((centres - row) ** 2, axis=1))
        error = gamma * ((norms + jnp.sqrt(row_sq_norm)) * (1 + gamma)) ** 2
        block_active = ~can_skip(to_centre * (1 - gamma) - radii * (1 + gamma), block_max, error)
        block_ids, num_listed = _compact(block_active, num_blocks)
        block_tier = jnp.sum(num_listed > jnp.asarray(block_caps[:-1]))
        tile_ids, num_active = jax.lax.switch(
            block_tier, find_branches, block_ids, min_distances, to_centre, error
        )
        tile_tier = jnp.sum(num_active > jnp.asarray(tile_caps[:-1]))
        min_distances = jax.lax.switch(
            tile_tier, update_branches, tile_ids, min_distances, row, row_sq_norm
        )
        block_max, block_pos = jax.lax.switch(
            block_tier, rescan_branches, block_ids, min_distances, block_max, block_pos
        )
        rows_read = jnp.asarray(tile_caps, jnp.float32)[tile_tier] * _TILE_ROWS
        fraction_read = fraction_read + rows_read / num_rows
        return (min_distances, block_max, block_pos, fraction_read), selected

    return jax.lax.fori_loop(start, stop, select, (carry, selected))


# ------------------------------------------------------------------ compiled programs

_METHODS = {
    "full": (_full_init_on_shard, _full_steps_on_shard),
    "pruned": (_pruned_init_on_shard, _pruned_steps_on_shard),
}


def _state_specs(method: str) -> tuple[tuple[P, ...], tuple[P, ...]]:
    """PartitionSpecs of (constants, carry): every array is split by rows over the mesh."""
    rows = P(ALL_AXES)
    if method == "full":
        return (P(None, ALL_AXES), rows), (rows, rows)
    return (rows,) * 7, (rows,) * 4


def padded_rows(num_rows: int, mesh: Mesh) -> int:
    """``num_rows`` rounded up to whole ``_CHUNK_ROWS`` chunks on every device of ``mesh``: the
    rows the greedy coreset runs on (``greedy_coreset_from_projected``'s ``projected``)."""
    multiple = mesh_size(mesh) * _CHUNK_ROWS
    return -(-num_rows // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("method", "num_valid", "mesh"))
def _greedy_init(
    features: jax.Array,
    projection: jax.Array | None,
    start_indices: jax.Array,
    anchors: jax.Array | None = None,
    *,
    method: str,
    num_valid: int,
    mesh: Mesh,
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Projection, layout and start distances: the loop state ``(constants, carry)``.

    Each device's rows are global rows ``offset .. offset + n``; rows at or past ``num_valid``
    are padding (distance -inf, never selected).
    """
    padding = padded_rows(features.shape[0], mesh) - features.shape[0]
    if padding:
        features = jnp.pad(features, ((0, padding), (0, 0)))
    init_on_shard = functools.partial(_METHODS[method][0], num_valid=num_valid)
    return jax.shard_map(
        init_on_shard,
        mesh=mesh,
        in_specs=(
            P(ALL_AXES, None),
            None if projection is None else P(),
            P(),
            None if anchors is None else P(),
        ),
        out_specs=_state_specs(method),
        check_vma=False,
    )(features, projection, start_indices, anchors)


@functools.partial(jax.jit, static_argnames=("method", "mesh"), donate_argnums=(1, 2))
def _greedy_steps(
    constants: tuple[jax.Array, ...],
    carry: tuple[jax.Array, ...],
    selected: jax.Array,
    start: jax.Array,
    stop: jax.Array,
    *,
    method: str,
    mesh: Mesh,
) -> tuple[tuple[jax.Array, ...], jax.Array, jax.Array]:
    """Selection steps ``start .. stop`` (dynamic: one compilation for every chunk).

    Returns the new carry and ``selected`` (donated buffers, updated in place) and the last
    selected index, a small array the host waits on without touching the donated state.
    """
    constants_spec, carry_spec = _state_specs(method)
    carry, selected = jax.shard_map(
        _METHODS[method][1],
        mesh=mesh,
        in_specs=(constants_spec, carry_spec, P(), P(), P()),
        out_specs=(carry_spec, P()),
        # Every device derives the selection from the same all-gathered proposals, so it is
        # replicated; the replication checker cannot infer that through all_gather.
        check_vma=False,
    )(constants, carry, selected, start, stop)
    return carry, selected, selected[jnp.maximum(stop - 1, 0)]


def _steps_per_chunk(num_rows: int, method: str) -> int:
    """Steps per compiled chunk: about a second of work on a CPU, the same on every process."""
    work = _ROW_VISITS_PER_CHUNK * (4 if method == "pruned" else 1)
    return max(1, work // num_rows)


def _bucket(count: int) -> int:
    """The smallest power of two >= ``count``: array lengths that share compiled programs."""
    return 1 << max(0, count - 1).bit_length()


def _greedy_selection(
    features: jax.Array,
    projection: jax.Array | None,
    start_indices: jax.Array,
    *,
    num_samples: int,
    num_valid: int,
    method: str,
    mesh: Mesh,
    progress: Callable[[int], None] | None = None,
    anchors: jax.Array | None = None,
) -> jax.Array:
    """Runs the selection in chunks of steps; the loop state stays on the devices.

    The host waits for chunk k only after chunk k + 1 is queued, so the devices never idle,
    ``progress`` (steps done) is called once per chunk, and a KeyboardInterrupt (or an
    exception from ``progress``, or ``interrupt.Interrupted`` from ``interrupt.check``) stops
    the selection after at most one more chunk.
    """
    constants, carry = _greedy_init(
        features,
        projection,
        start_indices,
        anchors,
        method=method,
        num_valid=num_valid,
        mesh=mesh,
    )
    # Room for a bucketed number of steps (the next power of two): the step program is
    # compiled per shape of ``selected``, so nearby coreset sizes share one compilation.
    selected = replicate(np.zeros((_bucket(num_samples),), np.int32), mesh)
    chunk = _steps_per_chunk(features.shape[0], method)
    pending: tuple[jax.Array, int] | None = None
    for start in range(0, num_samples, chunk):
        stop = min(start + chunk, num_samples)
        carry, selected, done = _greedy_steps(
            constants,
            carry,
            selected,
            replicate(np.int32(start), mesh),
            replicate(np.int32(stop), mesh),
            method=method,
            mesh=mesh,
        )
        if pending is not None:
            _report(pending, progress)
        pending = (done, stop - start)
    _report(pending, progress)
    return selected[:num_samples]


def _report(pending: tuple[jax.Array, int], progress: Callable[[int], None] | None) -> None:
    done, steps = pending
    jax.block_until_ready(done)
    if progress is not None:
        progress(steps)
    interrupt.check()


def _rows_on_mesh(features: np.ndarray | jax.Array, mesh: Mesh) -> jax.Array:
    """``features`` as a global array split by rows over ``mesh``, padded with zero rows.

    A global (multi-process) jax.Array is returned as it is: the compiled program pads and
    reshards it. Host arrays must hold every row on every process.
    """
    if isinstance(features, jax.Array) and not features.is_fully_addressable:
        return features
    num_rows, dim = features.shape
    padded_shape = (padded_rows(num_rows, mesh), dim)
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


def projection_matrix(key: jax.Array, dim: int, projection_dim: int = 128) -> np.ndarray | None:
    """The default projection ``approximate_greedy_coreset`` draws from ``key``: float32
    uniform(-1/sqrt(D), 1/sqrt(D)) [projection_dim, D] from ``jax.random.split(key)[0]``, or
    None (no projection) when ``dim == projection_dim``."""
    projection = _drawn_projection(key, dim, projection_dim)
    return None if projection is None else np.asarray(projection)


def _drawn_projection(key: jax.Array, dim: int, projection_dim: int) -> jax.Array | None:
    """``projection_matrix`` as a traceable function of ``key`` (a device array)."""
    if dim == projection_dim:
        return None
    if projection_dim < 1:
        raise ValueError(f"projection_dim must be >= 1, got {projection_dim}")
    projection_key, _ = jax.random.split(key)
    bound = 1.0 / np.sqrt(dim)
    return jax.random.uniform(projection_key, (projection_dim, dim), jnp.float32, -bound, bound)


@functools.partial(jax.jit, static_argnames=("mesh",))
def project_rows(features: jax.Array, projection: jax.Array | None, *, mesh: Mesh) -> jax.Array:
    """Rows projected exactly as the greedy coreset projects them: [G, ..., D] -> [G * ..., p].

    ``features`` is split by its first axis over every device of ``mesh`` (e.g. a batch of
    patch features ``[B, P, D]`` from ``PatchCore.embed``); each device flattens its rows,
    pads them to whole ``_CHUNK_ROWS`` chunks and projects them like ``_greedy_init`` does
    (float32, ``Precision.HIGHEST``, one fixed-shape matmul per chunk). A row's projection
    depends on that row alone, so projecting batch by batch gives the bit-identical rows the
    one-shot path computes (tests/test_device_fit.py checks it). ``projection`` [p, D]
    replicated, or None (float32 rows).
    """

    def on_shard(rows, projection):
        rows = rows.reshape(-1, rows.shape[-1])
        num_local = rows.shape[0]
        rows = jnp.pad(rows, ((0, -num_local % _CHUNK_ROWS), (0, 0)))
        return _project_rows(rows, projection)[:num_local]

    return jax.shard_map(
        on_shard,
        mesh=mesh,
        in_specs=(P(ALL_AXES), None if projection is None else P()),
        out_specs=P(ALL_AXES),
        check_vma=False,
    )(features, projection)


def project_host_rows(rows: np.ndarray, projection: np.ndarray | None) -> np.ndarray:
    """Host ``rows`` [m, D] projected exactly as ``project_rows`` projects fitted rows (on this
    process's first device): [m, p] float32, e.g. a fitted bank to continue a selection from
    (``greedy_coreset_from_projected``'s ``selected_rows``)."""
    mesh = make_mesh(1, jax.local_devices()[:1])
    if projection is not None:
        projection = replicate(projection, mesh)
    return np.asarray(project_rows(jnp.asarray(rows), projection, mesh=mesh))


def _checked_start_indices(start_indices: np.ndarray | jax.Array, num_rows: int) -> np.ndarray:
    """``start_indices`` as a host array, or ValueError unless a non-empty 1-D integer array of
    rows in [0, num_rows)."""
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
    return start_indices


def resolve_method(
    method: str,
    num_samples: int,
    num_rows: int,
    dim: int,
    memory_budget_mb: float | None = None,
) -> str:
    """The greedy method ``"auto"`` stands for: ``"pruned"`` when the full pass would visit at
    least ``_PRUNED_MIN_ROW_VISITS`` rows (where pruning is faster) and its extra working set
    (about ``_PRUNED_EXTRA_COPIES`` copies of the [N, dim] float32 rows) fits
    ``memory_budget_mb`` (None: no limit), else ``"full"``. Both select the same indices."""
    if method != "auto":
        return method
    if num_samples * num_rows < _PRUNED_MIN_ROW_VISITS:
        return "full"
    extra_mb = _PRUNED_EXTRA_COPIES * num_rows * dim * 4 / 2**20
    return "full" if memory_budget_mb is not None and extra_mb > memory_budget_mb else "pruned"


def greedy_coreset_from_projected(
    projected: np.ndarray | jax.Array,
    num_samples: int,
    *,
    num_rows: int | None = None,
    key: jax.Array | None = None,
    start_indices: np.ndarray | jax.Array | None = None,
    num_start_points: int = 10,
    mesh: Mesh | None = None,
    method: str = "auto",
    progress: Callable[[int], None] | None = None,
    selected_rows: np.ndarray | jax.Array | None = None,
    memory_budget_mb: float | None = None,
) -> jax.Array:
    """``approximate_greedy_coreset`` on rows that are already projected: the same indices.

    Args:
      projected: [R, p] rows projected with ``project_rows`` and the projection
        ``projection_matrix(key, D, projection_dim)``; rows at or past ``num_rows`` are padding
        (e.g. a global array of ``padded_rows(num_rows, mesh)`` rows split over ``mesh``,
        which is used as it is). Only these [R, p] rows need to be resident, never [N, D].
      num_rows: N, the rows that count (default R).
      key: the same key as for ``approximate_greedy_coreset``: the start points are drawn from
        its second half, unless ``start_indices`` or ``selected_rows`` are given.
      selected_rows: [m, p] rows already in the coreset, projected like ``projected`` (with
        ``project_rows``): the selection continues from them as ``approximate_greedy_coreset``'s
        ``selected_rows`` does.
      memory_budget_mb: ``method="auto"`` picks ``"full"`` when the pruned path's extra
        working set would exceed it (``resolve_method``); the indices are the same.
      The other arguments are ``approximate_greedy_coreset``'s.
    """
    total, dim = _check_features(projected)
    num_rows = total if num_rows is None else int(num_rows)
    if not 1 <= num_rows <= total:
        raise ValueError(f"num_rows must be in [1, {total}], got {num_rows}")
    if not 1 <= num_samples <= num_rows:
        raise ValueError(f"num_samples must be in [1, N={num_rows}], got {num_samples}")
    if method not in CORESET_METHODS:
        raise ValueError(f"method must be one of {CORESET_METHODS}, got {method!r}")
    method = resolve_method(method, num_samples, num_rows, dim, memory_budget_mb)
    mesh = single_device_mesh() if mesh is None else mesh
    anchors = None
    if selected_rows is not None:
        anchors = _anchor_rows(selected_rows, projected.shape[1])
        start_indices = np.zeros((1,), np.int32)  # unused with anchors
    if start_indices is None:
        if key is None:
            raise ValueError("greedy_coreset_from_projected needs `key` or `start_indices`")
        if num_start_points < 1:
            raise ValueError(f"num_start_points must be >= 1, got {num_start_points}")
        _, start_key = jax.random.split(key)
        start_indices = random_subsample(num_rows, min(num_start_points, num_rows), start_key)
    start_indices = _checked_start_indices(start_indices, num_rows)
    if total > padded_rows(num_rows, mesh):
        raise ValueError(
            f"projected has {total} rows, more than {num_rows} rows padded for the mesh "
            f"({padded_rows(num_rows, mesh)})"
        )
    return _greedy_selection(
        _rows_on_mesh(projected, mesh),
        None,
        replicate(start_indices.astype(np.int32), mesh),
        num_samples=int(num_samples),
        num_valid=num_rows,
        method=method,
        mesh=mesh,
        progress=progress,
        anchors=None if anchors is None else replicate(anchors, mesh),
    )


def _anchor_rows(selected_rows: np.ndarray | jax.Array, dim: int) -> np.ndarray:
    """``selected_rows`` [m, dim] as float32 host rows padded to whole projection chunks with
    copies of the first row (a copy changes no nearest distance)."""
    anchors = np.asarray(selected_rows, np.float32)
    if anchors.ndim != 2 or anchors.shape[0] < 1 or anchors.shape[1] != dim:
        raise ValueError(
            f"selected_rows must be a non-empty [m, D={dim}] array, got shape {anchors.shape}"
        )
    padding = -anchors.shape[0] % _CHUNK_ROWS
    return np.concatenate([anchors, np.repeat(anchors[:1], padding, axis=0)])


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
    method: str = "auto",
    progress: Callable[[int], None] | None = None,
    selected_rows: np.ndarray | jax.Array | None = None,
) -> jax.Array:
    """Indices of the approximate greedy coreset, in selection order (the paper's Algorithm 1).

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
      method: "pruned" skips, per step, the blocks of rows the new centre cannot change;
        "full" reads every row every step; both select the same indices. "auto": "pruned"
        when num_samples x N is at least ``_PRUNED_MIN_ROW_VISITS``, where it is faster.
      progress: called with the number of steps done after each chunk of steps (about a
        second of work); an exception it raises (e.g. KeyboardInterrupt) stops the selection.
      selected_rows: [m, D] rows already in the coreset (e.g. a fitted memory bank), to continue
        a selection: every row starts at its distance to the nearest of them (after the same
        projection) instead of the start points' mean, as if they had been selected before the
        first step; ``start_indices`` and ``num_start_points`` are then unused.

    Returns:
      [num_samples] int32 indices into ``features``, replicated over ``mesh`` (every process
      can read it with ``np.asarray``).
    """
    num_rows, dim = _check_features(features)
    if not 1 <= num_samples <= num_rows:
        raise ValueError(f"num_samples must be in [1, N={num_rows}], got {num_samples}")
    if method not in CORESET_METHODS:
        raise ValueError(f"method must be one of {CORESET_METHODS}, got {method!r}")
    method = resolve_method(method, num_samples, num_rows, dim)
    mesh = single_device_mesh() if mesh is None else mesh
    need_projection = projection is None and dim != projection_dim
    if key is None and (need_projection or (start_indices is None and selected_rows is None)):
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
        projection = projection_matrix(key, dim, projection_dim)
    anchors = None
    if selected_rows is not None:
        anchors = _anchor_rows(selected_rows, dim)
        start_indices = np.zeros((1,), np.int32)  # unused with anchors
    if start_indices is None:
        if num_start_points < 1:
            raise ValueError(f"num_start_points must be >= 1, got {num_start_points}")
        start_indices = random_subsample(num_rows, min(num_start_points, num_rows), start_key)
    start_indices = _checked_start_indices(start_indices, num_rows)
    return _greedy_selection(
        _rows_on_mesh(features, mesh),
        None if projection is None else replicate(projection, mesh),
        replicate(start_indices.astype(np.int32), mesh),
        num_samples=int(num_samples),
        num_valid=num_rows,
        method=method,
        mesh=mesh,
        progress=progress,
        anchors=None if anchors is None else replicate(anchors, mesh),
    )


# --------------------------------------------------------------------------- traceable


def traceable_greedy_coreset_on_shard(
    rows: jax.Array,
    num_samples: int,
    *,
    projection: jax.Array | None,
    start_indices: jax.Array,
    num_valid: int,
    method: str = "auto",
) -> jax.Array:
    """This device's part of ``traceable_greedy_coreset``, for your own ``jax.shard_map``.

    Call it inside ``jax.shard_map(..., check_vma=False)`` over a mesh whose axes include
    ``sharding.ALL_AXES``, with the rows split by ``P(ALL_AXES)`` (device i holds global rows
    ``i * n .. (i + 1) * n``). The same step functions as ``approximate_greedy_coreset``, in one
    ``fori_loop`` of ``num_samples`` steps: the same indices.

    Args:
      rows: [n, D] this device's rows of the [padded_rows(num_valid, mesh), D] rows (padded with
        any values at the end: rows at or past ``num_valid`` are never selected); n must be a
        multiple of ``_CHUNK_ROWS`` (256), the chunks the projection runs in.
      num_samples: static number of steps, 1 <= num_samples <= num_valid.
      projection: [p, D] replicated, or None (select on the rows as they are).
      start_indices: [s] int32 replicated distinct global rows below ``num_valid``.
      num_valid: static number of global rows that count (N).
      method: "full", "pruned" or "auto" (``resolve_method``); the same indices.

    Returns:
      [num_samples] int32 global indices in selection order, equal on every device.
    """
    num_local, dim = rows.shape
    if num_local % _CHUNK_ROWS:
        raise ValueError(
            f"rows per device must be a multiple of {_CHUNK_ROWS} (pad the [N, D] rows to "
            f"coreset.padded_rows(N, mesh)), got {num_local}"
        )
    if not 1 <= num_samples <= num_valid:
        raise ValueError(f"num_samples must be in [1, N={num_valid}], got {num_samples}")
    if method not in CORESET_METHODS:
        raise ValueError(f"method must be one of {CORESET_METHODS}, got {method!r}")
    init_on_shard, steps_on_shard = _METHODS[resolve_method(method, num_samples, num_valid, dim)]
    constants, carry = init_on_shard(
        rows, projection, start_indices.astype(jnp.int32), None, num_valid=num_valid
    )
    selected = jnp.zeros((num_samples,), jnp.int32)
    _, selected = steps_on_shard(constants, carry, selected, 0, num_samples)
    return selected


def traceable_greedy_coreset(
    features: jax.Array,
    num_samples: int,
    *,
    key: jax.Array | None = None,
    projection: jax.Array | None = None,
    start_indices: jax.Array | None = None,
    projection_dim: int = 128,
    num_start_points: int = 10,
    mesh: Mesh | None = None,
    method: str = "auto",
) -> jax.Array:
    """``approximate_greedy_coreset``'s indices as a pure function, for your own jitted programs.

    A fixed number of steps (``num_samples``, static) in one program: no progress callback, no
    host chunks, no Ctrl-C check, no host copies, so it can be traced by ``jax.jit`` (the
    selection then runs as one ``fori_loop``, O(N) memory). The arguments are
    ``approximate_greedy_coreset``'s; ``projection``, ``start_indices`` and ``key`` may be
    traced arrays, ``features`` a traced [N, D] array (N static). Inside your own
    ``shard_map`` use ``traceable_greedy_coreset_on_shard``.

    Returns:
      [num_samples] int32 indices into ``features``, in selection order.
    """
    num_rows, dim = _check_features(features)
    need_projection = projection is None and dim != projection_dim
    if key is None and (need_projection or start_indices is None):
        raise ValueError(
            "traceable_greedy_coreset needs `key` unless projection and start_indices are both "
            "given"
        )
    if projection is None and need_projection:
        projection = _drawn_projection(key, dim, projection_dim)
    if projection is not None and (projection.ndim != 2 or projection.shape[1] != dim):
        raise ValueError(f"projection must be [p, D={dim}], got shape {projection.shape}")
    if start_indices is None:
        if num_start_points < 1:
            raise ValueError(f"num_start_points must be >= 1, got {num_start_points}")
        _, start_key = jax.random.split(key)
        start_indices = random_subsample(num_rows, min(num_start_points, num_rows), start_key)
    mesh = single_device_mesh() if mesh is None else mesh
    rows = jnp.pad(features, ((0, padded_rows(num_rows, mesh) - num_rows), (0, 0)))
    on_shard = functools.partial(
        traceable_greedy_coreset_on_shard,
        num_samples=num_samples,
        num_valid=num_rows,
        method=method,
    )
    return jax.shard_map(
        lambda rows, projection, start_indices: on_shard(
            rows, projection=projection, start_indices=start_indices
        ),
        mesh=mesh,
        in_specs=(P(ALL_AXES, None), None if projection is None else P(), P()),
        out_specs=P(),
        check_vma=False,  # the indices come from all-gathered proposals: replicated
    )(rows, projection, jnp.asarray(start_indices))


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
    cross = jnp.dot(features, proxies.T, precision=HIGHEST)
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
    import optax  # only this sampler trains anything: other processes never import it

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


def select_rows(
    sampler: str,
    num_rows: int,
    fraction: float,
    *,
    key: jax.Array,
    greedy: Callable[[int], jax.Array],
) -> np.ndarray | None:
    """The one sampler dispatch: indices of the rows ``sampler`` keeps of ``num_rows``.

    ``identity``: every row; ``random``: ``random_subsample`` with ``key``;
    ``approx_greedy_coreset``: ``greedy(num_samples)`` (``approximate_greedy_coreset`` on the
    full rows, or ``greedy_coreset_from_projected`` on rows projected as they were embedded);
    ``learned_proxies``: None (no row is kept as it is: see ``learned_proxies``).
    ``num_samples`` is ``config.bank_rows(num_rows, sampler, fraction)``.
    Returns [num_samples] int64 host indices in selection order, or None.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    num_samples = bank_rows(num_rows, sampler, fraction)
    if sampler == "identity":
        return np.arange(num_rows, dtype=np.int64)
    if sampler == "random":
        return np.asarray(random_subsample(num_rows, num_samples, key)).astype(np.int64)
    if sampler == "approx_greedy_coreset":
        return np.asarray(greedy(num_samples)).astype(np.int64)
    return None


def build_memory_bank(
    features: np.ndarray | jax.Array,
    *,
    sampler: str,
    fraction: float,
    key: jax.Array,
    projection_dim: int = 128,
    num_start_points: int = 10,
    mesh: Mesh | None = None,
    coreset_method: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> jax.Array:
    """Subsamples all patch features into the memory bank: [N, D] -> [M, D] float32.

    Args:
      features: [N, D] patch features of the nominal images (see
        ``approximate_greedy_coreset`` for the accepted kinds of arrays).
      sampler: one of ``SAMPLERS``: "approx_greedy_coreset", "random", "identity" (all rows)
        or "learned_proxies".
      fraction: M = ``config.bank_rows(N, sampler, fraction)`` rows are kept; in (0, 1].
      key: seeds the sampler.
      projection_dim, num_start_points: greedy coreset settings.
      mesh: devices the greedy coreset runs on; default ``single_device_mesh()``.
      coreset_method, progress: greedy coreset ``method`` and ``progress`` (see
        ``approximate_greedy_coreset``).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if coreset_method not in CORESET_METHODS:
        raise ValueError(f"coreset_method must be one of {CORESET_METHODS}, got {coreset_method!r}")
    num_rows, _ = _check_features(features)

    def greedy(num_samples: int) -> jax.Array:
        return approximate_greedy_coreset(
            features,
            num_samples,
            key=key,
            projection_dim=projection_dim,
            num_start_points=num_start_points,
            mesh=mesh,
            method=coreset_method,
            progress=progress,
        )

    indices = select_rows(sampler, num_rows, fraction, key=key, greedy=greedy)
    if indices is None:
        return learned_proxies(features, bank_rows(num_rows, sampler, fraction), key=key)
    if isinstance(features, jax.Array) and not features.is_fully_addressable:
        mesh = single_device_mesh() if mesh is None else mesh
        return _take_rows(features, replicate(indices.astype(np.int32), mesh))
    if isinstance(features, jax.Array):
        return jnp.take(features, indices, axis=0).astype(jnp.float32)
    return jnp.asarray(np.asarray(features)[indices], jnp.float32)
