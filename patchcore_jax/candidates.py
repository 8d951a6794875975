"""The k-NN's candidate searches (device code, but the basis): their options, the low-rank
search's per-bank arrays, what the low-rank distance proves, the certified search's
fallback where it proves nothing, and the k-NN's argument checks.

The bank's top ``LOW_RANK_DIMS`` principal directions ``V`` (orthonormal) give a distance
``|V^T q - V^T b|^2`` at ``r / D`` of the FLOPs that is a lower bound of the true squared
distance: the ``fast`` k-NN finds its candidates with it, and the certified k-NN (``knn``)
proves its answer exact with it. The proof needs float32 rounding margins, derived here once:
``squared_distance_margin`` (the exact formula), ``low_rank_lower_bound`` (the low-rank
distance), ``proven_below`` (the certificate of one shard's answer).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from patchcore_jax.config import PRECISIONS

CANDIDATE_SEARCHES: tuple[str, ...] = ("bfloat16", "low-rank")
# Least C of the certified search: 24 rather than 32 costs more fallbacks (self-excluded WRN-50-2
# bottle queries: 122 against 65 of 6,272) and less time in all (benchmarks/certified_knn.py).
CERTIFIED_CANDIDATES = 24
# Uncertified queries rescanned at a time: a batch's last chunk is half empty on average, and
# 64-row matmuls still run at the full rate on a CPU (benchmarks/results/certified_knn.md).
FALLBACK_QUERIES = 64
LOW_RANK_DIMS = 128  # r of the low-rank candidate search (benchmarks/results/precision.md)
UNIT_ROUNDOFF = 2.0**-24  # float32: |fl(x) - x| <= u |x|
UNIT_ROUNDOFF_FLOAT64 = 2.0**-53  # the projected bank's sums (``project_bank``)
_FLOAT64_ROWS = 4096  # bank rows per float64 chunk (covariance, projection) on the host


def low_rank_basis(memory_bank: np.ndarray | jax.Array, dims: int = LOW_RANK_DIMS) -> np.ndarray:
    """``V: [D, min(dims, D)] float32``, orthonormal: the bank's top principal directions.

    Host numpy float64 and deterministic: eigenvectors of the centred covariance of the finite
    rows (a NaN row is never a neighbour) by descending eigenvalue (``eigh``), each signed so
    that its largest-magnitude component is positive.
    """
    bank = np.asarray(memory_bank)  # float64 only a chunk at a time
    if bank.ndim != 2 or bank.shape[0] < 1:
        raise ValueError(f"memory_bank must be [M >= 1, D], got shape {bank.shape}")
    finite = np.all(np.isfinite(bank), axis=1)
    if not finite.all():
        bank = bank[finite] if finite.any() else np.zeros_like(bank[:1])
    if not (isinstance(dims, int) and dims >= 1):
        raise ValueError(f"dims must be a positive integer, got {dims!r}")
    # The covariance summed over row chunks: float64 copies of a whole bank cost more (page
    # faults of two bank-sized allocations) than the product itself.
    mean = bank.mean(axis=0, dtype=np.float64)
    covariance = np.zeros((bank.shape[1], bank.shape[1]))
    for start in range(0, bank.shape[0], _FLOAT64_ROWS):
        centred = bank[start : start + _FLOAT64_ROWS].astype(np.float64) - mean
        covariance += centred.T @ centred
    _, vectors = np.linalg.eigh(covariance)
    basis = vectors[:, ::-1][:, : min(dims, bank.shape[1])]
    pivots = np.argmax(np.abs(basis), axis=0)
    signs = np.sign(basis[pivots, np.arange(basis.shape[1])])
    return (basis * np.where(signs == 0, 1.0, signs)).astype(np.float32)


def project_bank(memory_bank: np.ndarray | jax.Array, basis: np.ndarray) -> np.ndarray:
    """``[M, r] float32``: the memory bank in the low-rank basis, ``memory_bank @ basis``
    summed in float64 on the host and rounded once: within 2 u of the exact product (u the
    float32 unit roundoff, ``low_rank_lower_bound``), where a float32 sum of D terms is only
    within gamma_D (once per bank, ~0.1 s for 16k rows of 1,024)."""
    bank, basis = np.asarray(memory_bank), np.asarray(basis, np.float64)
    projected = np.empty((bank.shape[0], basis.shape[1]), np.float32)
    for start in range(0, bank.shape[0], _FLOAT64_ROWS):
        chunk = bank[start : start + _FLOAT64_ROWS].astype(np.float64)
        projected[start : start + _FLOAT64_ROWS] = chunk @ basis
    return projected


def low_rank_search(
    memory_bank: np.ndarray | jax.Array, dims: int = LOW_RANK_DIMS
) -> tuple[jax.Array, jax.Array]:
    """``(basis [D, r], projected bank [M, r])``, the per-bank arrays of the low-rank candidate
    search (``candidate_search="low-rank"``): computed once per memory bank, on the host."""
    basis = low_rank_basis(memory_bank, dims)
    return jnp.asarray(basis), jnp.asarray(project_bank(memory_bank, basis))


# ----------------------------------------------------------------------------------------------
# The certificate of the certified search


def squared_distance_margin(query_norms: jax.Array, row_norm: jax.Array, dim: int) -> jax.Array:
    """``[q]``: a bound on ``|computed - exact|`` of every float32 squared distance
    ``(|q|^2 + |b|^2) - 2 q.b`` (clamped at 0, summed in any order) of queries with Euclidean
    norms ``query_norms [q]`` to rows of norm at most ``row_norm``, in ``dim`` dimensions.

    Derivation (u = 2^-24, gamma_n = n u / (1 - n u), Higham): each of the three D-term sums
    is within gamma_D of the sum of its terms' magnitudes (|q|^2, |b|^2, sum |q_i b_i| <=
    |q| |b|), and the two additions round once more each, so the error is at most
    gamma_{D+2} (|q| + |b|)^2; the clamp only moves a value towards the exact one (>= 0).
    A further 32 u (|q| + R)^2 covers the float32 evaluation of this bound and of the
    comparisons it enters (a few roundings of quantities <= (|q| + R)^2).
    """
    scale = jnp.square(query_norms + row_norm)
    return (gamma(dim + 2) + 32 * UNIT_ROUNDOFF) * scale


def low_rank_lower_bound(
    low_rank_distances: jax.Array,
    query_norms: jax.Array,
    row_norm: jax.Array,
    dim: int,
    rank: int,
) -> jax.Array:
    """``[q]``: a lower bound on the exact squared distance of a query (Euclidean norm
    ``query_norms [q]``) to any row of norm at most ``row_norm`` whose float32 low-rank distance
    (``|V^T q - V^T b|^2``, ``V [dim, rank]`` from ``low_rank_basis``) was computed as at least
    ``low_rank_distances [q]``.

    Derivation: V in float32 is an orthonormal V64 rounded, |dV| <= u |V64|, so
    |V^T z| <= s |z| with s = 1 + u sqrt(r). A query's float32 projection is within
    delta_q = gamma_D |(|V|^T |q|)| <= gamma_D s sqrt(r) |q| of the exact one; a bank row's
    (``project_bank``: summed in float64, error <= gamma64_D s sqrt(r) |b|, then rounded,
    <= u s |b| more) within delta_b = (u + gamma64_D sqrt(r)) (1 + u) s |b|. The float32
    squared distance of the projected points is within E = gamma_{r+2} (|q'| + |b'|)^2 of
    theirs, with |z'| <= s |z| + delta. Hence a computed low-rank distance l satisfies
    sqrt(l - E) <= s |q - b| + delta_q + delta_b, i.e. |q - b|^2 >=
    ((sqrt(max(l - E, 0)) - delta_q - delta_b) / s)^2, decreasing in |b| (take R); a further
    32 u (|q'| + |b'|)^2 is subtracted for the float32 evaluation of this bound itself.
    """
    stretch = 1.0 + UNIT_ROUNDOFF * math.sqrt(rank)
    spread = gamma(dim) * stretch * math.sqrt(rank)
    summed = gamma(dim, UNIT_ROUNDOFF_FLOAT64) * math.sqrt(rank)  # project_bank's float64 sums
    bank_spread = (UNIT_ROUNDOFF + summed) * (1 + UNIT_ROUNDOFF)
    delta = spread * query_norms + bank_spread * stretch * row_norm
    projected = stretch * (query_norms + row_norm) + delta  # >= |q'| + |b'|
    error = (gamma(rank + 2) + 32 * UNIT_ROUNDOFF) * jnp.square(projected)
    root = jnp.sqrt(jnp.maximum(low_rank_distances - error, 0.0))
    bound = jnp.square(jnp.maximum(root - delta, 0.0) / stretch)
    return bound - 32 * UNIT_ROUNDOFF * jnp.square(projected)


def gamma(num_terms: int, unit_roundoff: float = UNIT_ROUNDOFF) -> float:
    """Higham's gamma_n = n u / (1 - n u), for float32 (u = 2^-24) unless given."""
    return num_terms * unit_roundoff / (1.0 - num_terms * unit_roundoff)


def proven_below(
    others: jax.Array,
    other_norms: jax.Array,
    bound: jax.Array,
    query_norms: jax.Array,
    row_norms: tuple[jax.Array, jax.Array, jax.Array],
    dim: int,
    rank: int,
) -> jax.Array:
    """``[q]``: a k-th distance below this (strictly) proves the rescanned candidates' top k
    exact mode's: in the scan's arithmetic no other row of the shard can be as near.

    ``others [q, n]``: the re-ranked distances (``reranking.rerank``) of the candidates not
    rescanned, ``other_norms [q, n]`` bounds of their rows' norms; ``bound [q]``: the smallest
    low-rank distance of any row that is no candidate; ``query_norms [q]``: squared;
    ``row_norms``: bounds of the shard's row norms ``(largest, level above, level below)``
    (``norm_levels``). Every float32 distance is within ``squared_distance_margin`` of the
    exact one, so the k-th must be below (1) ``other - 2 margin`` of each other candidate and
    (2) ``low_rank_lower_bound(bound) - margin`` with the largest row norm, or that with the
    level's norm (the rows below it) if the rows above it are farther by their norms alone:
    ``(|b| - |q|)^2 - margin`` (a far outlier). NaN anywhere: -inf or NaN (nothing proven).
    """
    norms = jnp.sqrt(query_norms)
    margins = squared_distance_margin(norms[:, None], other_norms, dim)
    candidates = jnp.min(others - 2.0 * margins, axis=1, initial=jnp.inf)

    def below(row_norm: jax.Array) -> jax.Array:
        margin = squared_distance_margin(norms, row_norm, dim)
        return low_rank_lower_bound(bound, norms, row_norm, dim, rank) - margin

    largest, level_above, level_below = row_norms
    # Rows above the level: |q - b|^2 >= (|b| - |q|)^2, increasing in |b| past ~|q|, so its
    # value at the level (less the margin there) bounds them all.
    gap = level_below - norms
    far = jnp.where(gap > 1e-3 * norms, gap * gap, -jnp.inf)
    far = far - squared_distance_margin(norms, level_above, dim)
    rows = jnp.maximum(below(largest), jnp.minimum(below(level_above), far))
    return jnp.minimum(candidates, rows)


def norm_levels(bank_norms: jax.Array, valid: jax.Array, dim: int) -> tuple[jax.Array, ...]:
    """``(largest, level above, level below)``: bounds of the Euclidean norms of a shard's
    finite rows (from their float32 squared norms ``bank_norms [r]``, within gamma_D): the
    largest, and the 1 - 1/64 quantile from above and from below (``proven_below``)."""
    finite = valid & jnp.isfinite(bank_norms)
    squared = jnp.sort(jnp.where(finite, bank_norms, 0.0))
    count = jnp.sum(finite)
    level = squared[jnp.maximum(squared.shape[0] - 1 - count // 64, 0)]
    up, down = 1.0 + 2.0 * gamma(dim), 1.0 - 2.0 * gamma(dim)
    return jnp.sqrt(squared[-1] * up), jnp.sqrt(level * up), jnp.sqrt(level * down)


# ----------------------------------------------------------------------------------------------
# The fallback of what the certified search cannot prove


def fall_back(
    certified: jax.Array,
    distances: jax.Array,
    indices: jax.Array,
    exact_scan: Callable[..., tuple[jax.Array, jax.Array]],
    arguments: tuple[jax.Array | None, ...],
) -> tuple[jax.Array, jax.Array]:
    """Exact mode's answer for the queries that are not ``certified [q]``, through
    ``exact_scan(*arguments)`` (``arguments``: per-query arrays ``[q, ...]`` or None).

    The uncertified queries are gathered ``FALLBACK_QUERIES`` at a time (the uncertified ones
    first, in query order) and scanned in a loop of ``ceil(uncertified / FALLBACK_QUERIES)``
    trips: the fallback costs what it rescans (none: nothing), with one compiled scan of static
    shape. The scan's tiles of fewer queries sum each distance in the same order (XLA CPU: any
    row count of 2+), so the answers are the plain scan's.
    """
    num_queries = certified.shape[0]
    chunk = min(FALLBACK_QUERIES, num_queries)
    trips = -(-jnp.sum(~certified) // chunk)
    padded = -(-num_queries // chunk) * chunk
    order = jnp.argsort(certified, stable=True)  # the uncertified ones first
    order = jnp.pad(order, (0, padded - num_queries), constant_values=num_queries)

    def rescan(trip, answer):
        ids = lax.dynamic_slice(order, (trip * chunk,), (chunk,))  # num_queries: padding
        chosen = jnp.minimum(ids, num_queries - 1)
        scanned = exact_scan(*(None if a is None else a[chosen] for a in arguments))
        kept = certified[chosen][:, None]
        return tuple(
            x.at[ids].set(jnp.where(kept, x[chosen], y), mode="drop")
            for x, y in zip(answer, scanned, strict=True)
        )

    return lax.fori_loop(0, trips, rescan, (distances, indices))


# ----------------------------------------------------------------------------------------------
# Options


def default_num_candidates(k: int) -> int:
    """Candidates per query of the ``fast`` k-NN when none are given: ``max(4 k, 16)``."""
    return max(4 * k, 16)


def default_certified_candidates(k: int) -> int:
    """Candidates per query of the certified search when none are given: ``max(4 k, 24)``."""
    return max(4 * k, CERTIFIED_CANDIDATES)


def candidates_for(
    precision: str, k: int, num_candidates: int | None = None, candidate_search: str = "bfloat16"
) -> int | None:
    """The static candidate count of the k-NN. ``fast``: ``num_candidates`` (an integer >= k)
    or ``default_num_candidates(k)``. ``exact``: None (the plain scan) unless
    ``candidate_search`` is ``low-rank``, the certified search: ``num_candidates`` (>= k) or
    ``default_certified_candidates(k)`` (bfloat16 distances bound nothing: no certificate)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    certified = precision == "exact" and candidate_search == "low-rank"
    integer = isinstance(num_candidates, int) and not isinstance(num_candidates, bool)
    if num_candidates is not None and (not integer or num_candidates < k):
        raise ValueError(f"num_candidates must be an integer >= k = {k}, got {num_candidates!r}")
    if precision == "exact" and not certified:
        return None
    if num_candidates is not None:
        return num_candidates
    return default_certified_candidates(k) if certified else default_num_candidates(k)


def default_candidate_search(platform: str) -> str:
    """The ``fast`` k-NN's candidate search on ``platform``: ``low-rank`` on ``cpu`` (where
    XLA runs bfloat16 matmuls no faster than float32), ``bfloat16`` elsewhere (GPU/TPU)."""
    return "low-rank" if platform == "cpu" else "bfloat16"


def search_arrays(
    precision: str,
    candidate_search: str,
    memory_bank: jax.Array | np.ndarray,
    search: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array] | None:
    """The per-bank arrays of the k-NN's candidate search: None for the ``bfloat16`` search;
    for ``low-rank`` (``fast``, or ``exact``'s certified search) ``search`` if given, else
    ``low_rank_search`` of the (concrete) ``memory_bank``. The certified search relies on
    them being ``low_rank_search(memory_bank)``'s (an orthonormal basis, this bank)."""
    if candidate_search not in CANDIDATE_SEARCHES:
        raise ValueError(
            f"candidate_search must be one of {CANDIDATE_SEARCHES}, got {candidate_search!r}"
        )
    if precision not in PRECISIONS or candidate_search == "bfloat16":
        return None
    if search is not None:
        return search
    if isinstance(memory_bank, jax.core.Tracer) and precision == "exact":
        return None  # no arrays, no certificate: the plain scan (the same answer)
    if isinstance(memory_bank, jax.core.Tracer):
        raise ValueError(
            "candidate_search='low-rank' inside a traced program needs its per-bank arrays: "
            "pass search=knn.low_rank_search(memory_bank) computed outside"
        )
    return low_rank_search(memory_bank)


# ----------------------------------------------------------------------------------------------
# The k-NN's argument checks (``knn.nearest_neighbors``, ``scoring``)


def check_positive_integers(**values: int) -> None:
    """Raises ValueError naming the first of ``values`` that is not a positive int."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_rows(name: str, array: jax.Array, dim: int | None = None) -> None:
    """Raises ValueError unless ``array`` is ``[N >= 1, dim]`` (any ``D`` when ``dim`` is None)."""
    if array.ndim != 2 or array.shape[0] < 1 or (dim is not None and array.shape[1] != dim):
        expected = f"[N, {dim}]" if dim is not None else "[N, D] with N >= 1"
        raise ValueError(f"{name} must be {expected}, got shape {array.shape}")


def check_image_ids(query_images, bank_images, num_queries: int, num_bank: int) -> None:
    """Raises ValueError unless the same-image exclusion's ids are both None or ``[Q]``, ``[M]``."""
    if (query_images is None) != (bank_images is None):
        raise ValueError("the same-image exclusion needs both query and bank-row image ids")
    if query_images is None:
        return
    shapes = (np.shape(query_images), np.shape(bank_images))
    if shapes != ((num_queries,), (num_bank,)):
        raise ValueError(
            f"image ids must have shapes ({num_queries},) and ({num_bank},), got {shapes}"
        )
