"""Scoring on the device: patch scores from the k-NN, image scores, Eq. 7, anomaly maps.

A patch score is the mean distance to the patch's k nearest memory-bank rows (``knn``: blocked,
sharded, ``exact`` or ``fast``); an image score is its highest patch score, optionally reweighted
by the paper's Eq. 7. Given each image's id and the source image of every bank row, scoring
leaves an image's own bank rows out of its k-NN: the self-excluded calibration's nominal
scores of training images. Non-finite patch features score NaN (``knn``'s rule).

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
from jax.sharding import Mesh

from patchcore_jax import candidates, knn
from patchcore_jax.config import DISTANCES
from patchcore_jax.features import bilinear_resize_matrix
from patchcore_jax.sharding import HIGHEST, single_device_mesh


class ScoreResult(NamedTuple):
    """Scores of a batch of images.

    Attributes:
      image_scores: ``[B] float32``, max patch score per image (Eq. 7-reweighted if asked).
      anomaly_maps: ``[B, H, W] float32``, upsampled and blurred patch scores.
      patch_scores: ``[B, P] float32``, mean distance to the k nearest bank rows.
      nearest_indices: ``[B, P, k] int32``, bank rows of those neighbours, nearest first.
      fallbacks: ``[B] int32``, patches whose certified k-NN fell back to the full scan (-1
        where no certified search ran; None where not computed).
    """

    image_scores: jax.Array
    anomaly_maps: jax.Array
    patch_scores: jax.Array
    nearest_indices: jax.Array
    fallbacks: jax.Array | None = None


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
    _, support, _ = knn.nearest_neighbors_unchecked(
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
        "certified",
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
    image_ids: jax.Array | None = None,
    bank_source_images: jax.Array | None = None,
    certified: bool = False,
    valid_images: jax.Array | None = None,
) -> ScoreResult:
    batch, num_patches, dim = patch_features.shape
    query_images = valid_queries = None
    if image_ids is not None:  # every patch of an image carries the image's id
        query_images = jnp.repeat(image_ids.astype(jnp.int32), num_patches)
    if valid_images is not None:
        valid_queries = jnp.repeat(jnp.asarray(valid_images, bool), num_patches)
    distances, indices, fallbacks = knn.nearest_neighbors_unchecked(
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
        query_images,
        bank_source_images,
        certified,
        valid_queries,
    )
    result = scores_from_neighbors(
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
    if fallbacks is None:
        return result
    return result._replace(fallbacks=fallbacks.reshape(batch, num_patches).sum(axis=1))


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
    ``[B, P, D]`` in ``memory_bank``; bank rows at or past ``num_valid`` are padding."""
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
    fallbacks = jnp.full(batch, -1, jnp.int32)
    return ScoreResult(image_scores, maps, patch_scores, nearest_indices, fallbacks)


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
    image_ids: jax.Array | np.ndarray | None = None,
    bank_source_images: jax.Array | np.ndarray | None = None,
    valid_images: jax.Array | np.ndarray | None = None,
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
      num_candidates: candidates per query of the ``fast`` k-NN (default ``max(4 k, 16)``) or
        of the certified search (default ``max(4 k, 24)``).
      num_valid: the bank's first ``num_valid`` rows are used, the rest is padding (never a
        neighbour): an int, or a traced int32 scalar so that banks padded to one bucketed size
        share a compiled program (``PatchCore`` does this). Default: every row.
      candidate_search: how the ``fast`` k-NN finds its candidates: ``bfloat16`` (full
        dimension; GPUs/TPUs) or ``low-rank`` (the bank's top principal directions; CPUs).
        ``exact`` with ``low-rank``: the certified search (exact mode's answer, faster on
        CPUs); with ``bfloat16``: the plain scan.
      search: the low-rank search's per-bank arrays, ``knn.low_rank_search(memory_bank)``
        (computed here when not given and the bank is concrete).
      image_ids, bank_source_images: ``[B]`` and ``[M]`` int32, or both None: each image's k-NN
        leaves out the bank rows taken from that same image (the self-excluded calibration;
        give padded images an id no bank row has, e.g. -2).
      valid_images: ``[B]`` bool, or None (all): False marks a padded image, whose scores and
        map are NaN; its patches' k-NN is skipped where a whole query tile is padding (a
        partly filled last batch costs what it holds, without a program of its own).

    Returns:
      ``ScoreResult`` (compiled once per shape and option set); with the exclusion, its
      nearest indices never point at a row of the image's own.
    """
    patch_features = jnp.asarray(patch_features, jnp.float32)
    memory_bank = jnp.asarray(memory_bank, jnp.float32)
    _check_arguments(
        patch_features,
        memory_bank,
        grid_shape,
        out_shape,
        num_neighbors=num_neighbors,
        distance=distance,
        reweight=reweight,
        reweight_neighbors=reweight_neighbors,
        sigma=sigma,
        bank_block_size=bank_block_size,
        query_block_size=query_block_size,
        num_valid=num_valid,
    )
    candidates.check_image_ids(
        image_ids, bank_source_images, patch_features.shape[0], memory_bank.shape[0]
    )
    if valid_images is not None and np.shape(valid_images) != patch_features.shape[:1]:
        raise ValueError(
            f"valid_images must have shape ({patch_features.shape[0]},), got "
            f"{np.shape(valid_images)}"
        )
    count = candidates.candidates_for(precision, num_neighbors, num_candidates, candidate_search)
    return _score_patch_features(
        patch_features,
        memory_bank,
        grid_shape=tuple(int(s) for s in grid_shape),
        out_shape=tuple(int(s) for s in out_shape),
        num_neighbors=num_neighbors,
        squared=distance == "squared_l2",
        reweight=bool(reweight),
        reweight_neighbors=reweight_neighbors,
        sigma=float(sigma),
        bank_block_size=bank_block_size,
        query_block_size=query_block_size,
        mesh=single_device_mesh() if mesh is None else mesh,
        num_candidates=count,
        num_valid=None if num_valid is None else jnp.asarray(num_valid, jnp.int32),
        search=knn.search_arrays(precision, candidate_search, memory_bank, search),
        image_ids=image_ids,
        bank_source_images=bank_source_images,
        certified=precision == "exact" and count is not None,
        valid_images=valid_images,
    )


def _check_arguments(
    patch_features: jax.Array,
    memory_bank: jax.Array,
    grid_shape: tuple[int, int],
    out_shape: tuple[int, int],
    *,
    num_neighbors: int,
    distance: str,
    reweight: bool,
    reweight_neighbors: int,
    sigma: float,
    bank_block_size: int,
    query_block_size: int,
    num_valid: int | jax.Array | None,
) -> None:
    """Raises ValueError for arguments ``score_patch_features`` cannot score with."""
    if patch_features.ndim != 3:
        raise ValueError(f"patch_features must be [B, P, D], got shape {patch_features.shape}")
    candidates.check_rows("memory_bank", memory_bank, patch_features.shape[2])
    grid_shape, out_shape = tuple(int(s) for s in grid_shape), tuple(int(s) for s in out_shape)
    if len(grid_shape) != 2 or math.prod(grid_shape) != patch_features.shape[1]:
        raise ValueError(
            f"grid_shape {grid_shape} must be (h, w) with h * w == P = {patch_features.shape[1]}"
        )
    if len(out_shape) != 2 or min(out_shape) < 1:
        raise ValueError(f"out_shape must be (H, W) of positive sizes, got {out_shape}")
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    candidates.check_positive_integers(
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
