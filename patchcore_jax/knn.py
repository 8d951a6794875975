"""The blocked, sharded k-nearest-neighbour search of the memory bank (device code).

Every k-NN of the package runs through ``_local_top_k``: scoring, the Eq. 7 support of
scoring, the self-excluded calibration (scoring with a same-image exclusion) and the ``fast``
candidates. It never holds more than one ``[query_tile, bank_tile]`` distance tile per device:
query blocks run in a ``lax.map``, and inside each the memory bank is scanned tile by tile
keeping a running top-k. Under a ``(data, bank)`` mesh, queries are split over ``data`` and bank
rows over ``bank``; every device finds the k nearest rows of its bank shard and one
``all_gather`` over ``bank`` plus a final top-k gives the global answer. Padded queries are
dropped, padded bank rows get an infinite distance and are never matched. Ties go to the lowest
bank index everywhere.

Same-image exclusion: given an image id per query and a source-image id per bank row, a row
whose source is the query's own image gets an infinite distance (never a neighbour).

Padding queries (``valid_queries`` False: a batch's padded images) are answered NaN with no
index, never fall back, and a query tile of padding only is not computed (``lax.cond``): a
partly filled last batch costs what it holds, with one compiled program for every batch.

Non-finite values are never hidden (one rule, with or without exclusion): a NaN distance ranks
behind every number (a NaN bank row is never anyone's nearest neighbour), and a query with a NaN
or infinite component, or a neighbour slot no finite distance filled, gets a NaN distance (the
slot's index is ``2**31 - 1``), so its patch and image scores are NaN rather than a plausible
number.

The ``fast`` precision keeps a running top-C instead (C candidates per query, default
``max(4 k, 16)``) by approximate distances, and re-ranks the C candidates with the exact float32
distances; the result is exact mode's whenever the true neighbours are candidates. The
approximate distances are either bfloat16 distance matmuls accumulated in float32
(``candidate_search="bfloat16"``, for GPUs/TPUs) or low-rank ones
(``candidate_search="low-rank"``, for CPUs): ``|V^T q - V^T b|^2`` in float32 with ``V`` the
bank's top ``LOW_RANK_DIMS`` principal directions (``low_rank_search``, once per bank), a lower
bound of the true distance at ``r / D`` of the FLOPs.

The certified search (``exact`` with ``candidate_search="low-rank"``): exact mode's answer
bit for bit from the C nearest groups of rows by low-rank distance, re-ranked, rescanned in the
scan's arithmetic, with a proof per query that no other row is as near (``reranking``; per
shard, against the k-th over all shards). Queries without one (non-finite ones always) fall back
to the full scan (``candidates.fall_back``), reported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from patchcore_jax import reranking
from patchcore_jax.candidates import (  # noqa: F401 (re-exported: the k-NN's options)
    LOW_RANK_DIMS,
    candidates_for,
    check_image_ids,
    check_positive_integers,
    check_rows,
    fall_back,
    gamma,
    low_rank_search,
    norm_levels,
    proven_below,
    search_arrays,
)
from patchcore_jax.reranking import CANDIDATE_GROUP
from patchcore_jax.sharding import BANK_AXIS, DATA_AXIS, HIGHEST, single_device_mesh

CERTIFIED_MIN_ROWS = 4096  # bank rows per shard from which certifying is faster (measured)
_NO_INDEX = np.iinfo(np.int32).max  # index of "no neighbour yet"; never survives a valid bank
# Image ids of padded queries / bank rows: never equal, so padding never excludes anything.
_PADDED_QUERY, _PADDED_ROW = -2, -1

# ----------------------------------------------------------------------------------------------
# Tiles, distances, merges


def _tiling(num_rows: int, num_shards: int, block_size: int) -> tuple[int, int]:
    """``(tile, rows_per_shard)``: balanced tiles of at most ~``block_size`` rows per shard.

    A symbolic ``num_rows`` (an exported program's batch dimension, images x patches) gets the
    largest multiple of 8 up to ``block_size`` that divides it whatever the batch (no padding
    rows: e.g. 784 for 28 x 28 patches an image), else ``block_size`` rounded up to one.
    """
    per_shard = max(1, -(-num_rows // num_shards))
    if not isinstance(per_shard, int):
        divisors = (t for t in range(block_size // 8 * 8, 7, -8) if per_shard % t == 0)
        tile = next(divisors, -(-block_size // 8) * 8)
        return tile, -(-per_shard // tile) * tile
    num_tiles = -(-per_shard // block_size)
    tile = -(-per_shard // num_tiles)
    tile = -(-tile // 8) * 8  # multiples of 8 keep the matmuls aligned
    return tile, num_tiles * tile


def tiled_rows(num_rows: int, num_shards: int, block_size: int) -> int:
    """Rows to place a bank of ``num_rows`` rows at (padding past ``num_valid``) so that the
    k-NN scans it as it is, in the tiles it gives ``num_rows`` rows: banks placed once at this
    size are not copied per call to be padded. ``num_rows`` itself where the padded size would
    be tiled otherwise (a ``block_size`` that is not a multiple of 8 can be exceeded)."""
    tiling = _tiling(num_rows, num_shards, block_size)
    padded = num_shards * tiling[1]
    return padded if _tiling(padded, num_shards, block_size) == tiling else num_rows


def _merge_top_k(
    best_distances: jax.Array, best_indices: jax.Array, distances: jax.Array, indices: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Top-k (smallest) of two candidate sets ``[q, n1]``, ``[q, n2]``; the first set wins ties.

    Every index of the first set is lower than every index of the second, and each set is sorted
    by (distance, index), so ``lax.top_k``'s lower-position-first rule gives lowest-index ties.
    """
    k = best_distances.shape[1]
    if k == 1:
        # Two plain reductions (min, then the lowest index at the min) run faster on XLA CPU
        # than argmin's variadic reduction.
        tile_distances = jnp.min(distances, axis=1, keepdims=True)
        at_min = distances == tile_distances
        tile_indices = jnp.min(jnp.where(at_min, indices, _NO_INDEX), axis=1, keepdims=True)
        better = tile_distances < best_distances
        return (
            jnp.where(better, tile_distances, best_distances),
            jnp.where(better, tile_indices, best_indices),
        )
    candidates = jnp.concatenate([best_distances, distances], axis=1)
    candidate_indices = jnp.concatenate([best_indices, indices], axis=1)
    _, positions = lax.top_k(-candidates, k)
    return (
        jnp.take_along_axis(candidates, positions, axis=1),
        jnp.take_along_axis(candidate_indices, positions, axis=1),
    )


def _group_nearest(distances: jax.Array, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The nearest of each ``CANDIDATE_GROUP`` consecutive columns (lowest index on ties):
    ``[q, n]`` distances and indices -> ``[q, n / CANDIDATE_GROUP]`` each.

    The ``fast`` k-NN with k = 1 keeps its running top-C over these: a top-C over all columns
    (``lax.top_k``) costs several times the low-rank distances themselves on a CPU. A group
    drops only rows that are not its own nearest by approximate distance, which cannot be the
    one neighbour asked for unless the approximation reorders rows inside the group (measured:
    benchmarks/results/precision.md). The certified search keeps whole groups instead
    (``reranking.group_candidates``): a proof needs every row's bound.
    """
    queries, columns = distances.shape
    shape = (queries, columns // CANDIDATE_GROUP, CANDIDATE_GROUP)
    grouped = distances.reshape(shape)
    nearest = jnp.min(grouped, axis=2)
    # Lowest position at the minimum (two plain reductions: faster than argmin on XLA CPU).
    lane = jnp.arange(CANDIDATE_GROUP, dtype=jnp.int32)
    position = jnp.min(jnp.where(grouped == nearest[..., None], lane, CANDIDATE_GROUP), axis=2)
    position = jnp.minimum(position, CANDIDATE_GROUP - 1)  # all-NaN group: its first row
    chosen = jnp.take_along_axis(indices.reshape(shape), position[..., None], axis=2)[..., 0]
    return nearest, chosen


def _scan(
    queries: jax.Array,
    query_norms: jax.Array,
    query_images: jax.Array | None,
    tiles: tuple[jax.Array, ...],
    width: int,
    grouped: str | None,
) -> tuple[jax.Array, jax.Array]:
    """Running top-``width`` of ``queries [q, d]`` over the bank ``tiles`` (rows, norms, global
    indices[, images], each ``[num_tiles, tile, ...]``): ``([q, width] distances, [q, width]
    indices)``; over each ``CANDIDATE_GROUP``'s nearest row (``grouped="nearest"``) or each
    group's nearest distance and first row (``"groups"``, ``reranking.group_candidates``).

    Grouped columns are an eighth of a tile's, so up to ``CANDIDATE_GROUP`` tiles (a divisor of
    their number) are merged at once, their distances and indices in no more memory than one
    tile's distances and indices: XLA CPU's top-k
    costs mostly per row and call (measured: one merge of 5 tiles' groups ~6% of a certified
    search faster than 5 merges; the same top-k, since every merge keeps lowest-index ties).
    """

    def tile_columns(tile: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        tile_rows, tile_norms, tile_indices, *tile_images = tile
        distances = reranking.squared_distances(queries, query_norms, tile_rows, tile_norms)
        if query_images is not None:
            same_image = query_images[:, None] == tile_images[0][None, :]
            distances = jnp.where(same_image, jnp.inf, distances)
        indices = jnp.broadcast_to(tile_indices[None, :], distances.shape)
        if grouped == "nearest":  # each group proposes its nearest: a top-C over 1/8 of them
            return _group_nearest(distances, indices)
        if grouped == "groups":
            groups = distances.reshape(distances.shape[0], -1, CANDIDATE_GROUP)
            return jnp.min(groups, axis=2), indices[:, ::CANDIDATE_GROUP]
        return distances, indices

    def merged_tiles(carry, merged):  # merged: [per_merge, tile, ...] each
        if per_merge == 1:
            return _merge_top_k(*carry, *tile_columns(tuple(x[0] for x in merged))), None
        columns = lax.map(tile_columns, merged)  # ([per_merge, q, c], [per_merge, q, c])
        distances, indices = (jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1) for x in columns)
        return _merge_top_k(*carry, distances, indices), None

    num_queries, num_tiles = queries.shape[0], tiles[0].shape[0]
    per_merge = 1
    if grouped is not None:
        per_merge = max(n for n in range(1, CANDIDATE_GROUP + 1) if num_tiles % n == 0)
    init = (
        jnp.full((num_queries, width), jnp.inf, jnp.float32),
        jnp.full((num_queries, width), _NO_INDEX, jnp.int32),
    )
    merges = tuple(x.reshape(num_tiles // per_merge, per_merge, *x.shape[1:]) for x in tiles)
    best, _ = lax.scan(merged_tiles, init, merges)
    return best


def _bank_tiles(
    bank: jax.Array,
    row_offset: jax.Array | int,
    num_valid: jax.Array | int,
    bank_tile: int,
    search: tuple[jax.Array, jax.Array] | None,
    bank_images: jax.Array | None,
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """One bank shard ``[r, D]`` as ``_local_top_k`` scans it: ``(squared norms [r], inf on
    padding rows; valid [r] bool; exact tiles; search tiles)``, tiles being ``_scan``'s (rows,
    norms, global indices[, images], each ``[r // bank_tile, bank_tile, ...]``), the search's
    rows bfloat16 (``search`` None) or low-rank (``search[1]``)."""
    global_rows = row_offset + jnp.arange(bank.shape[0], dtype=jnp.int32)
    valid = global_rows < num_valid
    bank_norms = jnp.where(valid, jnp.sum(bank * bank, axis=1), jnp.inf)
    search_rows, search_norms = bank.astype(jnp.bfloat16), bank_norms
    if search is not None:
        search_rows = search[1].astype(jnp.float32)
        search_norms = jnp.where(valid, jnp.sum(search_rows * search_rows, axis=1), jnp.inf)

    def tiled(*arrays: jax.Array) -> tuple[jax.Array, ...]:
        arrays += (global_rows, *([] if bank_images is None else [bank_images]))
        return tuple(x.reshape(-1, bank_tile, *x.shape[1:]) for x in arrays)

    return bank_norms, valid, tiled(bank, bank_norms), tiled(search_rows, search_norms)


def _local_top_k(
    queries: jax.Array,
    bank: jax.Array,
    row_offset: jax.Array | int,
    num_valid: jax.Array | int,
    k: int,
    bank_tile: int,
    query_tile: int,
    num_candidates: int | None = None,
    search: tuple[jax.Array, jax.Array] | None = None,
    query_images: jax.Array | None = None,
    bank_images: jax.Array | None = None,
    rerank: bool = True,
    certify: bool = False,
    shards: tuple[Callable[..., tuple[jax.Array, jax.Array]], Callable[..., jax.Array]]
    | None = None,
    valid_queries: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """k smallest squared distances of ``queries: [q, D]`` to ``bank: [r, D]`` (one shard).

    ``q`` and ``r`` are multiples of ``query_tile`` and ``bank_tile``. Bank row ``j`` has global
    index ``row_offset + j``; rows at or past ``num_valid`` are padding (infinite distance).
    ``query_images: [q]`` and ``bank_images: [r]`` int32 (both or neither): a row whose source
    image is the query's own gets an infinite distance.

    ``num_candidates`` None is exact; an int C >= k is the ``fast`` precision: a running top-C
    by bfloat16 distances (``search`` None) or by low-rank ones (``search`` = ``(basis [D, r],
    projected bank [rows, r])``, ``low_rank_search``), then ``rerank`` with exact ones
    (``rerank`` False: the ``[q, C]`` candidates themselves, with their approximate distances).
    ``certify`` (low-rank search): the certified search, exact mode's answer (see the
    module docstring); under a bank mesh ``shards`` = ``(top k over all shards of this shard's
    [q, k] answer, "or" of a [q] bool over all shards)``. ``valid_queries [q]`` bool (or None:
    all): a query tile of padding only is skipped (infinite distances, no index). Returns
    ``([q, k] float32, [q, k] int32)`` sorted by (distance, index) and ``[q]`` bool: the query
    fell back to the full scan (never a padding query).
    """
    num_queries, dim = queries.shape
    fast, exclude = num_candidates is not None, query_images is not None
    search = search if fast else None
    basis = None if search is None else search[0].astype(jnp.float32)
    prepared = _bank_tiles(bank, row_offset, num_valid, bank_tile, search, bank_images)
    bank_norms, valid, exact_tiles, search_tiles = prepared
    row_norms = norm_levels(bank_norms, valid, dim) if certify else None
    search_rows = (
        search_tiles[0].reshape(-1, search_tiles[0].shape[-1]),
        search_tiles[1].reshape(-1),
        bank_images,
    )

    def exact_scan(block_queries, query_norms, block_images):
        return _scan(block_queries, query_norms, block_images, exact_tiles, k, None)

    def query_block(block: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        block_queries, *block_images = block  # block_images: [[query_tile]] or []
        images = block_images[0] if exclude else None
        query_norms = jnp.sum(block_queries * block_queries, axis=1)
        no_fallback = jnp.zeros(query_tile, jnp.float32)  # thresholds: unused
        if not fast:
            return *exact_scan(block_queries, query_norms, images), no_fallback, query_norms
        block_search, block_norms = block_queries.astype(jnp.bfloat16), query_norms
        if basis is not None:
            block_search = jnp.dot(block_queries, basis, precision=HIGHEST)
            block_norms = jnp.sum(block_search * block_search, axis=1)
        grouped = "groups" if certify else "nearest" if k == 1 else None
        best = _scan(block_search, block_norms, images, search_tiles, num_candidates, grouped)
        if not rerank:
            return *best, no_fallback, query_norms
        if certify:
            searched = (block_search, block_norms, images, *search_rows, row_offset)
            best = reranking.group_candidates(*searched, *best, num_candidates)
        args = (block_queries, query_norms, bank, bank_norms, *best[:2], row_offset)
        if not certify:
            return *reranking.rerank(*args, k), no_fallback, query_norms
        thresholds = (best[2], row_norms, basis.shape[1])
        certified = reranking.certified_candidates(*args, k, bank_tile, *thresholds)
        return *certified, query_norms

    out_width = num_candidates if fast and not rerank else k
    blocks = (queries,) + ((query_images,) if exclude else ())
    answers = _map_query_tiles(query_block, blocks, valid_queries, query_tile, out_width)
    distances, indices, thresholds, query_norms = answers
    if not certify:
        return distances, indices, jnp.zeros(num_queries, bool)
    arguments = (queries, query_norms, query_images)
    return _proven_or_scanned(
        distances, indices, thresholds, exact_scan, arguments, shards, valid_queries
    )


def _map_query_tiles(
    query_block: Callable[[tuple[jax.Array, ...]], tuple[jax.Array, ...]],
    arrays: tuple[jax.Array, ...],
    valid_queries: jax.Array | None,
    query_tile: int,
    width: int,
) -> tuple[jax.Array, ...]:
    """``query_block`` over the tiles of ``query_tile`` rows of the per-query ``arrays [q, ...]``
    (``lax.map``): ``([q, width] distances, [q, width] indices, [q] thresholds, [q] query
    norms)``. A tile without a ``valid_queries`` query is not computed (``lax.cond``): infinite
    distances, no index, an infinite threshold (``_proven_or_scanned`` masks it)."""

    def tile(x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0] // query_tile, query_tile, *x.shape[1:])

    def padding_block(block: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        return (
            jnp.full((query_tile, width), jnp.inf, jnp.float32),
            jnp.full((query_tile, width), _NO_INDEX, jnp.int32),
            jnp.full(query_tile, jnp.inf, jnp.float32),
            jnp.zeros(query_tile, jnp.float32),
        )

    if valid_queries is None:
        answers = lax.map(query_block, tuple(map(tile, arrays)))
    else:
        answers = lax.map(
            lambda block: lax.cond(jnp.any(block[-1]), query_block, padding_block, block[:-1]),
            tuple(map(tile, (*arrays, valid_queries))),
        )
    distances, indices, thresholds, query_norms = answers
    num_queries = arrays[0].shape[0]
    return (
        distances.reshape(num_queries, width),
        indices.reshape(num_queries, width),
        thresholds.reshape(num_queries),
        query_norms.reshape(num_queries),
    )


def _proven_or_scanned(
    distances: jax.Array,
    indices: jax.Array,
    thresholds: jax.Array,
    exact_scan: Callable[..., tuple[jax.Array, jax.Array]],
    arguments: tuple[jax.Array | None, ...],
    shards: tuple[Callable[..., tuple[jax.Array, jax.Array]], Callable[..., jax.Array]] | None,
    valid_queries: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The certified answer ``[q, k]`` where the k-th over every shard (this shard's on one)
    is below the shard's ``thresholds [q]`` on every shard, elsewhere ``exact_scan``'s
    (``candidates.fall_back``); and ``[q]`` bool, the queries that fell back (``valid_queries``
    only, if given: padding never does)."""
    kth = (distances if shards is None else shards[0](distances, indices)[0])[:, -1]
    fallbacks = ~(kth < thresholds)
    if valid_queries is not None:
        fallbacks &= valid_queries
    if shards is not None:
        fallbacks = shards[1](fallbacks)
    distances, indices = fall_back(~fallbacks, distances, indices, exact_scan, arguments)
    return distances, indices, fallbacks


# ----------------------------------------------------------------------------------------------
# Sharded over a (data, bank) mesh


def _gathered_top_k(
    distances: jax.Array, indices: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
    """The top k over every bank shard of each shard's ``[q, k]`` answer (inside shard_map)."""
    # Shards are gathered in order, so lower positions hold lower global indices.
    distances = lax.all_gather(distances, BANK_AXIS, axis=1, tiled=True)
    indices = lax.all_gather(indices, BANK_AXIS, axis=1, tiled=True)
    _, positions = lax.top_k(-distances, k)
    return (
        jnp.take_along_axis(distances, positions, axis=1),
        jnp.take_along_axis(indices, positions, axis=1),
    )


def nearest_neighbors_unchecked(
    queries: jax.Array,
    memory_bank: jax.Array,
    k: int,
    squared: bool,
    bank_block_size: int,
    query_block_size: int,
    mesh: Mesh,
    num_candidates: int | None = None,
    num_valid: jax.Array | None = None,
    search: tuple[jax.Array, jax.Array] | None = None,
    query_images: jax.Array | None = None,
    bank_images: jax.Array | None = None,
    certified: bool = False,
    valid_queries: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``nearest_neighbors`` without its checks, for use inside traced programs (scoring).

    ``num_candidates`` None is the exact k-NN, an int the ``fast`` one with that many
    candidates per query, found by bfloat16 distances (``search`` None) or low-rank ones
    (``search`` = ``(basis [D, r], projected bank [M, r])``, split over ``bank`` like the
    bank). ``num_valid`` (a scalar, traced): bank rows at or past it are padding (a bank padded
    to a bucketed size, so that banks of nearby sizes share one compiled program); default all.
    ``query_images: [Q]``, ``bank_images: [M]`` int32: the same-image exclusion (split like the
    queries and the bank). ``certified`` with low-rank ``search``: the certified search (plain
    exact, the same answer, under 64-row tiles, ``CERTIFIED_MIN_ROWS`` rows per shard or a
    symbolic ``Q``: measured slower there). ``valid_queries: [Q]`` bool (None: all): False
    marks padding (a padded image's patches), answered NaN with no index and never scanned in a
    query tile of padding only. Returns ``([Q, k] distances, [Q, k] indices, [Q] bool: fell
    back to the full scan on a shard, or None: not certified)``.
    """
    num_queries, num_bank = queries.shape[0], memory_bank.shape[0]
    valid_rows = num_bank if num_valid is None else num_valid
    data_shards, bank_shards = mesh.shape[DATA_AXIS], mesh.shape[BANK_AXIS]
    query_tile, queries_per_shard = _tiling(num_queries, data_shards, query_block_size)
    bank_tile, rows_per_shard = _tiling(num_bank, bank_shards, bank_block_size)
    query_padding = (0, data_shards * queries_per_shard - num_queries)
    bank_padding = (0, bank_shards * rows_per_shard - num_bank)
    queries = jnp.pad(queries, (query_padding, (0, 0)))
    memory_bank = jnp.pad(memory_bank, (bank_padding, (0, 0)))
    big = bank_tile >= 64 and rows_per_shard >= CERTIFIED_MIN_ROWS  # symbolic batch: plain
    certify = certified and search is not None and big and isinstance(num_queries, int)
    num_candidates = None if certified and not certify else num_candidates  # plain: too small
    searched = num_candidates is not None and search is not None
    search = (search[0], jnp.pad(search[1], (bank_padding, (0, 0)))) if searched else None
    images = None
    if query_images is not None:
        images = (
            jnp.pad(query_images.astype(jnp.int32), query_padding, constant_values=_PADDED_QUERY),
            jnp.pad(bank_images.astype(jnp.int32), bank_padding, constant_values=_PADDED_ROW),
        )
    # The static padding is padding too: a tile of it is skipped.
    valid = None if valid_queries is None else jnp.pad(valid_queries.astype(bool), query_padding)

    def shard_top_k(local_queries, local_bank, local_search, local_images, local_valid):
        row_offset = lax.axis_index(BANK_AXIS).astype(jnp.int32) * rows_per_shard
        distances, indices, fallbacks = _local_top_k(
            local_queries,
            local_bank,
            row_offset,
            valid_rows,
            k,
            bank_tile,
            query_tile,
            num_candidates,
            local_search,
            *(local_images or (None, None)),
            certify=certify,
            shards=(
                lambda distances, indices: _gathered_top_k(distances, indices, k),
                lambda flags: lax.psum(flags.astype(jnp.int32), BANK_AXIS) > 0,
            ),
            valid_queries=local_valid,
        )
        return *_gathered_top_k(distances, indices, k), fallbacks

    distances, indices, fallbacks = jax.shard_map(
        shard_top_k,
        mesh=mesh,
        in_specs=(
            P(DATA_AXIS),
            P(BANK_AXIS),
            None if search is None else (P(), P(BANK_AXIS)),
            None if images is None else (P(DATA_AXIS), P(BANK_AXIS)),
            None if valid is None else P(DATA_AXIS),
        ),
        out_specs=(P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS)),
        # After the all_gather + top-k every bank shard holds the same result; the replication
        # checker cannot infer that through all_gather, so it is turned off.
        check_vma=False,
    )(queries, memory_bank, search, images, valid)
    distances, indices = _reported(distances, indices, queries, valid, num_queries)
    fallbacks = fallbacks[:num_queries] if certify else None
    return (distances if squared else jnp.sqrt(distances)), indices, fallbacks


def _reported(
    distances: jax.Array,
    indices: jax.Array,
    queries: jax.Array,
    valid: jax.Array | None,
    num_queries: int,
) -> tuple[jax.Array, jax.Array]:
    """The first ``num_queries`` answers as ``nearest_neighbors`` reports them: a non-finite
    query, or a slot no finite distance filled, is NaN (not inf, never 0); padding (``valid``
    False) has no neighbour."""
    distances, indices = distances[:num_queries], indices[:num_queries]
    finite_queries = jnp.all(jnp.isfinite(queries[:num_queries]), axis=1)
    if valid is not None:
        indices = jnp.where(valid[:num_queries, None], indices, _NO_INDEX)
    unknown = (indices == _NO_INDEX) | ~finite_queries[:, None]
    return jnp.where(unknown, jnp.nan, distances), indices


_nearest_neighbors_jit = jax.jit(
    nearest_neighbors_unchecked,
    static_argnames=(
        "k",
        "squared",
        "bank_block_size",
        "query_block_size",
        "mesh",
        "num_candidates",
        "certified",
    ),
)

# ----------------------------------------------------------------------------------------------
# Public entry points


@functools.partial(
    jax.jit, static_argnames=("num_candidates", "bank_block_size", "query_block_size", "k")
)
def fast_candidates(
    queries: jax.Array,
    memory_bank: jax.Array,
    num_candidates: int,
    bank_block_size: int = 4096,
    query_block_size: int = 1024,
    search: tuple[jax.Array, jax.Array] | None = None,
    k: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """The candidates the ``fast`` k-NN with ``k`` neighbours re-ranks (one device): ``([Q, C]
    approximate squared distances, [Q, C] int32 indices)``, sorted by approximate distance;
    ``search`` None for the bfloat16 search, ``low_rank_search(memory_bank)`` for the low-rank
    one. For tests and benchmarks (is the exact neighbour among them?)."""
    num_queries, num_bank = queries.shape[0], memory_bank.shape[0]
    query_tile, query_rows = _tiling(num_queries, 1, query_block_size)
    bank_tile, bank_rows = _tiling(num_bank, 1, bank_block_size)
    queries = jnp.pad(jnp.asarray(queries, jnp.float32), ((0, query_rows - num_queries), (0, 0)))
    bank = jnp.pad(jnp.asarray(memory_bank, jnp.float32), ((0, bank_rows - num_bank), (0, 0)))
    if search is not None:
        search = (search[0], jnp.pad(search[1], ((0, bank_rows - num_bank), (0, 0))))
    distances, indices, _ = _local_top_k(
        queries,
        bank,
        0,
        num_bank,
        k,
        bank_tile,
        query_tile,
        num_candidates,
        search,
        rerank=False,
    )
    return distances[:num_queries], indices[:num_queries]


def nearest_neighbors(
    queries: jax.Array,
    memory_bank: jax.Array,
    k: int = 1,
    *,
    squared: bool = True,
    bank_block_size: int = 4096,
    query_block_size: int = 1024,
    mesh: Mesh | None = None,
    precision: str = "exact",
    num_candidates: int | None = None,
    candidate_search: str = "bfloat16",
    search: tuple[jax.Array, jax.Array] | None = None,
    query_images: jax.Array | np.ndarray | None = None,
    bank_images: jax.Array | np.ndarray | None = None,
    with_fallbacks: bool = False,
) -> tuple[jax.Array, ...]:
    """Exact k nearest memory-bank rows of each query, in bounded memory, sharded over ``mesh``.

    Distances are ``max(|q|^2 + |b|^2 - 2 q.b, 0)`` in float32 (HIGHEST precision), square-rooted
    when ``squared`` is False. Ties go to the lowest bank index. NaN distances rank last; a query
    with a non-finite component, or a slot left without a finite neighbour, gets NaN distances
    and index ``2**31 - 1``.

    With ``precision="fast"`` each query's ``num_candidates`` (default ``max(4 k, 16)``) best
    rows are found with bfloat16 distance matmuls (float32 accumulation), then re-ranked with
    the exact float32 distances above: whenever the true neighbours are among the candidates
    the result is exact mode's (distances to float32 rounding); otherwise a near neighbour
    with its exact distance. ``candidate_search="low-rank"`` finds the candidates instead by
    float32 distances in the bank's top ``LOW_RANK_DIMS`` principal directions (a lower bound
    of the true distance at ``r / D`` of the FLOPs; the CPU choice): ``search`` =
    ``low_rank_search(memory_bank)``, computed here when not given.

    With ``precision="exact"`` and ``candidate_search="low-rank"`` the answer is exact mode's
    (the same indices and distances) from the certified search: low-rank candidates
    (``num_candidates``, default ``max(4 k, 24)``), re-ranked, a proof that no other row can
    be nearer, and the full scan for the queries without one.

    Args:
      queries: ``[Q, D] float32``.
      memory_bank: ``[M, D] float32``, ``M >= k``.
      k: neighbours per query.
      squared: squared Euclidean (the reference's faiss output) or Euclidean distances.
      bank_block_size: bank rows per distance tile (per device).
      query_block_size: query rows per distance tile (per device).
      mesh: ``(data, bank)`` mesh (``sharding.make_mesh``); None means one device.
      query_images, bank_images: ``[Q]`` and ``[M]`` int32, or both None: a bank row whose
        image id equals the query's is never its neighbour (the same-image exclusion).

      with_fallbacks: also return ``[Q]`` bool: the certified search fell back to the full
        scan for the query (None where no certified search ran).

    Returns:
      ``distances: [Q, k] float32`` ascending and ``indices: [Q, k] int32`` into ``memory_bank``.
    """
    queries = jnp.asarray(queries, jnp.float32)
    memory_bank = jnp.asarray(memory_bank, jnp.float32)
    check_rows("memory_bank", memory_bank)
    check_rows("queries", queries, memory_bank.shape[1])
    check_positive_integers(k=k, bank_block_size=bank_block_size, query_block_size=query_block_size)
    check_image_ids(query_images, bank_images, queries.shape[0], memory_bank.shape[0])
    if k > memory_bank.shape[0]:
        raise ValueError(f"k={k} exceeds the memory bank size {memory_bank.shape[0]}")
    candidates = candidates_for(precision, k, num_candidates, candidate_search)
    result = _nearest_neighbors_jit(
        queries,
        memory_bank,
        k=k,
        squared=bool(squared),
        bank_block_size=bank_block_size,
        query_block_size=query_block_size,
        mesh=single_device_mesh() if mesh is None else mesh,
        num_candidates=candidates,
        search=search_arrays(precision, candidate_search, memory_bank, search),
        query_images=query_images,
        bank_images=bank_images,
        certified=precision == "exact" and candidates is not None,
    )
    return result if with_fallbacks else result[:2]
