"""The compiled programs a ``PatchCore`` model runs: the embedding, the scoring and the fused
embed-and-score inference program, and the numerics they run with on a platform.

Programs are shared by every model with the same backbone, shapes, options and mesh (the
arguments are hashable: Flax modules, ints, tuples, meshes), so a second model of the same
configuration in one process compiles nothing (and the CLI's persistent compilation cache
covers new processes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from patchcore_jax import candidates, features, knn, scoring, sharding
from patchcore_jax.config import PatchCoreConfig


def scoring_options(
    config: PatchCoreConfig, grid_shape: tuple[int, int], candidate_search: str | None
) -> dict[str, Any]:
    """The keyword arguments (all but ``mesh``) of ``scoring.score_patch_features`` for a model
    of ``config`` with this patch grid and candidate search (``backend_numerics``): one place for
    the scoring, calibration and export programs."""
    return {
        "grid_shape": grid_shape,
        "out_shape": config.image_shape,
        "num_neighbors": config.num_neighbors,
        "distance": config.distance,
        "reweight": config.reweight,
        "reweight_neighbors": config.reweight_neighbors,
        "sigma": config.anomaly_map_sigma,
        "bank_block_size": config.bank_block_size,
        "query_block_size": config.query_block_size,
        "precision": config.precision,
        "candidate_search": candidate_search or "bfloat16",
    }


def backend_numerics(precision: str, platform: str) -> tuple[str, str | None]:
    """``(backbone dtype, k-NN candidate search)`` of ``precision`` on ``platform`` (a jax
    device platform: ``cpu``, ``gpu``, ``tpu``...), each the fastest the backend has (measured:
    benchmarks/results/precision.md, knn.md).

    ``exact``: a float32 backbone; on ``cpu`` the certified k-NN (``low-rank`` candidates,
    exact re-rank, full scan where unproven: exact mode's answer at a fraction of the work),
    elsewhere the plain scan (None; the certified search is not measured faster there yet).
    ``fast``: on ``cpu``, where XLA runs bfloat16 no faster than float32,
    ``("float32", "low-rank")``; elsewhere ``("bfloat16", "bfloat16")``.
    """
    if precision == "exact":
        return "float32", ("low-rank" if platform == "cpu" else None)
    if precision != "fast":
        raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
    dtype = "float32" if platform == "cpu" else "bfloat16"
    return dtype, candidates.default_candidate_search(platform)


def host_rows(
    result: scoring.ScoreResult, num_valid: int, knn_counts: dict[str, int] | None = None
) -> scoring.ScoreResult:
    """This process's first ``num_valid`` rows of every field of a batch result, on the host;
    their patch queries and certified-search fallbacks are added to ``knn_counts``."""
    result = jax.tree.map(lambda x: sharding.process_local_rows(x)[:num_valid], result)
    if knn_counts is not None and result.fallbacks is not None:  # -1: no certified search
        certified = np.asarray(result.fallbacks) >= 0
        knn_counts["queries"] += int(certified.sum()) * result.patch_scores.shape[1]
        knn_counts["fallbacks"] += int(np.asarray(result.fallbacks)[certified].sum())
    return result


def describe_fallbacks(knn_counts: dict[str, int] | None) -> str:
    """``"; k-NN certified for 99.8724% of 784 patch queries (1 fell back to the full scan)"``,
    or "" before any certified query (``knn_counts`` None or none counted)."""
    if not knn_counts or not knn_counts["queries"]:
        return ""
    queries, fallbacks = knn_counts["queries"], knn_counts["fallbacks"]
    return (
        f"; k-NN certified for {1 - fallbacks / queries:.4%} of {queries} patch queries "
        f"({fallbacks} fell back to the full scan)"
    )


def describe_numerics(precision: str, platform: str, num_neighbors: int) -> str:
    """What ``precision`` means on ``platform`` (``backend_numerics``) in words, e.g.
    ``precision fast on cpu: float32 backbone, low-rank (r <= 128) k-NN candidates (C = 16)
    re-ranked in float32``."""
    backbone_dtype, candidate_search = backend_numerics(precision, platform)
    if precision == "exact" and candidate_search is None:
        return f"precision exact on {platform}: float32 backbone and k-NN"
    if precision == "exact":
        count = candidates.default_certified_candidates(num_neighbors)
        return (
            f"precision exact on {platform}: float32 backbone and k-NN, certified from "
            f"{knn.CERTIFIED_MIN_ROWS} bank rows per device (low-rank (r <= {knn.LOW_RANK_DIMS}) "
            f"candidates (C = {count}) re-ranked in float32, the full scan where no proof)"
        )
    count = candidates.default_num_candidates(num_neighbors)
    search = (
        f"low-rank (r <= {knn.LOW_RANK_DIMS})" if candidate_search == "low-rank" else "bfloat16"
    )
    return (
        f"precision fast on {platform}: {backbone_dtype} backbone, {search} k-NN "
        f"candidates (C = {count}) re-ranked in float32"
    )


@functools.lru_cache(maxsize=16)
def embed_program(
    module: Any,
    pretrain_dim: int,
    target_dim: int,
    patch_size: int,
    patch_stride: int,
    precision: str,
    mesh: Mesh,
) -> Callable[[Any, jax.Array], jax.Array]:
    """``(variables, images [B, H, W, 3]) -> patch features [B, P, D]``, split like the images."""
    batch_sharding = sharding.row_sharding(mesh)
    return jax.jit(
        functools.partial(
            features.embed_images,
            module,
            pretrain_embed_dimension=pretrain_dim,
            target_embed_dimension=target_dim,
            patch_size=patch_size,
            patch_stride=patch_stride,
            precision=precision,
        ),
        in_shardings=(sharding.replicated(mesh), batch_sharding),
        out_shardings=batch_sharding,
    )


@functools.lru_cache(maxsize=16)
def score_program(
    scoring_options: tuple[tuple[str, Any], ...], mesh: Mesh
) -> Callable[..., scoring.ScoreResult]:
    """``(patch features [B, P, D], bank [bucket, D], rows in use [], search=None,
    valid_images=None) -> ScoreResult`` split like the batch (so each process reads its own
    rows); see ``bank_bucket``; ``search``: the bank's candidate-search arrays
    (``PatchCore.search_arrays``), None for the plain exact scan or bfloat16 candidates;
    ``valid_images [B]`` bool: the batch's padding (``sharding.valid_rows``)."""
    score = functools.partial(_score, dict(scoring_options), mesh)
    return jax.jit(score, out_shardings=sharding.row_sharding(mesh))


def _score(
    options: dict[str, Any],
    mesh: Mesh | None,
    patch_features: jax.Array,
    memory_bank: jax.Array,
    num_valid: jax.Array | None,
    search: Any = None,
    valid_images: jax.Array | None = None,
) -> scoring.ScoreResult:
    """``scoring.score_patch_features`` of a program: its options, its bank arguments."""
    return scoring.score_patch_features(
        patch_features,
        memory_bank,
        **options,
        mesh=mesh,
        num_valid=num_valid,
        search=search,
        valid_images=valid_images,
    )


def embed_and_score_function(
    module: Any,
    pretrain_dim: int,
    target_dim: int,
    patch_size: int,
    patch_stride: int,
    precision: str,
    scoring_options: tuple[tuple[str, Any], ...],
    mesh: Mesh | None,
) -> Callable[..., scoring.ScoreResult]:
    """``(variables, images [B, H, W, 3], bank [M, D], rows in use [] or None, search,
    valid_images [B] bool or None) -> ScoreResult``: the backbone, patch features and k-NN
    scoring as one pure function, the one computation of ``PatchCore.score`` (compiled over
    ``mesh``, padded batches) and of ``PatchCore.inference_function`` (``mesh`` None, for
    ``jax.export``: no padding)."""
    options = dict(scoring_options)

    def embed_and_score(
        variables: Any,
        images: jax.Array,
        memory_bank: jax.Array,
        num_valid: jax.Array,
        search,
        valid_images: jax.Array | None = None,
    ):
        patch_features = features.embed_images(
            module,
            variables,
            images,
            pretrain_embed_dimension=pretrain_dim,
            target_embed_dimension=target_dim,
            patch_size=patch_size,
            patch_stride=patch_stride,
            precision=precision,
        )
        return _score(options, mesh, patch_features, memory_bank, num_valid, search, valid_images)

    return embed_and_score


def with_bank_arguments(
    embed_and_score: Callable[..., scoring.ScoreResult], variables: Any, search_structure: Any
) -> Callable[..., scoring.ScoreResult]:
    """``(images, bank [bucket, D], rows in use [], *search leaves) -> ScoreResult``:
    ``embed_and_score_function``'s function with the backbone ``variables`` bound and the
    candidate-search arrays flattened (their pytree ``search_structure``), so that every bank
    array is one positional argument (an exported program's inputs)."""

    def infer(images: jax.Array, memory_bank, num_valid, *search: jax.Array):
        search_arrays = jax.tree.unflatten(search_structure, search)
        return embed_and_score(variables, images, memory_bank, num_valid, search_arrays)

    return infer


@functools.lru_cache(maxsize=16)
def predict_program(
    module: Any,
    pretrain_dim: int,
    target_dim: int,
    patch_size: int,
    patch_stride: int,
    precision: str,
    scoring_options: tuple[tuple[str, Any], ...],
    mesh: Mesh,
) -> Callable[[Any, jax.Array, jax.Array], scoring.ScoreResult]:
    """``(variables, images, bank [bucket, D], rows in use [], search, valid_images) ->
    ScoreResult``: embedding and scoring fused into one program, so patch features never leave
    the device and each batch is one dispatch. ``precision`` is the backbone's (``exact``:
    float32, ``fast``: bfloat16); ``search`` the bank's candidate-search arrays (None unless
    low-rank); ``valid_images [B]`` bool: the batch's padding (``sharding.valid_rows``)."""
    embed_and_score = embed_and_score_function(
        module, pretrain_dim, target_dim, patch_size, patch_stride, precision, scoring_options, mesh
    )
    batch_sharding = sharding.row_sharding(mesh)
    replicated = sharding.replicated(mesh)
    return jax.jit(
        embed_and_score,
        in_shardings=(replicated, batch_sharding, *(replicated,) * 3, batch_sharding),
        out_shardings=batch_sharding,
    )


def bank_bucket(num_rows: int) -> int:
    """Rows a memory bank of ``num_rows`` is padded to for scoring: the next multiple of
    ``2**(floor(log2 num_rows) - 5)`` (at most 1/32 more k-NN work; 32 sizes per doubling), so
    that banks of nearby sizes (categories, ``extend``) share one compiled scoring program."""
    if num_rows < 64:
        return num_rows
    granularity = 1 << (num_rows.bit_length() - 1 - 5)
    return -(-num_rows // granularity) * granularity


def scoring_bank(
    memory_bank: np.ndarray, candidate_search: str | None, mesh: Mesh
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array] | None]:
    """What the scoring programs take of a memory bank [M, D] float32, placed once:
    ``((bank padded to bank_bucket(M) rows, M), search)``, replicated over ``mesh`` (padding
    rows are never a neighbour); ``search``: for the ``low-rank`` candidate search the basis
    [D, r] and the projected bank [bucket, r] (computed once per bank), else None."""
    num_rows = memory_bank.shape[0]
    bucket = bank_bucket(num_rows)
    padded = (
        sharding.replicate(sharding.pad_rows(memory_bank, bucket), mesh),
        sharding.replicate(np.int32(num_rows), mesh),
    )
    if candidate_search != "low-rank":
        return padded, None
    basis, projected = knn.low_rank_search(memory_bank)
    projected = sharding.pad_rows(np.asarray(projected), bucket)
    return padded, (
        sharding.replicate(np.asarray(basis), mesh),
        sharding.replicate(projected, mesh),
    )


def self_excluded_bank(
    memory_bank: jax.Array,
    source_images: np.ndarray,
    search: tuple[jax.Array, jax.Array] | None,
    mesh: Mesh,
    bank_block_size: int,
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None, jax.Array]:
    """What the self-excluded calibration scores against, placed once: ``(bank, rows in use,
    search, source image per row)``, the bank [M, D] (replicated) and its ``scoring_bank``
    search arrays padded to the k-NN's tiles (``knn.tiled_rows``), so that no batch copies the
    bank to pad it; padding rows come from no image (-1)."""
    num_rows = memory_bank.shape[0]
    rows = knn.tiled_rows(num_rows, mesh.shape[sharding.BANK_AXIS], bank_block_size)

    def padded(array: jax.Array) -> jax.Array:  # replicated, like the array
        return jnp.pad(array[:num_rows], ((0, rows - num_rows), (0, 0)))

    sources = np.full(rows, -1, np.int32)
    sources[:num_rows] = source_images
    search = None if search is None else (search[0], padded(search[1]))
    rows_in_use = sharding.replicate(np.int32(num_rows), mesh)
    return padded(memory_bank), rows_in_use, search, sharding.replicate(sources, mesh)
