"""Scoring on the device (SPEC section 5): blocked k-NN, image scores, Eq. 7, anomaly maps.

The k-NN never holds more than one ``[query_tile, bank_tile]`` distance tile per device: query
blocks run in a ``lax.map``, and inside each the memory bank is scanned tile by tile keeping a
running top-k. Under a ``(data, bank)`` mesh, queries are split over ``data`` and bank rows over
``bank``; every device finds the k nearest rows of its bank shard and one ``all_gather`` over
``bank`` plus a final top-k gives the global answer. Padded queries are dropped, padded bank rows
get an infinite distance and are never matched. Ties go to the lowest bank index everywhere.

Non-finite values are never hidden: a NaN distance ranks behind every number (a NaN bank row is
never anyone's nearest neighbour), and a query with a NaN or infinite component gets NaN
distances (index ``_NO_INDEX``), so its patch and image scores are NaN rather than a plausible
number.

The ``fast`` precision (``precision="fast"``) keeps a running top-C instead (C candidates per
query, default ``max(4 k, 16)``) by approximate distances, and re-ranks the C candidates with
the exact float32 distances; the result is exact mode's whenever the true neighbours are
candidates. The approximate distances are either bfloat16 distance matmuls accumulated in
float32 (``candidate_search="bfloat16"``, for GPUs/TPUs) or low-rank ones
(``candidate_search="low-rank"``, for CPUs): ``|V^T q - V^T b|^2`` in float32 with ``V`` the
bank's top ``LOW_RANK_DIMS`` principal directions (``low_rank_search``, once per bank), a lower
bound of the true distance at ``r / D`` of the FLOPs. Everything after the k-NN is float32 in
both precisions.

Anomaly maps are linear and separable: upsampling then Gaussian blurring one axis is a single
static ``[out, grid]`` matrix, so a map is ``A_rows @ scores @ A_cols^T``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from patchcore_jax.config import DISTANCES, PRECISIONS
from patchcore_jax.features import bilinear_resize_matrix
from patchcore_jax.sharding import BANK_AXIS, DATA_AXIS, HIGHEST, single_device_mesh

CANDIDATE_SEARCHES = ("bfloat16", "low-rank")
LOW_RANK_DIMS = 128  # r of the low-rank candidate search (benchmarks/results/precision.md)
_NO_INDEX = np.iinfo(np.int32).max  # index of "no neighbour yet"; never survives a valid bank


class ScoreResult(NamedTuple):
    """Scores of a batch of images.

    Attributes:
      image_scores: ``[B] float32``, max patch score per image (Eq. 7-reweighted if asked).
      anomaly_maps: ``[B, H, W] float32``, upsampled and blurred patch scores.
      patch_scores: ``[B, P] float32``, mean distance to the k nearest bank rows.
      nearest_indices: ``[B, P, k] int32``, bank rows of those neighbours, nearest first.
    """

    image_scores: jax.Array
    anomaly_maps: jax.Array
    patch_scores: jax.Array
    nearest_indices: jax.Array


# ----------------------------------------------------------------------------------------------
# Blocked, sharded k-NN


def _tiling(num_rows: int, num_shards: int, block_size: int) -> tuple[int, int]:
    """``(tile, rows_per_shard)``: balanced tiles of at most ~``block_size`` rows per shard."""
    per_shard = max(1, -(-num_rows // num_shards))
    num_tiles = -(-per_shard // block_size)
    tile = -(-per_shard // num_tiles)
    tile = -(-tile // 8) * 8  # multiples of 8 keep the matmuls aligned
    return tile, num_tiles * tile


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


def _local_top_k(
    queries: jax.Array,
    bank: jax.Array,
    row_offset: jax.Array,
    num_valid: int,
    k: int,
    bank_tile: int,
    query_tile: int,
    num_candidates: int | None = None,
    search: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """k smallest squared distances of ``queries: [q, D]`` to ``bank: [r, D]`` (one shard).

    ``q`` and ``r`` are multiples of ``query_tile`` and ``bank_tile``. Bank row ``j`` has global
    index ``row_offset + j``; rows at or past ``num_valid`` are padding (infinite distance).
    ``num_candidates`` None is exact; an int C > k is the ``fast`` precision: the C best rows by
    bfloat16 distances (``search`` None) or by low-rank distances (``search`` = ``(basis [D, r],
    projected bank [r_rows, r])``, ``low_rank_search``) are re-ranked with exact ones
    (``_rerank``). Returns ``([q, k] float32, [q, k] int32)`` sorted by (distance, index).
    """
    if num_candidates is not None:
        return _local_top_k_fast(
            queries,
            bank,
            row_offset,
            num_valid,
            k,
            bank_tile,
            query_tile,
            num_candidates,
            search=search,
        )
    num_queries, dim = queries.shape
    num_tiles = bank.shape[0] // bank_tile
    global_rows = row_offset + jnp.arange(bank.shape[0], dtype=jnp.int32)
    bank_norms = jnp.where(global_rows < num_valid, jnp.sum(bank * bank, axis=1), jnp.inf)
    tiles = (
        bank.reshape(num_tiles, bank_tile, dim),
        bank_norms.reshape(num_tiles, bank_tile),
        global_rows.reshape(num_tiles, bank_tile),
    )

    def query_block(block: jax.Array) -> tuple[jax.Array, jax.Array]:
        query_norms = jnp.sum(block * block, axis=1)

        def bank_step(carry, tile):
            tile_rows, tile_norms, tile_indices = tile
            products = jnp.dot(block, tile_rows.T, precision=HIGHEST)
            distances = (query_norms[:, None] + tile_norms[None, :]) - 2.0 * products
            # Rounding can make a distance slightly negative (or -0.0): clamp to +0. A NaN one
            # ranks last (as +inf); ``_nearest_neighbors`` reports its query as NaN.
            distances = jnp.where(
                distances > 0.0, distances, jnp.where(jnp.isnan(distances), jnp.inf, 0.0)
            )
            indices = jnp.broadcast_to(tile_indices[None, :], distances.shape)
            return _merge_top_k(*carry, distances, indices), None

        init = (
            jnp.full((query_tile, k), jnp.inf, jnp.float32),
            jnp.full((query_tile, k), _NO_INDEX, jnp.int32),
        )
        best, _ = lax.scan(bank_step, init, tiles)
        return best

    blocks = queries.reshape(num_queries // query_tile, query_tile, dim)
    distances, indices = lax.map(query_block, blocks)
    return distances.reshape(num_queries, k), indices.reshape(num_queries, k)


def _clamp(distances: jax.Array) -> jax.Array:
    """Rounding can make a distance slightly negative (or -0.0): clamp to +0; NaN -> +inf."""
    return jnp.where(distances > 0.0, distances, jnp.where(jnp.isnan(distances), jnp.inf, 0.0))


def default_num_candidates(k: int) -> int:
    """Candidates per query of the ``fast`` k-NN when none are given: ``max(4 k, 16)``."""
    return max(4 * k, 16)


def _approximate_distances(
    queries_bf16: jax.Array, query_norms: jax.Array, rows_bf16: jax.Array, row_norms: jax.Array
) -> jax.Array:
    """``[q, r]`` squared distances from a bfloat16 matmul accumulated in float32 and the
    exact float32 norms (candidate search of the ``fast`` precision; clamped as exact ones)."""
    precision = HIGHEST if rows_bf16.dtype == jnp.float32 else None  # low-rank: float32
    products = jnp.dot(
        queries_bf16, rows_bf16.T, precision=precision, preferred_element_type=jnp.float32
    )
    return _clamp((query_norms[:, None] + row_norms[None, :]) - 2.0 * products)


def _rerank(
    queries: jax.Array,
    query_norms: jax.Array,
    bank: jax.Array,
    bank_norms: jax.Array,
    candidate_distances: jax.Array,
    candidate_indices: jax.Array,
    row_offset: jax.Array | int,
    k: int,
) -> tuple[jax.Array, jax.Array]:
    """The k best of ``[q, C]`` candidates by exact float32 distances, sorted (distance, index).

    Each candidate's distance is recomputed in exact mode's formula, ``(|q|^2 + |b|^2) - 2 q.b``
    at HIGHEST precision, clamped. A candidate whose approximate distance is infinite (padding,
    an excluded row, an unfilled slot) stays infinite. ``candidate_indices`` are global; bank
    row ``j`` is global index ``row_offset + j``.
    """
    local = jnp.clip(candidate_indices - row_offset, 0, bank.shape[0] - 1)
    rows = jnp.take(bank, local, axis=0)  # [q, C, D]
    products = jnp.einsum("qd,qcd->qc", queries, rows, precision=HIGHEST)
    distances = _clamp((query_norms[:, None] + jnp.take(bank_norms, local)) - 2.0 * products)
    distances = jnp.where(jnp.isinf(candidate_distances), jnp.inf, distances)
    distances, indices = lax.sort((distances, candidate_indices), dimension=1, num_keys=2)
    return distances[:, :k], indices[:, :k]


CANDIDATE_GROUP = 8  # rows per group of the fast k-NN's candidate search with k = 1


def _group_nearest(distances: jax.Array, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The nearest of each ``CANDIDATE_GROUP`` consecutive columns (lowest index on ties):
    ``[q, n]`` distances and indices -> ``[q, n / CANDIDATE_GROUP]`` each.

    The ``fast`` k-NN with k = 1 keeps its running top-C over these: a top-C over all columns
    (``lax.top_k``) costs several times the low-rank distances themselves on a CPU. A group
    drops only rows that are not its own nearest by approximate distance, which cannot be the
    one neighbour asked for unless the approximation reorders rows inside the group (measured:
    benchmarks/results/precision.md).
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


def _local_top_k_fast(
    queries: jax.Array,
    bank: jax.Array,
    row_offset: jax.Array,
    num_valid: int,
    k: int,
    bank_tile: int,
    query_tile: int,
    num_candidates: int,
    rerank: bool = True,
    search: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``_local_top_k`` of the ``fast`` precision: a running top-``num_candidates`` over
    approximate distance tiles, then ``_rerank`` with exact float32 distances (``rerank`` False:
    the ``[q, num_candidates]`` candidates themselves, with their approximate distances).

    ``search`` None: bfloat16 distances (full dimension, float32 accumulation). ``search`` =
    ``(basis [D, r], projected bank [rows, r])``: the low-rank distances ``|V^T q - V^T b|^2``
    in float32 (a lower bound of the true ones, ``r / D`` of the FLOPs; ``low_rank_search``).
    """
    num_queries, dim = queries.shape
    num_tiles = bank.shape[0] // bank_tile
    global_rows = row_offset + jnp.arange(bank.shape[0], dtype=jnp.int32)
    valid = global_rows < num_valid
    bank_norms = jnp.where(valid, jnp.sum(bank * bank, axis=1), jnp.inf)
    if search is None:
        basis, search_rows, search_norms = None, bank.astype(jnp.bfloat16), bank_norms
    else:
        basis, search_rows = search
        search_rows = search_rows.astype(jnp.float32)
        search_norms = jnp.where(valid, jnp.sum(search_rows * search_rows, axis=1), jnp.inf)
    tiles = (
        search_rows.reshape(num_tiles, bank_tile, search_rows.shape[1]),
        search_norms.reshape(num_tiles, bank_tile),
        global_rows.reshape(num_tiles, bank_tile),
    )

    def query_block(block: jax.Array) -> tuple[jax.Array, jax.Array]:
        query_norms = jnp.sum(block * block, axis=1)
        if basis is None:
            block_search, block_norms = block.astype(jnp.bfloat16), query_norms
        else:
            block_search = jnp.dot(block, basis, precision=HIGHEST)
            block_norms = jnp.sum(block_search * block_search, axis=1)

        def bank_step(carry, tile):
            tile_rows, tile_norms, tile_indices = tile
            distances = _approximate_distances(block_search, block_norms, tile_rows, tile_norms)
            indices = jnp.broadcast_to(tile_indices[None, :], distances.shape)
            if k == 1:  # each group of rows proposes its nearest: a top-C over 1/8 the values
                distances, indices = _group_nearest(distances, indices)
            return _merge_top_k(*carry, distances, indices), None

        init = (
            jnp.full((query_tile, num_candidates), jnp.inf, jnp.float32),
            jnp.full((query_tile, num_candidates), _NO_INDEX, jnp.int32),
        )
        candidates, _ = lax.scan(bank_step, init, tiles)
        if not rerank:
            return candidates
        return _rerank(block, query_norms, bank, bank_norms, *candidates, row_offset, k)

    width = k if rerank else num_candidates
    blocks = queries.reshape(num_queries // query_tile, query_tile, dim)
    distances, indices = lax.map(query_block, blocks)
    return distances.reshape(num_queries, width), indices.reshape(num_queries, width)


def low_rank_basis(memory_bank: np.ndarray | jax.Array, dims: int = LOW_RANK_DIMS) -> np.ndarray:
    """``V: [D, min(dims, D)] float32``, orthonormal: the bank's top principal directions.

    Host numpy float64 and deterministic: eigenvectors of the centred covariance by descending
    eigenvalue (``eigh``), each signed so that its largest-magnitude component is positive.
    """
    bank = np.asarray(memory_bank, np.float64)
    if bank.ndim != 2 or bank.shape[0] < 1:
        raise ValueError(f"memory_bank must be [M >= 1, D], got shape {bank.shape}")
    if not (isinstance(dims, int) and dims >= 1):
        raise ValueError(f"dims must be a positive integer, got {dims!r}")
    centred = bank - bank.mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    basis = vectors[:, ::-1][:, : min(dims, bank.shape[1])]
    pivots = np.argmax(np.abs(basis), axis=0)
    signs = np.sign(basis[pivots, np.arange(basis.shape[1])])
    return (basis * np.where(signs == 0, 1.0, signs)).astype(np.float32)


@jax.jit
def project_bank(memory_bank: jax.Array, basis: jax.Array) -> jax.Array:
    """``[M, r] float32``: the memory bank in the low-rank basis (``memory_bank @ basis``)."""
    return jnp.dot(memory_bank.astype(jnp.float32), basis, precision=HIGHEST)


def low_rank_search(
    memory_bank: np.ndarray | jax.Array, dims: int = LOW_RANK_DIMS
) -> tuple[jax.Array, jax.Array]:
    """``(basis [D, r], projected bank [M, r])``, the per-bank arrays of the low-rank candidate
    search (``candidate_search="low-rank"``): computed once per memory bank."""
    basis = jnp.asarray(low_rank_basis(memory_bank, dims))
    return basis, project_bank(jnp.asarray(memory_bank, jnp.float32), basis)


def default_candidate_search(platform: str) -> str:
    """The ``fast`` k-NN's candidate search on ``platform``: ``low-rank`` on ``cpu`` (where
    XLA runs bfloat16 matmuls no faster than float32), ``bfloat16`` elsewhere (GPU/TPU)."""
    return "low-rank" if platform == "cpu" else "bfloat16"


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
    distances, indices = _local_top_k_fast(
        queries,
        bank,
        0,
        num_bank,
        k,
        bank_tile,
        query_tile,
        num_candidates,
        rerank=False,
        search=search,
    )
    return distances[:num_queries], indices[:num_queries]


def _nearest_neighbors(
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
) -> tuple[jax.Array, jax.Array]:
    """Traceable body of ``nearest_neighbors`` (arguments already validated); ``num_candidates``
    None is the exact k-NN, an int the ``fast`` one with that many candidates per query, found
    by bfloat16 distances (``search`` None) or low-rank ones (``search`` = ``(basis [D, r],
    projected bank [M, r])``, split over ``bank`` like the bank). ``num_valid`` (a scalar,
    traced): bank rows at or past it are padding (a bank padded to a bucketed size, so that
    banks of nearby sizes share one compiled program); default all."""
    num_queries, num_bank = queries.shape[0], memory_bank.shape[0]
    valid_rows = num_bank if num_valid is None else num_valid
    data_shards, bank_shards = mesh.shape[DATA_AXIS], mesh.shape[BANK_AXIS]
    query_tile, queries_per_shard = _tiling(num_queries, data_shards, query_block_size)
    bank_tile, rows_per_shard = _tiling(num_bank, bank_shards, bank_block_size)
    queries = jnp.pad(queries, ((0, data_shards * queries_per_shard - num_queries), (0, 0)))
    bank_padding = ((0, bank_shards * rows_per_shard - num_bank), (0, 0))
    memory_bank = jnp.pad(memory_bank, bank_padding)
    if num_candidates is None:
        search = None
    if search is not None:
        search = (search[0].astype(jnp.float32), jnp.pad(search[1], bank_padding))

    def shard_top_k(local_queries: jax.Array, local_bank: jax.Array, local_search):
        row_offset = lax.axis_index(BANK_AXIS).astype(jnp.int32) * rows_per_shard
        distances, indices = _local_top_k(
            local_queries,
            local_bank,
            row_offset,
            valid_rows,
            k,
            bank_tile,
            query_tile,
            num_candidates,
            local_search,
        )
        # Shards are gathered in order, so lower positions hold lower global indices.
        distances = lax.all_gather(distances, BANK_AXIS, axis=1, tiled=True)
        indices = lax.all_gather(indices, BANK_AXIS, axis=1, tiled=True)
        _, positions = lax.top_k(-distances, k)
        return (
            jnp.take_along_axis(distances, positions, axis=1),
            jnp.take_along_axis(indices, positions, axis=1),
        )

    distances, indices = jax.shard_map(
        shard_top_k,
        mesh=mesh,
        in_specs=(P(DATA_AXIS), P(BANK_AXIS), None if search is None else (P(), P(BANK_AXIS))),
        out_specs=(P(DATA_AXIS), P(DATA_AXIS)),
        # After the all_gather + top-k every bank shard holds the same result; the replication
        # checker cannot infer that through all_gather, so it is turned off.
        check_vma=False,
    )(queries, memory_bank, search)
    distances, indices = distances[:num_queries], indices[:num_queries]
    # A non-finite query, or a slot no finite distance filled, is NaN (not inf, never 0).
    unknown = (indices == _NO_INDEX) | ~jnp.all(jnp.isfinite(queries[:num_queries]), axis=1)[
        :, None
    ]
    distances = jnp.where(unknown, jnp.nan, distances)
    return (distances if squared else jnp.sqrt(distances)), indices


_nearest_neighbors_jit = jax.jit(
    _nearest_neighbors,
    static_argnames=(
        "k",
        "squared",
        "bank_block_size",
        "query_block_size",
        "mesh",
        "num_candidates",
    ),
)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_rows(name: str, array: jax.Array, dim: int | None = None) -> None:
    if array.ndim != 2 or array.shape[0] < 1 or (dim is not None and array.shape[1] != dim):
        expected = f"[N, {dim}]" if dim is not None else "[N, D] with N >= 1"
        raise ValueError(f"{name} must be {expected}, got shape {array.shape}")


def candidates_for(precision: str, k: int, num_candidates: int | None = None) -> int | None:
    """The static candidate count of the k-NN: None for ``exact``, for ``fast``
    ``num_candidates`` (an integer >= k) or ``default_num_candidates(k)``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    integer = isinstance(num_candidates, int) and not isinstance(num_candidates, bool)
    if num_candidates is not None and (not integer or num_candidates < k):
        raise ValueError(f"num_candidates must be an integer >= k = {k}, got {num_candidates!r}")
    if precision == "exact":
        return None
    return default_num_candidates(k) if num_candidates is None else num_candidates


def search_arrays(
    precision: str,
    candidate_search: str,
    memory_bank: jax.Array | np.ndarray,
    search: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array] | None:
    """The per-bank arrays of the k-NN's candidate search: None for ``exact`` or the
    ``bfloat16`` search; for ``low-rank`` ``search`` if given, else ``low_rank_search`` of the
    (concrete) ``memory_bank``."""
    if candidate_search not in CANDIDATE_SEARCHES:
        raise ValueError(
            f"candidate_search must be one of {CANDIDATE_SEARCHES}, got {candidate_search!r}"
        )
    if precision == "exact" or candidate_search == "bfloat16":
        return None
    if search is not None:
        return search
    if isinstance(memory_bank, jax.core.Tracer):
        raise ValueError(
            "candidate_search='low-rank' inside a traced program needs its per-bank arrays: "
            "pass search=scoring.low_rank_search(memory_bank) computed outside"
        )
    return low_rank_search(memory_bank)


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
) -> tuple[jax.Array, jax.Array]:
    """Exact k nearest memory-bank rows of each query, in bounded memory, sharded over ``mesh``.

    Distances are ``max(|q|^2 + |b|^2 - 2 q.b, 0)`` in float32 (HIGHEST precision), square-rooted
    when ``squared`` is False. Ties go to the lowest bank index. NaN distances rank last; a query
    with a non-finite component gets NaN distances and index ``2**31 - 1``.

    With ``precision="fast"`` each query's ``num_candidates`` (default ``max(4 k, 16)``) best
    rows are found with bfloat16 distance matmuls (float32 accumulation), then re-ranked with
    the exact float32 distances above: whenever the true neighbours are among the candidates
    the result is exact mode's (distances to float32 rounding); otherwise a near neighbour
    with its exact distance. ``candidate_search="low-rank"`` finds the candidates instead by
    float32 distances in the bank's top ``LOW_RANK_DIMS`` principal directions (a lower bound
    of the true distance at ``r / D`` of the FLOPs; the CPU choice): ``search`` =
    ``low_rank_search(memory_bank)``, computed here when not given.

    Args:
      queries: ``[Q, D] float32``.
      memory_bank: ``[M, D] float32``, ``M >= k``.
      k: neighbours per query.
      squared: squared Euclidean (the reference's faiss output) or Euclidean distances.
      bank_block_size: bank rows per distance tile (per device).
      query_block_size: query rows per distance tile (per device).
      mesh: ``(data, bank)`` mesh (``sharding.make_mesh``); None means one device.

    Returns:
      ``distances: [Q, k] float32`` ascending and ``indices: [Q, k] int32`` into ``memory_bank``.
    """
    queries = jnp.asarray(queries, jnp.float32)
    memory_bank = jnp.asarray(memory_bank, jnp.float32)
    _check_rows("memory_bank", memory_bank)
    _check_rows("queries", queries, memory_bank.shape[1])
    _check_positive(k=k, bank_block_size=bank_block_size, query_block_size=query_block_size)
    if k > memory_bank.shape[0]:
        raise ValueError(f"k={k} exceeds the memory bank size {memory_bank.shape[0]}")
    return _nearest_neighbors_jit(
        queries,
        memory_bank,
        k=k,
        squared=bool(squared),
        bank_block_size=bank_block_size,
        query_block_size=query_block_size,
        mesh=single_device_mesh() if mesh is None else mesh,
        num_candidates=candidates_for(precision, k, num_candidates),
        search=search_arrays(precision, candidate_search, memory_bank, search),
    )


# ----------------------------------------------------------------------------------------------
# Image-score reweighting (paper Eq. 7)


def _euclidean(a: jax.Array, b: jax.Array) -> jax.Array:
    """Euclidean distance over the last axis, from the difference (accurate near 0)."""
    return jnp.sqrt(jnp.sum(jnp.square(a - b), axis=-1))


def _reweighted_image_scores(
    patch_features: jax.Array,
    memory_bank: jax.Array,
    patch_scores: jax.Array,
    nearest_indices: jax.Array,
    reweight_neighbors: int,
    bank_block_size: int,
    query_block_size: int,
    mesh: Mesh,
    num_valid: jax.Array | None = None,
) -> jax.Array:
    """Eq. 7: ``s = (1 - exp d(m_test*, m*) / sum_{m in N_b(m*)} exp d(m_test*, m)) * s*``.

    ``m_test*`` is each image's highest-scoring patch (first on ties), ``m*`` its nearest bank
    row and ``d`` the Euclidean distance. ``N_b(m*)`` is m* together with its ``b - 1`` nearest
    other bank rows (the paper's "b nearest patch-features in M for m*", whose first is m* itself
    at distance 0); m* is always in the sum, so the weight lies in [0, 1). The ratio is evaluated
    as ``exp(d* - logsumexp(d))``, finite for any distances.

    ``patch_features: [B, P, D]``, ``patch_scores: [B, P]``, ``nearest_indices: [B, P]`` -> ``[B]``.
    """
    batch = patch_features.shape[0]
    images = jnp.arange(batch)
    top_patch = jnp.argmax(patch_scores, axis=1)
    top_scores = patch_scores[images, top_patch]  # s*
    test_features = patch_features[images, top_patch]  # m_test*: [B, D]
    star_index = nearest_indices[images, top_patch]  # m*: [B]
    star_features = memory_bank[star_index]
    support_size = reweight_neighbors  # 2 <= b <= M (checked by score_patch_features)
    _, support = _nearest_neighbors(
        star_features,
        memory_bank,
        support_size,
        True,
        bank_block_size,
        query_block_size,
        mesh,
        num_valid=num_valid,
    )  # [B, b], m* first unless it has exact duplicates of lower index
    is_star = support == star_index[:, None]
    # Keep b - 1 others: drop m* itself, or the farthest one if m* was displaced by duplicates.
    last = jnp.arange(support_size) == support_size - 1
    dropped = is_star | (~jnp.any(is_star, axis=1, keepdims=True) & last[None, :])
    star_distance = _euclidean(test_features, star_features)  # [B]
    support_distances = _euclidean(test_features[:, None, :], memory_bank[support])  # [B, b]
    logits = jnp.concatenate(
        [star_distance[:, None], jnp.where(dropped, -jnp.inf, support_distances)], axis=1
    )
    log_ratio = star_distance - jax.nn.logsumexp(logits, axis=1)
    log_ratio = jnp.where(log_ratio > 0.0, 0.0, log_ratio)  # min(., 0) that keeps NaN
    weights = -jnp.expm1(log_ratio)  # 1 - exp(log_ratio), in [0, 1)
    return weights * top_scores


# ----------------------------------------------------------------------------------------------
# Anomaly maps


def gaussian_blur_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """``G: [size, size] float64`` with ``G @ x == scipy.ndimage.gaussian_filter1d(x, sigma)``.

    scipy semantics: kernel radius ``int(truncate * sigma + 0.5)``, normalised Gaussian weights,
    mode ``reflect`` (half-sample symmetric, repeated for kernels wider than the input).
    ``sigma == 0`` is the identity.
    """
    if size < 1 or sigma < 0:
        raise ValueError(f"size must be positive and sigma non-negative, got {size}, {sigma}")
    radius = int(truncate * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 / float(sigma) ** 2 * offsets**2) if radius else np.ones(1)
    kernel = kernel / kernel.sum()
    sources = np.arange(size)[:, None] + offsets[None, :]
    sources = np.mod(sources, 2 * size)
    sources = np.where(sources >= size, 2 * size - 1 - sources, sources)
    matrix = np.zeros((size, size), dtype=np.float64)
    np.add.at(
        matrix, (np.repeat(np.arange(size), len(offsets)), sources.ravel()), np.tile(kernel, size)
    )
    return matrix


def anomaly_map_matrix(grid_size: int, out_size: int, sigma: float) -> np.ndarray:
    """``[out_size, grid_size] float32``: bilinear upsampling then Gaussian blur along one axis."""
    upsample = bilinear_resize_matrix(grid_size, out_size).astype(np.float64)
    return (gaussian_blur_matrix(out_size, sigma) @ upsample).astype(np.float32)


def anomaly_maps(patch_scores: jax.Array, out_shape: tuple[int, int], sigma: float) -> jax.Array:
    """Pixel maps ``[B, H, W]`` from grid scores ``[B, h, w]``.

    Bilinear upsampling (align_corners=False) to ``out_shape`` followed by
    ``scipy.ndimage.gaussian_filter(sigma)`` per image, as two static matrices.
    """
    rows = jnp.asarray(anomaly_map_matrix(patch_scores.shape[1], out_shape[0], sigma))
    cols = jnp.asarray(anomaly_map_matrix(patch_scores.shape[2], out_shape[1], sigma))
    maps = jnp.einsum("Hh,bhw->bHw", rows, patch_scores, precision=HIGHEST)
    return jnp.einsum("bHw,Ww->bHW", maps, cols, precision=HIGHEST)


# ----------------------------------------------------------------------------------------------
# Everything together


@functools.partial(
    jax.jit,
    static_argnames=(
        "grid_shape",
        "out_shape",
        "num_neighbors",
        "squared",
        "reweight",
        "reweight_neighbors",
        "sigma",
        "bank_block_size",
        "query_block_size",
        "mesh",
        "num_candidates",
    ),
)
def _score_patch_features(
    patch_features: jax.Array,
    memory_bank: jax.Array,
    grid_shape: tuple[int, int],
    out_shape: tuple[int, int],
    num_neighbors: int,
    squared: bool,
    reweight: bool,
    reweight_neighbors: int,
    sigma: float,
    bank_block_size: int,
    query_block_size: int,
    mesh: Mesh,
    num_candidates: int | None = None,
    num_valid: jax.Array | None = None,
    search: tuple[jax.Array, jax.Array] | None = None,
) -> ScoreResult:
    batch, num_patches, dim = patch_features.shape
    distances, indices = _nearest_neighbors(
        patch_features.reshape(batch * num_patches, dim),
        memory_bank,
        num_neighbors,
        squared,
        bank_block_size,
        query_block_size,
        mesh,
        num_candidates,
        num_valid,
        search,
    )
    return scores_from_neighbors(
        patch_features,
        memory_bank,
        distances,
        indices,
        grid_shape=grid_shape,
        out_shape=out_shape,
        reweight=reweight,
        reweight_neighbors=reweight_neighbors,
        sigma=sigma,
        bank_block_size=bank_block_size,
        query_block_size=query_block_size,
        mesh=mesh,
        num_valid=num_valid,
    )


def scores_from_neighbors(
    patch_features: jax.Array,
    memory_bank: jax.Array,
    distances: jax.Array,
    indices: jax.Array,
    *,
    grid_shape: tuple[int, int],
    out_shape: tuple[int, int],
    reweight: bool,
    reweight_neighbors: int,
    sigma: float,
    bank_block_size: int,
    query_block_size: int,
    mesh: Mesh,
    num_valid: jax.Array | None = None,
) -> ScoreResult:
    """Patch scores, image scores (Eq. 7 with ``reweight``) and anomaly maps from the k nearest
    neighbours of every patch: ``distances``/``indices`` ``[B * P, k]`` of ``patch_features``
    ``[B, P, D]`` in ``memory_bank`` (the one place both scoring and calibration finish in);
    bank rows at or past ``num_valid`` are padding."""
    batch, num_patches, _ = patch_features.shape
    num_neighbors = distances.shape[-1]
    patch_scores = distances.mean(axis=1).reshape(batch, num_patches)
    nearest_indices = indices.reshape(batch, num_patches, num_neighbors)
    if reweight:
        image_scores = _reweighted_image_scores(
            patch_features.astype(jnp.float32),
            memory_bank.astype(jnp.float32),
            patch_scores,
            nearest_indices[..., 0],
            reweight_neighbors,
            bank_block_size,
            query_block_size,
            mesh,
            num_valid,
        )
    else:
        image_scores = patch_scores.max(axis=1)
    maps = anomaly_maps(patch_scores.reshape(batch, *grid_shape), out_shape, sigma)
    return ScoreResult(image_scores, maps, patch_scores, nearest_indices)


def score_patch_features(
    patch_features: jax.Array,
    memory_bank: jax.Array,
    grid_shape: tuple[int, int],
    out_shape: tuple[int, int],
    *,
    num_neighbors: int = 1,
    distance: str = "squared_l2",
    reweight: bool = False,
    reweight_neighbors: int = 9,
    sigma: float = 4.0,
    bank_block_size: int = 4096,
    query_block_size: int = 1024,
    mesh: Mesh | None = None,
    precision: str = "exact",
    num_candidates: int | None = None,
    num_valid: int | jax.Array | None = None,
    candidate_search: str = "bfloat16",
    search: tuple[jax.Array, jax.Array] | None = None,
) -> ScoreResult:
    """Patch scores, image scores and anomaly maps of a batch against a memory bank.

    Args:
      patch_features: ``[B, P, D] float32``, patches row-major over ``grid_shape``.
      memory_bank: ``[M, D] float32``.
      grid_shape: ``(h, w)`` patch grid, ``h * w == P``.
      out_shape: ``(H, W)`` of the anomaly maps (the crop size).
      num_neighbors: k; a patch score is the mean of its k distances.
      distance: ``squared_l2`` (reference) or ``l2``.
      reweight: replace each image score by the paper's Eq. 7 reweighted score.
      reweight_neighbors: b of Eq. 7, in ``[2, M]``; the weights use Euclidean distances
        whatever ``distance`` is (as the paper).
      sigma: Gaussian blur of the maps in pixels (0: none).
      bank_block_size, query_block_size: k-NN tile sizes per device.
      mesh: ``(data, bank)`` mesh; None means one device.
      precision: ``exact`` or ``fast`` (bfloat16 k-NN candidates re-ranked in float32, see
        ``nearest_neighbors``); Eq. 7 and the maps are float32 either way.
      num_candidates: candidates per query of the ``fast`` k-NN (default ``max(4 k, 16)``).
      num_valid: the bank's first ``num_valid`` rows are used, the rest is padding (never a
        neighbour): an int, or a traced int32 scalar so that banks padded to one bucketed size
        share a compiled program (``PatchCore`` does this). Default: every row.
      candidate_search: how the ``fast`` k-NN finds its candidates: ``bfloat16`` (full
        dimension; GPUs/TPUs) or ``low-rank`` (the bank's top principal directions; CPUs).
      search: the low-rank search's per-bank arrays, ``low_rank_search(memory_bank)``
        (computed here when not given and the bank is concrete).

    Returns:
      ``ScoreResult`` (compiled once per shape and option set).
    """
    patch_features = jnp.asarray(patch_features, jnp.float32)
    memory_bank = jnp.asarray(memory_bank, jnp.float32)
    if patch_features.ndim != 3:
        raise ValueError(f"patch_features must be [B, P, D], got shape {patch_features.shape}")
    _check_rows("memory_bank", memory_bank, patch_features.shape[2])
    grid_shape, out_shape = tuple(int(s) for s in grid_shape), tuple(int(s) for s in out_shape)
    if len(grid_shape) != 2 or math.prod(grid_shape) != patch_features.shape[1]:
        raise ValueError(
            f"grid_shape {grid_shape} must be (h, w) with h * w == P = {patch_features.shape[1]}"
        )
    if len(out_shape) != 2 or min(out_shape) < 1:
        raise ValueError(f"out_shape must be (H, W) of positive sizes, got {out_shape}")
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    _check_positive(
        num_neighbors=num_neighbors,
        reweight_neighbors=reweight_neighbors,
        bank_block_size=bank_block_size,
        query_block_size=query_block_size,
    )
    bank_size = memory_bank.shape[0]
    if isinstance(num_valid, int | np.integer):
        if not 1 <= num_valid <= bank_size:
            raise ValueError(f"num_valid must be in [1, {bank_size}], got {num_valid}")
        bank_size = int(num_valid)
    if num_neighbors > bank_size:
        raise ValueError(f"num_neighbors={num_neighbors} exceeds the memory bank size {bank_size}")
    if reweight and not 2 <= reweight_neighbors <= bank_size:
        raise ValueError(
            f"reweight_neighbors={reweight_neighbors} (b of Eq. 7) must be in "
            f"[2, memory bank size {bank_size}]: N_b(m*) holds m* and b - 1 others"
        )
    if not sigma >= 0:
        raise ValueError(f"sigma must be non-negative, got {sigma!r}")
    return _score_patch_features(
        patch_features,
        memory_bank,
        grid_shape=grid_shape,
        out_shape=out_shape,
        num_neighbors=num_neighbors,
        squared=distance == "squared_l2",
        reweight=bool(reweight),
        reweight_neighbors=reweight_neighbors,
        sigma=float(sigma),
        bank_block_size=bank_block_size,
        query_block_size=query_block_size,
        mesh=single_device_mesh() if mesh is None else mesh,
        num_candidates=candidates_for(precision, num_neighbors, num_candidates),
        num_valid=None if num_valid is None else jnp.asarray(num_valid, jnp.int32),
        search=search_arrays(precision, candidate_search, memory_bank, search),
    )
