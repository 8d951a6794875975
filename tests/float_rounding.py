"""Comparisons with a reference that hold on every CPU and GPU: float32 rounding bounds derived
from the computation, never from one machine's observed differences.

XLA generates different code for AVX2, AVX-512 and GPUs, so float32 sums round differently;
two rows whose greedy-coreset distances are a float32 near-tie can be taken in either order
(the authors' own code has such ties against itself). ``compare_greedy_selection`` accepts a
difference from the reference only where both choices are near-ties under a bound derived for
the float32 computation, recomputing the distances in float64 from the same prefix, and counts
those steps; any other difference fails. ``squared_distance_error`` bounds the rounding of one
float32 squared distance computed as ``|a|^2 + |b|^2 - 2 a.b``.

Used by the tests and by benchmarks/gpu_check.py (which imports this folder's helpers).
"""

from __future__ import annotations

import dataclasses

import numpy as np

UNIT_ROUNDOFF = 2.0**-24  # float32: |fl(x) - x| <= u |x|


def gamma(num_terms: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): a float32 sum or dot product of n terms is within
    gamma_n * (sum of |terms|) of the exact value, whatever the summation order."""
    return num_terms * UNIT_ROUNDOFF / (1.0 - num_terms * UNIT_ROUNDOFF)


def squared_distance_error(queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Bound on |computed - exact| of float32 squared distances ``|q|^2 + |b|^2 - 2 q.b`` (or
    the direct ``sum (q - b)^2``), elementwise for paired ``queries`` [..., D] and ``rows``
    [..., D]: gamma_{D+2} (|q|^2 + |b|^2 + 2 sum |q_i b_i|) covers every summation order and
    both formulas (the direct one is within gamma_D sum (q_i - b_i)^2, which is smaller)."""
    q = np.abs(queries.astype(np.float64))
    b = np.abs(rows.astype(np.float64))
    dim = queries.shape[-1]
    return gamma(dim + 2) * (np.sum(q * q, -1) + np.sum(b * b, -1) + 2 * np.sum(q * b, -1))


@dataclasses.dataclass
class GreedyComparison:
    """Outcome of ``compare_greedy_selection``."""

    num_steps: int
    tie_steps: list[int]  # steps where actual and expected differ on a float32 near-tie
    diverged_steps: int  # steps after a tie where the two prefixes differ as sets
    violation: str | None  # the first difference that is not a near-tie, or None

    @property
    def ok(self) -> bool:
        return self.violation is None

    def summary(self) -> str:
        text = (
            f"{self.num_steps - len(self.tie_steps) - self.diverged_steps}/{self.num_steps} "
            f"steps identical, {len(self.tie_steps)} float32 near-ties"
        )
        if self.tie_steps:
            text += f" (first at step {self.tie_steps[0]})"
        if self.diverged_steps:
            text += f", {self.diverged_steps} steps after a tie"
        return text if self.ok else f"{text}; {self.violation}"


def compare_greedy_selection(
    features: np.ndarray,
    actual: np.ndarray,
    expected: np.ndarray,
    start_indices: np.ndarray,
    projection: np.ndarray | None = None,
    *,
    safety: float = 1.0,
) -> GreedyComparison:
    """Checks a greedy coreset selection ``actual`` against a reference ``expected`` (both
    [M] row indices into ``features`` [N, D]) up to float32 near-ties.

    Both run the approximate greedy coreset: rows projected by ``projection`` [p, D] (or not),
    every row starting at its mean distance to the ``start_indices`` rows, each step taking the
    row farthest from everything selected. Here that is recomputed in float64 along ``actual``'s
    prefix, with a per-row bound ``err`` on how far the float32 computation's distance can be
    from the float64 one. Derivation (u = 2^-24, gamma_n = n u / (1 - n u)):

    * projection: each float32 projected coordinate is within gamma_D sum_j |P_ij f_j| of the
      exact one, so a row moves by at most delta = gamma_D |(|P| |f|)| (Euclidean norm);
    * distance between the float32 points: the squared distance ``-2 a.b + |a|^2 + |b|^2``
      (p-term dot products) is within e = gamma_{p+2} (|a| + |b|)^2 of exact; the square root
      then moves by at most min(sqrt(e), e / d) and rounds by u d;
    * so one distance is off by at most delta_a + delta_b + min(sqrt(e), e / d) + u d; the start
      distance (a float32 mean of k distances) adds gamma_k of their sum plus u; and a running
      minimum is off by at most the largest error of its terms.

    Step t is a near-tie when the chosen row's float64 distance plus its bound reaches the
    largest float64 distance minus that row's bound (bounds times ``safety``, 1 by default: the
    bound is already the worst case over every summation order). Where the prefixes agree
    as sets, a step at which ``actual`` and ``expected`` differ must be a near-tie for both
    choices (counted in ``tie_steps``); where an earlier tie made them differ, only ``actual``'s
    choice is checked, and the comparison is by sets again once the prefixes agree. Every step of
    ``actual`` must be a near-tie of the float64 farthest row: a wrong choice anywhere fails.
    """
    actual = np.asarray(actual, np.int64)
    expected = np.asarray(expected, np.int64)
    points = features.astype(np.float64)
    if projection is None:
        shift = np.zeros(len(points))
    else:
        proj = projection.astype(np.float64)
        shift = gamma(points.shape[1]) * np.linalg.norm(np.abs(points) @ np.abs(proj).T, axis=1)
        points = points @ proj.T
    num_rows, dim = points.shape
    norms = np.linalg.norm(points, axis=1) + shift  # bounds the float32 points' norms too
    if len(actual) != len(expected):
        return GreedyComparison(
            len(expected), [], 0, f"{len(actual)} indices, expected {len(expected)}"
        )
    if len(actual) and (actual.min() < 0 or actual.max() >= num_rows):
        return GreedyComparison(len(expected), [], 0, "an index is out of range")

    def distances_to(index: int) -> tuple[np.ndarray, np.ndarray]:
        """Float64 distances of every row to row ``index`` and their float32 error bounds."""
        d = np.linalg.norm(points - points[index], axis=1)
        e = gamma(dim + 2) * (norms + norms[index]) ** 2
        with np.errstate(divide="ignore"):
            root = np.minimum(np.sqrt(e), np.where(d > 0, e / d, np.inf))
        return d, shift + shift[index] + root + UNIT_ROUNDOFF * d

    start = [distances_to(int(i)) for i in start_indices]
    k = len(start)
    sums = np.sum([d for d, _ in start], axis=0)
    min_distances = sums / k
    errors = np.mean([e for _, e in start], axis=0) + (gamma(k) + UNIT_ROUNDOFF) * min_distances
    selected = np.zeros(num_rows, bool)
    ties: list[int] = []
    diverged = 0
    same_prefix = True

    def near_tie(index: int, largest: float, largest_error: float) -> bool:
        return min_distances[index] + safety * (errors[index] + largest_error) >= largest

    for step, (chosen, reference) in enumerate(zip(actual, expected, strict=True)):
        if selected[chosen]:
            return GreedyComparison(
                len(expected), ties, diverged, f"step {step}: row {chosen} selected twice"
            )
        candidates = np.where(selected, -np.inf, min_distances)
        farthest = int(np.argmax(candidates))
        largest, largest_error = candidates[farthest], errors[farthest]
        if not near_tie(chosen, largest, largest_error):
            return GreedyComparison(
                len(expected),
                ties,
                diverged,
                f"step {step}: row {chosen} at distance {min_distances[chosen]:.7g} is not a "
                f"float32 near-tie of the farthest row {farthest} at {largest:.7g} "
                f"(bound {safety * (errors[chosen] + largest_error):.3g})",
            )
        if chosen != reference:
            if not same_prefix:
                diverged += 1
            elif not selected[reference] and not near_tie(reference, largest, largest_error):
                return GreedyComparison(
                    len(expected),
                    ties,
                    diverged,
                    f"step {step}: {chosen} instead of the reference's {reference}, whose "
                    f"distance {min_distances[reference]:.7g} is not a near-tie of {largest:.7g}",
                )
            else:
                ties.append(step)
        elif not same_prefix:
            diverged += 1
        selected[chosen] = True
        d, e = distances_to(int(chosen))
        min_distances = np.minimum(min_distances, d)
        errors = np.maximum(errors, e)
        same_prefix = set(actual[: step + 1].tolist()) == set(expected[: step + 1].tolist())
    return GreedyComparison(len(expected), ties, diverged, None)


def low_rank_distance_bound(queries: np.ndarray, rows: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Largest value the float32 low-rank candidate distance ``|V^T q - V^T b|^2`` can take for
    paired ``queries`` / ``rows`` [..., D] with the float32 ``basis`` V [D, r]: at most the exact
    squared distance (V orthonormal) plus rounding, so a computed candidate distance above it
    would not be a lower bound.

    Derivation: V in float32 is V64 + dV with |dV| <= u |V64| elementwise, so
    |V^T z| <= (1 + u sqrt(r)) |z|; each float32 projected coordinate of a query is within
    gamma_D sum_j |V_ji q_j| of exact (delta_q = that vector's norm); a bank row's projection
    is summed in float64 (within gamma64_D sum_j |V_ji b_j|) and rounded to float32 once (u
    times the coordinate more: delta_b); the squared distance of the projected points is within
    gamma_{r+2} (|q'| + |b'|)^2.
    """
    q = queries.astype(np.float64)
    b = rows.astype(np.float64)
    v = np.abs(basis.astype(np.float64))
    dim, rank = basis.shape
    stretch = 1.0 + UNIT_ROUNDOFF * np.sqrt(rank)
    delta_q = gamma(dim) * np.linalg.norm(np.abs(q) @ v, axis=-1)
    summed = dim * 2.0**-53 / (1 - dim * 2.0**-53) * np.linalg.norm(np.abs(b) @ v, axis=-1)
    delta_b = summed + UNIT_ROUNDOFF * (
        np.linalg.norm(b @ basis.astype(np.float64), axis=-1) + summed
    )
    exact = np.linalg.norm(q - b, axis=-1)
    norm_q = stretch * np.linalg.norm(q, axis=-1) + delta_q
    norm_b = stretch * np.linalg.norm(b, axis=-1) + delta_b
    return (stretch * exact + delta_q + delta_b) ** 2 + gamma(rank + 2) * (norm_q + norm_b) ** 2


def nearest_index_differences(
    queries: np.ndarray, memory_bank: np.ndarray, ours: np.ndarray, expected: np.ndarray
) -> tuple[int, int]:
    """``(near_ties, violations)`` among the queries [Q, D] whose nearest bank row ``ours`` [Q]
    differs from ``expected`` [Q]: a difference is a near-tie when the two rows' float64 squared
    distances differ by no more than the sum of their float32 rounding bounds
    (``squared_distance_error``), so either could be the float32 nearest on some machine."""
    differ = np.flatnonzero(np.asarray(ours) != np.asarray(expected))
    q = queries[differ]
    rows_ours, rows_expected = memory_bank[ours[differ]], memory_bank[expected[differ]]
    distance_ours = np.sum((q.astype(np.float64) - rows_ours) ** 2, axis=1)
    distance_expected = np.sum((q.astype(np.float64) - rows_expected) ** 2, axis=1)
    bound = squared_distance_error(q, rows_ours) + squared_distance_error(q, rows_expected)
    ties = np.abs(distance_ours - distance_expected) <= bound
    return int(ties.sum()), int((~ties).sum())
