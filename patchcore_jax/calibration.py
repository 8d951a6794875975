"""Decision thresholds from nominal scores, and scores normalised so that the threshold is 0.5.

PatchCore is fitted on defect-free images only, so its thresholds come from nominal scores that
the bank has not memorised. By default (``self-excluded``) every training image is scored
against the fitted bank with the bank rows taken from that same image left out: a held-out-like
nominal score at the cost of one scoring pass, with the bank (and so every reported number)
untouched. ``held-out`` keeps a seeded fraction of the training images out of the bank instead,
and a user-given validation set (nominal or labelled) can be used after fitting.

Thresholds are a quantile of the nominal scores, or F1-optimal on a labelled validation set.
Normalised scores follow anomalib: ``clip((s - threshold) / (max - min) + 0.5, 0, 1)`` with min
and max of the calibration scores, so the threshold maps to 0.5.

The device part (``self_excluded_scores``) is a masked variant of ``scoring``'s blocked k-NN; the
rest is host code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from patchcore_jax import scoring
from patchcore_jax.config import CALIBRATION_METHODS
from patchcore_jax.sharding import ALL_AXES, HIGHEST, mesh_size

NUM_PIXEL_QUANTILES = 101  # the stored pixel-score distribution: its 0th..100th percentiles
_PADDING = -1  # source image of padded bank rows / padded queries (never a real image)

# ----------------------------------------------------------------------------------------------
# Device: k-NN that ignores the bank rows of the query's own image


def _masked_local_top_k(
    queries: jax.Array,
    query_images: jax.Array,
    bank: jax.Array,
    bank_images: jax.Array,
    search: tuple[jax.Array, jax.Array] | None,
    k: int,
    bank_tile: int,
    query_tile: int,
    num_candidates: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """k smallest squared distances of ``queries: [q, D]`` to rows of ``bank: [r, D]`` whose
    source image differs from the query's (``query_images: [q]``, ``bank_images: [r]`` int32).

    Excluded and padded (``bank_images < 0``) rows get an infinite distance. ``q``, ``r`` are
    multiples of the tiles. ``num_candidates`` None is exact; an int is the ``fast`` precision
    (that many candidates by bfloat16 distances, or by low-rank ones with ``search`` = ``(basis,
    projected bank)``, re-ranked exactly: ``scoring._rerank``).
    Returns ``([q, k] float32, [q, k] int32)`` sorted by (distance, index).
    """
    num_queries, dim = queries.shape
    num_tiles = bank.shape[0] // bank_tile
    rows = jnp.arange(bank.shape[0], dtype=jnp.int32)
    bank_norms = jnp.where(bank_images >= 0, jnp.sum(bank * bank, axis=1), jnp.inf)
    fast = num_candidates is not None
    low_rank = fast and search is not None
    tile_bank, tile_norms = (bank.astype(jnp.bfloat16) if fast else bank), bank_norms
    if low_rank:
        basis, tile_bank = search[0], search[1].astype(jnp.float32)
        tile_norms = jnp.where(bank_images >= 0, jnp.sum(tile_bank * tile_bank, axis=1), jnp.inf)
    tiles = tuple(
        x.reshape(num_tiles, bank_tile, *x.shape[1:])
        for x in (tile_bank, tile_norms, bank_images, rows)
    )
    width = num_candidates if fast else k

    def query_block(block: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        block_queries, block_images = block
        query_norms = jnp.sum(block_queries * block_queries, axis=1)
        block_search, search_norms = block_queries.astype(jnp.bfloat16), query_norms
        if low_rank:
            block_search = jnp.dot(block_queries, basis, precision=HIGHEST)
            search_norms = jnp.sum(block_search * block_search, axis=1)

        def bank_step(carry, tile):
            tile_rows, tile_norms, tile_images, tile_indices = tile
            if fast:
                distances = scoring._approximate_distances(
                    block_search, search_norms, tile_rows, tile_norms
                )
            else:
                products = jnp.dot(block_queries, tile_rows.T, precision=HIGHEST)
                distances = (query_norms[:, None] + tile_norms[None, :]) - 2.0 * products
                distances = jnp.maximum(distances, 0.0)
            distances = jnp.where(block_images[:, None] == tile_images[None, :], jnp.inf, distances)
            indices = jnp.broadcast_to(tile_indices[None, :], distances.shape)
            if fast and k == 1:  # as the fast scoring k-NN: each group proposes its nearest
                distances, indices = scoring._group_nearest(distances, indices)
            return scoring._merge_top_k(*carry, distances, indices), None

        init = (
            jnp.full((query_tile, width), jnp.inf, jnp.float32),
            jnp.full((query_tile, width), scoring._NO_INDEX, jnp.int32),
        )
        best, _ = lax.scan(bank_step, init, tiles)
        if not fast:
            return best
        return scoring._rerank(block_queries, query_norms, bank, bank_norms, *best, 0, k)

    blocks = (
        queries.reshape(num_queries // query_tile, query_tile, dim),
        query_images.reshape(num_queries // query_tile, query_tile),
    )
    distances, indices = lax.map(query_block, blocks)
    return distances.reshape(num_queries, k), indices.reshape(num_queries, k)


@functools.partial(
    jax.jit,
    static_argnames=(
        "grid_shape",
        "out_shape",
        "num_neighbors",
        "distance",
        "reweight",
        "reweight_neighbors",
        "sigma",
        "bank_block_size",
        "query_block_size",
        "mesh",
        "precision",
        "num_candidates",
        "candidate_search",
    ),
)
def self_excluded_scores(
    patch_features: jax.Array,
    image_ids: jax.Array,
    memory_bank: jax.Array,
    bank_source_images: jax.Array,
    search: tuple[jax.Array, jax.Array] | None = None,
    *,
    grid_shape: tuple[int, int],
    out_shape: tuple[int, int],
    num_neighbors: int,
    distance: str,
    reweight: bool,
    reweight_neighbors: int,
    sigma: float,
    bank_block_size: int,
    query_block_size: int,
    mesh: Mesh,
    precision: str = "exact",
    num_candidates: int | None = None,
    candidate_search: str = "bfloat16",
) -> scoring.ScoreResult:
    """``scoring.score_patch_features`` with each image's own bank rows left out of its k-NN.

    Args:
      patch_features: ``[B, P, D] float32``.
      image_ids: ``[B] int32``, the training-image index of each image (negative: padding).
      memory_bank: ``[M, D] float32``.
      bank_source_images: ``[M] int32``, the training image each bank row was taken from.
      search: ``scoring.low_rank_search(memory_bank)`` for ``candidate_search="low-rank"``
        (required there: this function is traced), else None.
      mesh: queries are split over all its devices, the bank is replicated.
      Other arguments as ``scoring.score_patch_features``.
    Returns:
      ``ScoreResult`` whose nearest indices never point at a row of the query's image.
    """
    batch, num_patches, dim = patch_features.shape
    queries = patch_features.reshape(batch * num_patches, dim).astype(jnp.float32)
    query_images = jnp.repeat(image_ids.astype(jnp.int32), num_patches)
    num_queries, num_bank = queries.shape[0], memory_bank.shape[0]
    shards = mesh_size(mesh)
    query_tile, per_shard = scoring._tiling(num_queries, shards, query_block_size)
    bank_tile, bank_rows = scoring._tiling(num_bank, 1, bank_block_size)
    query_padding = shards * per_shard - num_queries
    queries = jnp.pad(queries, ((0, query_padding), (0, 0)))
    query_images = jnp.pad(query_images, (0, query_padding), constant_values=_PADDING - 1)
    bank = jnp.pad(memory_bank.astype(jnp.float32), ((0, bank_rows - num_bank), (0, 0)))
    bank_images = jnp.pad(
        bank_source_images.astype(jnp.int32), (0, bank_rows - num_bank), constant_values=_PADDING
    )
    num_candidates = scoring.candidates_for(precision, num_neighbors, num_candidates)
    if candidate_search not in scoring.CANDIDATE_SEARCHES:
        raise ValueError(
            f"candidate_search must be one of {scoring.CANDIDATE_SEARCHES}, "
            f"got {candidate_search!r}"
        )
    if num_candidates is None or candidate_search == "bfloat16":
        search = None
    elif search is None:
        raise ValueError("candidate_search='low-rank' needs search=scoring.low_rank_search(bank)")
    else:
        search = (search[0], jnp.pad(search[1], ((0, bank_rows - num_bank), (0, 0))))
    distances, indices = jax.shard_map(
        functools.partial(
            _masked_local_top_k,
            k=num_neighbors,
            bank_tile=bank_tile,
            query_tile=query_tile,
            num_candidates=num_candidates,
        ),
        mesh=mesh,
        in_specs=(P(ALL_AXES), P(ALL_AXES), P(), P(), None if search is None else (P(), P())),
        out_specs=(P(ALL_AXES), P(ALL_AXES)),
        check_vma=False,  # the scan's initial carry is unvarying, its body's output varying
    )(queries, query_images, bank, bank_images, search)
    distances, indices = distances[:num_queries], indices[:num_queries]
    if distance == "l2":
        distances = jnp.sqrt(distances)
    return scoring.scores_from_neighbors(
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
    )


# ----------------------------------------------------------------------------------------------
# Host: thresholds and normalisation


def held_out_images(num_images: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted indices of a seeded ``fraction`` of ``num_images`` training images (>= 1).

    Raises:
      ValueError: if holding them out leaves no training image for the bank.
    """
    count = max(1, round(num_images * fraction))
    if count >= num_images:
        raise ValueError(
            f"held-out calibration fraction {fraction} of {num_images} training image(s) leaves "
            "no training images for the memory bank; use more images or a smaller fraction"
        )
    order = np.random.default_rng(seed).permutation(num_images)
    return np.sort(order[:count]).astype(np.int64)


def normalize(values: Any, threshold: float, minimum: float, maximum: float) -> Any:
    """anomalib's normalisation: ``clip((values - threshold) / (maximum - minimum) + 0.5, 0, 1)``.

    Works on numpy and jax arrays (same dtype out as in for float32).
    """
    xp = jnp if isinstance(values, jax.Array) else np
    span = maximum - minimum if maximum > minimum else 1.0
    values = xp.asarray(values, dtype=xp.float32)
    return xp.clip((values - xp.float32(threshold)) / xp.float32(span) + xp.float32(0.5), 0, 1)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibrated thresholds of a fitted model and the score distributions they came from.

    Attributes:
      method: ``self-excluded``, ``held-out`` or ``validation``.
      rule: ``quantile`` (of the nominal scores) or ``f1`` (F1-optimal on labelled images).
      quantile: the quantile used by the ``quantile`` rule.
      image_threshold: images with ``score >= image_threshold`` are anomalous.
      image_min, image_max: range of the calibration image scores (for normalisation).
      pixel_threshold: pixels with ``map >= pixel_threshold`` belong to the defect mask.
      pixel_min, pixel_max: range of the calibration anomaly-map values.
      image_scores: ``[N] float32``, the calibration images' scores.
      pixel_maxima: ``[N] float32``, each calibration image's largest map value.
      pixel_quantiles: ``[101] float32``, percentiles 0..100 of all calibration map values.
      labels: ``[N]`` 0/1 for a labelled validation set, else None.
      images: training-image indices that were held out (``held-out``), else None.
    """

    method: str
    rule: str
    quantile: float
    image_threshold: float
    image_min: float
    image_max: float
    pixel_threshold: float
    pixel_min: float
    pixel_max: float
    image_scores: np.ndarray
    pixel_maxima: np.ndarray
    pixel_quantiles: np.ndarray
    labels: np.ndarray | None = None
    images: tuple[int, ...] | None = None

    def normalize_image_scores(self, image_scores: Any) -> Any:
        """``[N]`` scores -> ``[N]`` float32 in [0, 1], the threshold at 0.5."""
        return normalize(image_scores, self.image_threshold, self.image_min, self.image_max)

    def normalize_maps(self, anomaly_maps: Any) -> Any:
        """``[N, H, W]`` maps -> float32 in [0, 1], the pixel threshold at 0.5."""
        return normalize(anomaly_maps, self.pixel_threshold, self.pixel_min, self.pixel_max)

    def decisions(self, image_scores: np.ndarray) -> np.ndarray:
        """``[N]`` bool: True for anomalous images."""
        return np.asarray(image_scores) >= self.image_threshold

    def defect_masks(self, anomaly_maps: np.ndarray) -> np.ndarray:
        """``[N, H, W]`` bool defect masks at the pixel threshold."""
        return np.asarray(anomaly_maps) >= self.pixel_threshold

    def describe(self) -> str:
        """One line: where the threshold came from."""
        how = "F1-optimal on" if self.rule == "f1" else f"{self.quantile:g} quantile of"
        source = {
            "self-excluded": "self-excluded training scores",
            "held-out": "held-out training images",
            "validation": "validation images",
        }[self.method]
        return f"threshold {self.image_threshold:.6g} ({how} {len(self.image_scores)} {source})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (arrays become lists of floats)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.ndarray):
                value = value.tolist()
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Inverse of ``to_dict``."""
        values = dict(data)
        for name in ("image_scores", "pixel_maxima", "pixel_quantiles"):
            values[name] = np.asarray(values[name], np.float32)
        if values.get("labels") is not None:
            values["labels"] = np.asarray(values["labels"], np.int64)
        if values.get("images") is not None:
            values["images"] = tuple(int(i) for i in values["images"])
        if values["method"] not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {values['method']!r}")
        return cls(**values)


def calibrate(
    image_scores: np.ndarray,
    anomaly_maps: np.ndarray,
    *,
    method: str,
    quantile: float,
    labels: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    images: Any = None,
) -> Calibration:
    """Thresholds and normalisation ranges from calibration scores.

    Without defect images (``labels`` None or all 0) the image threshold is the ``quantile`` of
    the image scores and the pixel threshold the ``quantile`` of each image's maximum map value
    (so a nominal image gets an empty mask about as often as a nominal decision). With labelled
    defect images the image threshold is F1-optimal; with ``masks`` too, so is the pixel one.

    Args:
      image_scores: ``[N]``; anomaly_maps: ``[N, H, W]``; labels: ``[N]`` 0/1;
      masks: ``[N, H, W]`` bool ground truth (labelled sets only).
    """
    from patchcore_jax import metrics

    image_scores = np.asarray(image_scores, np.float32)
    anomaly_maps = np.asarray(anomaly_maps, np.float32)
    if image_scores.ndim != 1 or len(image_scores) < 1:
        raise ValueError("calibration needs at least one image score")
    if anomaly_maps.shape[:1] != image_scores.shape:
        raise ValueError(
            f"calibration: {len(image_scores)} image scores but maps of shape {anomaly_maps.shape}"
        )
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"threshold quantile must be in (0, 1], got {quantile!r}")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    pixel_maxima = anomaly_maps.reshape(len(anomaly_maps), -1).max(axis=1)
    defective = labels is not None and bool(np.any(labels))
    if defective:
        labels = np.asarray(labels, np.int64)
        if labels.shape != image_scores.shape:
            raise ValueError(f"calibration: {len(image_scores)} scores but {len(labels)} labels")
        image_threshold, _, _ = metrics.f1_optimal_threshold(labels, image_scores)
        if masks is not None and np.any(masks):
            pixel_threshold, _, _ = metrics.f1_optimal_threshold(
                np.asarray(masks, bool).ravel(), anomaly_maps.ravel()
            )
        else:
            nominal = pixel_maxima[labels == 0] if np.any(labels == 0) else pixel_maxima
            pixel_threshold = float(np.quantile(nominal, quantile))
    else:
        image_threshold = float(np.quantile(image_scores, quantile))
        pixel_threshold = float(np.quantile(pixel_maxima, quantile))
    return Calibration(
        method=method,
        rule="f1" if defective else "quantile",
        quantile=float(quantile),
        image_threshold=float(image_threshold),
        image_min=float(image_scores.min()),
        image_max=float(image_scores.max()),
        pixel_threshold=float(pixel_threshold),
        pixel_min=float(anomaly_maps.min()),
        pixel_max=float(anomaly_maps.max()),
        image_scores=image_scores,
        pixel_maxima=pixel_maxima,
        pixel_quantiles=np.quantile(anomaly_maps, np.linspace(0, 1, NUM_PIXEL_QUANTILES)).astype(
            np.float32
        ),
        labels=labels if labels is not None else None,
        images=None if images is None else tuple(int(i) for i in images),
    )
