"""What the k-NN does with its candidates (device code): the exact re-ranking of the ``fast``
search's candidates and the certified search's candidate step, with the distance formula they
share with the scan (``squared_distances``).

The certified search keeps the ``C`` nearest groups of ``CANDIDATE_GROUP`` rows by low-rank
distance (``group_candidates``: a top-C over an eighth of the columns), re-ranks their nearest
rows exactly (``rerank``), recomputes the best ``k + RESCANNED`` in the scan's own arithmetic
(``rescan``) and proves per query that no other row is as near (``certified_candidates``, with
``candidates.proven_below``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from patchcore_jax.candidates import gamma, proven_below
from patchcore_jax.sharding import HIGHEST

CANDIDATE_GROUP = 8  # rows per group of the candidate searches (k = 1 fast, certified)
# Candidates the certified search rescans beyond k: the rest are compared with the k-th less two
# rounding margins (candidates.proven_below), which near ties cannot pass. 4, not 2: a quarter of
# the fallbacks of self-excluded WRN-50-2 bottle queries (benchmarks/results/certified_knn.md).
RESCANNED = 4
RESCAN_QUERIES = 64  # queries per batch of the re-ranking gathers and rescan matmuls


def clamp_distances(distances: jax.Array) -> jax.Array:
    """Rounding can make a distance slightly negative (or -0.0): clamp to +0. NaN -> +inf: it
    ranks behind every number (``nearest_neighbors_unchecked`` reports non-finite queries)."""
    return jnp.where(distances > 0.0, distances, jnp.where(jnp.isnan(distances), jnp.inf, 0.0))


def squared_distances(
    queries: jax.Array, query_norms: jax.Array, rows: jax.Array, row_norms: jax.Array
) -> jax.Array:
    """``[q, r]`` clamped squared distances ``(|q|^2 + |b|^2) - 2 q.b`` accumulated in float32.

    float32 ``rows`` (exact distances, or the low-rank ones) multiply at HIGHEST precision;
    bfloat16 ``queries`` and ``rows`` are the ``fast`` bfloat16 candidate search (the norms are
    the exact float32 ones).
    """
    precision = HIGHEST if rows.dtype == jnp.float32 else None
    products = jnp.dot(queries, rows.T, precision=precision, preferred_element_type=jnp.float32)
    return clamp_distances((query_norms[:, None] + row_norms[None, :]) - 2.0 * products)


def rerank(
    queries: jax.Array,
    query_norms: jax.Array,
    bank: jax.Array,
    bank_norms: jax.Array,
    candidate_distances: jax.Array,
    candidate_indices: jax.Array,
    row_offset: jax.Array | int,
    width: int,
) -> tuple[jax.Array, jax.Array]:
    """The ``width`` best of ``[q, C]`` candidates by exact float32 distances, sorted
    (distance, index).

    Each candidate's distance is recomputed in exact mode's formula, ``(|q|^2 + |b|^2) - 2 q.b``
    at HIGHEST precision, clamped (summed in another order than the scan's tiled matmul: equal
    to float32 rounding, ``rescan`` gives the scan's own). A candidate whose approximate
    distance is infinite (padding, an excluded row, an unfilled slot) stays infinite.
    ``candidate_indices`` are global; bank row ``j`` is global index ``row_offset + j``.
    The candidate rows are gathered ``RESCAN_QUERIES`` queries at a time
    (``gathered_products``).
    """
    local = jnp.clip(candidate_indices - row_offset, 0, bank.shape[0] - 1)
    products = gathered_products(queries, bank, local)
    distances = clamp_distances(
        (query_norms[:, None] + jnp.take(bank_norms, local)) - 2.0 * products
    )
    distances = jnp.where(jnp.isinf(candidate_distances), jnp.inf, distances)
    distances, indices = lax.sort((distances, candidate_indices), dimension=1, num_keys=2)
    return distances[:, :width], indices[:, :width]


def gathered_products(queries: jax.Array, rows: jax.Array, local: jax.Array) -> jax.Array:
    """``[q, c]``: ``queries[i] . rows[local[i, j]]`` at HIGHEST precision (``queries [q, d]``,
    ``rows [n, d]``, ``local [q, c]`` row numbers), the rows gathered ``RESCAN_QUERIES`` queries
    at a time: one ``[q, c, d]`` gather of a whole query tile runs ~10x slower on XLA CPU
    (measured; the same bits)."""

    def batch_products(batch):
        batch_queries, batch_rows = batch  # [t, d], [t, c]
        return jnp.einsum("qd,qcd->qc", batch_queries, rows[batch_rows], precision=HIGHEST)

    return in_query_batches(batch_products, (queries, local))


def in_query_batches(
    function: Callable[[tuple[jax.Array, ...]], jax.Array], arrays: tuple[jax.Array, ...]
) -> jax.Array:
    """``function`` over ``RESCAN_QUERIES`` queries at a time (``lax.map``) of the per-query
    ``arrays [q, ...]``, padded to a multiple of it: its ``[q, ...]`` results concatenated."""
    num_queries = arrays[0].shape[0]
    padded = -(-num_queries // RESCAN_QUERIES) * RESCAN_QUERIES

    def batches(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, padded - num_queries),) + ((0, 0),) * (x.ndim - 1))
        return x.reshape(padded // RESCAN_QUERIES, RESCAN_QUERIES, *x.shape[1:])

    results = lax.map(function, tuple(map(batches, arrays)))
    return results.reshape(padded, *results.shape[2:])[:num_queries]


def rescan(
    queries: jax.Array,
    query_norms: jax.Array,
    bank: jax.Array,
    bank_norms: jax.Array,
    distances: jax.Array,
    indices: jax.Array,
    row_offset: jax.Array | int,
    bank_tile: int,
) -> tuple[jax.Array, jax.Array]:
    """The scan's own float32 distances of ``queries [q, D]`` to their rows ``indices [q, w]``
    (global), sorted (distance, index); infinite ``distances`` stay infinite.

    By one ``squared_distances`` matmul per ``RESCAN_QUERIES`` queries, ``[RESCAN_QUERIES, D] x
    [D, w RESCAN_QUERIES + bank_tile % 64]`` (every query against its batch's rows of every
    slot; each query's own entries kept): XLA CPU sums a matmul's entries in one order for any
    shape of 2+ rows and the same column count modulo 64 (measured; tests check it): the scan's
    distances exactly.
    """
    width = indices.shape[1]
    local = jnp.clip(indices - row_offset, 0, bank.shape[0] - 1)
    extra = bank_tile % 64  # more columns, so that the column count matches the scan's mod 64

    def batch_distances(batch):
        batch_queries, batch_norms, batch_rows = batch  # [t, D], [t], [t, w]
        rows = jnp.pad(batch_rows.T.reshape(-1), (0, extra), mode="edge")  # slot-major
        products = squared_distances(batch_queries, batch_norms, bank[rows], bank_norms[rows])
        slots = products[:, : width * RESCAN_QUERIES].reshape(RESCAN_QUERIES, width, -1)
        return jnp.diagonal(slots, axis1=0, axis2=2).T  # [t, w]: query i, slot j, row (j, i)

    exact = in_query_batches(batch_distances, (queries, query_norms, local))
    exact = jnp.where(jnp.isinf(distances), jnp.inf, exact)
    return lax.sort((exact, indices), dimension=1, num_keys=2)


# ----------------------------------------------------------------------------------------------
# The certified search's candidate step


def group_candidates(
    queries: jax.Array,
    query_norms: jax.Array,
    query_images: jax.Array | None,
    rows: jax.Array,
    row_norms: jax.Array,
    row_images: jax.Array | None,
    row_offset: jax.Array | int,
    group_distances: jax.Array,
    group_starts: jax.Array,
    num_candidates: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The certified search's candidates from the ``[q, C]`` groups of ``CANDIDATE_GROUP`` rows
    with the nearest low-rank distances (``knn._scan`` ``"groups"``: their nearest distance and
    first global row): ``([q, C + 1] low-rank distances, [q, C + 1] indices)`` of the C + 1
    nearest of their ``8 C`` rows, and ``bound [q]``: no row that is not a candidate has a smaller
    low-rank distance (the C-th group's, for the rows of every other group; the (C + 1)-th of
    the ``8 C``, for the others of theirs). The C nearest rows are always among them.

    A top-C over groups costs an eighth of one over rows (the scan's largest cost on a CPU);
    the ``8 C`` rows' distances are recomputed here (``queries``/``rows``: low-rank, ``[q, r]``,
    ``[rows, r]`` with squared norms, inf on padding; the same-image exclusion as the scan's).
    """
    lanes = jnp.arange(CANDIDATE_GROUP, dtype=jnp.int32)
    indices = (group_starts[:, :, None] + lanes).reshape(group_starts.shape[0], -1)  # [q, 8 C]
    local = jnp.clip(indices - row_offset, 0, rows.shape[0] - 1)
    products = gathered_products(queries, rows, local)
    distances = clamp_distances((query_norms[:, None] + row_norms[local]) - 2.0 * products)
    unfilled = jnp.repeat(jnp.isinf(group_distances), CANDIDATE_GROUP, axis=1)
    distances = jnp.where(unfilled, jnp.inf, distances)
    if query_images is not None:
        distances = jnp.where(row_images[local] == query_images[:, None], jnp.inf, distances)
    # The C + 1 nearest, all of them: XLA CPU sorts all 8 C for a sliced top-k (~4x the time).
    nearest, positions = lax.top_k(-distances, num_candidates + 1)
    distances, indices = -nearest, jnp.take_along_axis(indices, positions, axis=1)
    return distances, indices, jnp.minimum(group_distances[:, -1], jnp.max(distances, axis=1))


def certified_candidates(
    queries: jax.Array,
    query_norms: jax.Array,
    bank: jax.Array,
    bank_norms: jax.Array,
    candidate_distances: jax.Array,
    candidate_indices: jax.Array,
    row_offset: jax.Array | int,
    k: int,
    bank_tile: int,
    bound: jax.Array,
    row_norms: tuple[jax.Array, jax.Array, jax.Array],
    rank: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """From ``[q, C]`` low-rank candidates (``bound [q]``: no other row's low-rank distance is
    smaller): ``([q, k] distances, [q, k] indices)`` in the scan's arithmetic, and ``[q]`` the
    k-th below which they are exact mode's (``proven_below``). Every candidate is re-ranked: the
    proof covers the candidates by their exact distances, every other row by ``bound``."""
    dim, num_candidates = queries.shape[1], candidate_indices.shape[1]
    args = (queries, query_norms, bank, bank_norms)
    reranked, ranked = rerank(
        *args, candidate_distances, candidate_indices, row_offset, num_candidates
    )
    width = min(num_candidates, k + RESCANNED)  # rescanned; the rest must be farther
    distances, indices = rescan(
        *args, reranked[:, :width], ranked[:, :width], row_offset, bank_tile
    )
    others = jnp.clip(ranked[:, width:] - row_offset, 0, bank.shape[0] - 1)
    other_norms = jnp.sqrt(bank_norms[others] * (1.0 + 2.0 * gamma(dim)))
    below = proven_below(reranked[:, width:], other_norms, bound, query_norms, row_norms, dim, rank)
    return distances[:, :k], indices[:, :k], below
