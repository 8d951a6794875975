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
from jax.sharding import Mesh

from patchcore_jax import features, knn, scoring, sharding


def backend_numerics(precision: str, platform: str) -> tuple[str, str | None]:
    """``(backbone dtype, k-NN candidate search)`` of ``precision`` on ``platform`` (a jax
    device platform: ``cpu``, ``gpu``, ``tpu``...).

    ``exact``: ``("float32", None)`` (exact k-NN) everywhere. ``fast`` takes the fastest
    approximation the backend has: on ``cpu``, where XLA runs bfloat16 no faster than float32,
    ``("float32", "low-rank")``; elsewhere ``("bfloat16", "bfloat16")``.
    """
    if precision == "exact":
        return "float32", None
    if precision != "fast":
        raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
    return ("float32" if platform == "cpu" else "bfloat16"), knn.default_candidate_search(platform)


def host_rows(result: scoring.ScoreResult, num_valid: int) -> scoring.ScoreResult:
    """This process's first ``num_valid`` rows of every field of a batch result, on the host."""
    return jax.tree.map(lambda x: sharding.process_local_rows(x)[:num_valid], result)


@functools.lru_cache(maxsize=16)
def embed_program(
    module: Any, pretrain_dim: int, target_dim: int, patch_size: int, precision: str, mesh: Mesh
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
            precision=precision,
        ),
        in_shardings=(sharding.replicated(mesh), batch_sharding),
        out_shardings=batch_sharding,
    )


@functools.lru_cache(maxsize=16)
def score_program(
    scoring_options: tuple[tuple[str, Any], ...], mesh: Mesh
) -> Callable[..., scoring.ScoreResult]:
    """``(patch features [B, P, D], bank [bucket, D], rows in use [], search=None) ->
    ScoreResult`` split like the batch (so each process reads its own rows); see
    ``bank_bucket``; ``search``: the bank's candidate-search arrays (``PatchCore.search_arrays``),
    None for exact or bfloat16 candidates."""
    options = dict(scoring_options)

    def score(patch_features: jax.Array, memory_bank: jax.Array, num_valid: jax.Array, search=None):
        return scoring.score_patch_features(
            patch_features, memory_bank, **options, mesh=mesh, num_valid=num_valid, search=search
        )

    return jax.jit(score, out_shardings=sharding.row_sharding(mesh))


def embed_and_score_function(
    module: Any,
    pretrain_dim: int,
    target_dim: int,
    patch_size: int,
    precision: str,
    scoring_options: tuple[tuple[str, Any], ...],
    mesh: Mesh | None,
) -> Callable[..., scoring.ScoreResult]:
    """``(variables, images [B, H, W, 3], bank [M, D], rows in use [] or None, search) ->
    ScoreResult``: the backbone, patch features and k-NN scoring as one pure function, the one
    computation of ``PatchCore.score`` (compiled over ``mesh``) and of
    ``PatchCore.inference_function`` (``mesh`` None, for ``jax.export``)."""
    options = dict(scoring_options)

    def embed_and_score(
        variables: Any, images: jax.Array, memory_bank: jax.Array, num_valid: jax.Array, search
    ):
        patch_features = features.embed_images(
            module,
            variables,
            images,
            pretrain_embed_dimension=pretrain_dim,
            target_embed_dimension=target_dim,
            patch_size=patch_size,
            precision=precision,
        )
        return scoring.score_patch_features(
            patch_features, memory_bank, **options, mesh=mesh, num_valid=num_valid, search=search
        )

    return embed_and_score


@functools.lru_cache(maxsize=16)
def predict_program(
    module: Any,
    pretrain_dim: int,
    target_dim: int,
    patch_size: int,
    precision: str,
    scoring_options: tuple[tuple[str, Any], ...],
    mesh: Mesh,
) -> Callable[[Any, jax.Array, jax.Array], scoring.ScoreResult]:
    """``(variables, images, bank [bucket, D], rows in use [], search) -> ScoreResult``:
    embedding and scoring fused into one program, so patch features never leave the device and
    each batch is one dispatch. ``precision`` is the backbone's (``exact``: float32, ``fast``:
    bfloat16); ``search`` the bank's candidate-search arrays (None unless low-rank)."""
    embed_and_score = embed_and_score_function(
        module, pretrain_dim, target_dim, patch_size, precision, scoring_options, mesh
    )
    batch_sharding = sharding.row_sharding(mesh)
    replicated = sharding.replicated(mesh)
    return jax.jit(
        embed_and_score,
        in_shardings=(replicated, batch_sharding, replicated, replicated, replicated),
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
