"""The candidate searches' bounds (candidates.py): the float32 margins the certified k-NN
proves its answers with, against the tests' independent derivation (float_rounding.py) and
float64. The certified search itself is tested with the k-NN (test_knn.py)."""

from __future__ import annotations

import numpy as np
from float_rounding import low_rank_distance_bound, squared_distance_error
from test_knn import _adversarial

from patchcore_jax import candidates, knn


def test_certificate_margins_cover_the_independent_derivation_and_float64():
    rng = np.random.default_rng(31)
    queries, bank = _adversarial(rng, dim=200)
    bank, queries = bank[np.isfinite(bank).all(1)], queries[np.isfinite(queries).all(1)]
    row_norm = np.linalg.norm(bank.astype(np.float64), axis=1).max()
    query_norms = np.linalg.norm(queries.astype(np.float64), axis=1)
    pairs = rng.integers(0, len(bank), size=len(queries))
    # The exact formula's margin: at least tests/float_rounding.py's bound of every pair.
    margin = np.asarray(candidates.squared_distance_margin(query_norms, row_norm, 200))
    assert np.all(margin >= squared_distance_error(queries, bank[pairs]))
    # The low-rank lower bound inverts float_rounding.low_rank_distance_bound (the largest
    # computed low-rank distance a pair can have): never above the float64 distance.
    search = candidates.low_rank_search(bank)
    basis = np.asarray(search[0])
    exact = np.sum((queries.astype(np.float64) - bank[pairs]) ** 2, axis=1)
    largest = low_rank_distance_bound(queries, bank[pairs], basis)
    lower = np.asarray(candidates.low_rank_lower_bound(largest, query_norms, row_norm, 200, 128))
    assert np.all(lower <= exact)
    # And below it on the computed low-rank distances of the candidates, not trivially zero.
    approx, chosen = map(np.asarray, knn.fast_candidates(queries, bank, 16, search=search))
    exact = np.sum((queries[:, None, :].astype(np.float64) - bank[chosen]) ** 2, axis=2)
    lower = np.asarray(
        candidates.low_rank_lower_bound(approx, query_norms[:, None], row_norm, 200, 128)
    )
    assert np.all(lower <= exact)
    ratio = np.median(lower[exact > 0] / exact[exact > 0])
    print(f"lower bound / exact distance: median {ratio:.4f}")
    assert ratio > 0.5
