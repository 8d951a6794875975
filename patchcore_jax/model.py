"""PatchCore: fit a memory bank on nominal images, then score and localise anomalies.

This module only orchestrates the device stages (backbone -> features -> coreset -> scoring); the
pure, jittable functions underneath (``embed_images``, ``features.patch_features``,
``coreset.build_memory_bank``, ``scoring.score_patch_features``) are public for use inside other
JAX programs.
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from patchcore_jax import calibration, coreset, features, scoring, sharding
from patchcore_jax.backbones import Backbone, load_backbone, probe_batch_norm
from patchcore_jax.config import PatchCoreConfig

ImageBatches = np.ndarray | jax.Array | Iterable[np.ndarray]


def embed_images(
    module: Any,
    variables: Any,
    images: jax.Array,
    *,
    pretrain_embed_dimension: int,
    target_embed_dimension: int,
    patch_size: int,
    precision: str = "exact",
) -> jax.Array:
    """Backbone + locally aware patch features, one pure function.

    Args:
      module: the backbone's Flax module (returns a dict of stage outputs, first = finest grid).
      variables: its variables.
      images: [B, H, W, 3] uint8 (or float 0..255) RGB.
      precision: ``exact`` (float32) or ``fast``: the backbone runs in bfloat16 (variables cast
        by ``backbone_variables``, here if not yet, and the normalised input), and its stage
        outputs are cast back to float32; the patch features are float32 either way.
    Returns:
      [B, h * w, target_embed_dimension] float32 patch features on the finest stage's grid.
    """
    if precision == "exact":
        stage_outputs = module.apply(variables, images)
    elif precision == "fast":
        normalized = module.apply({}, images, method="normalize_input")
        stage_outputs = module.apply(
            backbone_variables(variables, precision),
            normalized.astype(jnp.bfloat16),
            method="forward_normalized",
        )
        stage_outputs = {name: x.astype(jnp.float32) for name, x in stage_outputs.items()}
    else:
        raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
    return features.patch_features(
        list(stage_outputs.values()),
        pretrain_embed_dimension=pretrain_embed_dimension,
        target_embed_dimension=target_embed_dimension,
        patch_size=patch_size,
    )


def backbone_variables(variables: Any, precision: str) -> Any:
    """The backbone variables ``embed_images`` runs with: unchanged for ``exact``, floating
    leaves cast to bfloat16 for ``fast``."""
    if precision == "exact":
        return variables

    def cast(leaf: Any) -> Any:
        return leaf.astype(jnp.bfloat16) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree.map(cast, variables)


def _not_uint8_message(batch: np.ndarray) -> str:
    """Why a non-uint8 image batch is refused, with its dtype and value range."""
    described = f"dtype {batch.dtype}"
    if batch.size and np.issubdtype(batch.dtype, np.number):
        values = batch.astype(np.float64)
        finite = values[np.isfinite(values)]
        if finite.size:
            described += f", values {finite.min():g}..{finite.max():g}"
        if finite.size < values.size:
            described += f", {values.size - finite.size} non-finite"
    return (
        "images must be uint8 RGB pixels 0..255 (what patchcore_jax.preprocess produces); got "
        f"{described}. Scores of other ranges would silently differ: convert explicitly, e.g. "
        "np.round(x * 255).astype(np.uint8) for floats in 0..1"
    )


def _batches(
    images: ImageBatches, batch_size: int, image_shape: tuple[int, int, int]
) -> Iterator[np.ndarray]:
    """Host batches of at most ``batch_size`` images from an array or an iterable of batches.

    Every batch must be uint8 [B, *image_shape] (the preprocessed crops the model was built
    for): other dtypes and ranges are refused rather than scored differently.
    """
    for batch in [images] if isinstance(images, np.ndarray | jax.Array) else images:
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[1:] != image_shape:
            expected = ", ".join(map(str, ("B", *image_shape)))
            raise ValueError(f"images must be preprocessed crops [{expected}], got {batch.shape}")
        if batch.dtype != np.uint8:
            raise ValueError(_not_uint8_message(batch))
        for start in range(0, batch.shape[0], batch_size):
            yield batch[start : start + batch_size]


def _check_finite_rows(rows: np.ndarray | jax.Array, what: str) -> None:
    """ValueError naming how many rows of ``rows: [N, D]`` hold a NaN or infinite value."""
    if isinstance(rows, jax.Array):
        bad = int(jnp.sum(~jnp.all(jnp.isfinite(rows), axis=-1)))
    else:  # host rows, in chunks so the check never doubles host memory
        rows = np.asarray(rows)
        bad = sum(
            int(np.count_nonzero(~np.isfinite(rows[start : start + 8192]).all(axis=-1)))
            for start in range(0, rows.shape[0], 8192)
        )
    if bad:
        raise ValueError(
            f"{what}: {bad} of {rows.shape[0]} rows are non-finite (NaN or inf); "
            "check the input images (non-finite or out-of-range pixels) and the backbone weights"
        )


class PatchCore:
    """A PatchCore anomaly detector.

    >>> model = PatchCore(PatchCoreConfig(backbone="mobilenet_v2", coreset_fraction=0.1))
    >>> model.fit(train_images)                      # uint8 [N, 224, 224, 3], or batches of them
    >>> image_scores, anomaly_maps = model.predict(test_images)

    Images are preprocessed uint8 crops (see ``patchcore_jax.preprocess``) of
    ``config.image_shape``. Work is spread over ``mesh`` (default: every device, data-parallel);
    results do not depend on the device count. With ``config.batch_norm_probe`` (the default, as
    the reference) the backbone's BatchNorm statistics are probed once here, for this image
    shape (``backbones.probe_batch_norm``), unless ``backbone`` was already probed for it (e.g.
    another model's ``backbone``).
    """

    def __init__(
        self,
        config: PatchCoreConfig | None = None,
        *,
        backbone: Backbone | None = None,
        mesh: Mesh | None = None,
        memory_bank: jax.Array | np.ndarray | None = None,
    ) -> None:
        self.config = config = config if config is not None else PatchCoreConfig()
        if backbone is None:
            backbone = load_backbone(config.backbone, config.layers)
        elif backbone.name != config.backbone:
            raise ValueError(
                f"backbone {backbone.name!r} does not match config.backbone {config.backbone!r}"
            )
        self.image_shape: tuple[int, int] = config.image_shape
        probed = backbone.probed_image_shape
        if config.batch_norm_probe and probed is None:
            backbone = probe_batch_norm(backbone, self.image_shape)
        elif probed is not None and (not config.batch_norm_probe or probed != self.image_shape):
            wanted = self.image_shape if config.batch_norm_probe else "no probe"
            raise ValueError(
                f"backbone statistics were probed at {probed}, but this config needs {wanted}; "
                "pass a backbone with pristine statistics"
            )
        self.backbone = backbone
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self._num_shards = sharding.mesh_size(self.mesh)
        # This process's share of each batch, padded to a fixed size (a multiple of its devices
        # in the mesh) so that the embedding compiles exactly once.
        local_devices = max(1, self._num_shards // jax.process_count())
        self._batch_size = -(-config.batch_size // local_devices) * local_devices
        self._batch_sharding = batch_sharding = sharding.row_sharding(self.mesh)
        self._embed = jax.jit(
            functools.partial(
                embed_images,
                backbone.module,
                pretrain_embed_dimension=config.pretrain_embed_dimension,
                target_embed_dimension=config.target_embed_dimension,
                patch_size=config.patch_size,
                precision=config.precision,
            ),
            in_shardings=(sharding.replicated(self.mesh), batch_sharding),
            out_shardings=batch_sharding,
        )
        self._variables = jax.device_put(
            backbone_variables(backbone.variables, config.precision),
            sharding.replicated(self.mesh),
        )
        # (h, w) of the patch grid: the finest stage's output for the configured image shape.
        stage_shapes = jax.eval_shape(
            backbone.module.apply,
            backbone.variables,
            jax.ShapeDtypeStruct((1, *self.image_shape, 3), jnp.uint8),
        )
        finest = next(iter(stage_shapes.values()))
        self.grid_shape: tuple[int, int] = (int(finest.shape[1]), int(finest.shape[2]))
        for stage, shape in stage_shapes.items():
            if min(shape.shape[1:3]) < config.patch_size:
                warnings.warn(
                    f"image size {self.image_shape[0]}x{self.image_shape[1]} gives a "
                    f"{shape.shape[1]}x{shape.shape[2]} grid at {stage}, smaller than the "
                    f"{config.patch_size}x{config.patch_size} patch neighbourhood: its features "
                    "are mostly zero padding; use larger images",
                    stacklevel=2,
                )
        # Results come back split like the images, so each process reads its own rows.
        self._score = jax.jit(
            functools.partial(
                scoring.score_patch_features, **self.scoring_options(), mesh=self.mesh
            ),
            out_shardings=batch_sharding,
        )
        self.memory_bank: jax.Array | None = None
        # Thresholds and score distributions (``fit`` with ``config.calibration``, ``calibrate``)
        # and the training image each bank row was taken from (known after a calibrated fit).
        self.calibration: calibration.Calibration | None = None
        self.bank_source_images: np.ndarray | None = None
        if memory_bank is not None:
            self._set_memory_bank(memory_bank)

    def scoring_options(self) -> dict[str, Any]:
        """The keyword arguments (all but ``mesh``) of ``scoring.score_patch_features`` with
        which this model scores: one place for the scoring, calibration and export programs."""
        config = self.config
        return {
            "grid_shape": self.grid_shape,
            "out_shape": self.image_shape,
            "num_neighbors": config.num_neighbors,
            "distance": config.distance,
            "reweight": config.reweight,
            "reweight_neighbors": config.reweight_neighbors,
            "sigma": config.anomaly_map_sigma,
            "bank_block_size": config.bank_block_size,
            "query_block_size": config.query_block_size,
            "precision": config.precision,
        }

    # ------------------------------------------------------------------ embedding

    def embed(self, images: ImageBatches) -> Iterator[tuple[jax.Array, int]]:
        """Yields ``(patch_features [batch, P, D] on device, num_valid_images)`` per batch.

        With several processes, each passes its own images; the yielded array is global and
        ``num_valid_images`` counts this process's images (see ``sharding.process_local_rows``).
        """
        for batch in _batches(images, self._batch_size, (*self.image_shape, 3)):
            num_valid = batch.shape[0]
            padded = sharding.pad_rows(batch, self._batch_size)
            global_batch = jax.make_array_from_process_local_data(self._batch_sharding, padded)
            yield self._embed(self._variables, global_batch), num_valid

    # ------------------------------------------------------------------ fitting

    def fit(
        self,
        images: ImageBatches,
        *,
        progress: Callable[[int], None] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> PatchCore:
        """Builds the memory bank from nominal images: ``patch_features`` then ``fit_features``.

        Args:
          images: uint8 [N, H, W, 3] (``config.image_shape``), or an iterable of such batches
            (host memory then grows with the bank, not with the images).
          progress: called with the number of images embedded after each batch.
          log: called with one-line status messages (coreset size and timing).
        """
        return self.fit_features(self.patch_features(images, progress=progress), log=log)

    def patch_features(
        self, images: ImageBatches, *, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """All patch features of ``images`` on the host: [N * h * w, D] float32, image-major.

        With several processes, every process returns the rows of all processes' images
        (process 0's first), so that each one holds the whole bank for the coreset.
        """
        chunks: list[np.ndarray] = []
        for patch_features, num_valid in self.embed(images):
            # One device->host copy per batch keeps device memory bounded by a batch.
            rows = sharding.process_local_rows(patch_features)[:num_valid]
            chunks.append(rows.reshape(-1, rows.shape[-1]))
            if progress is not None:
                progress(num_valid)
        local = np.concatenate(chunks) if chunks else None
        bank_features = sharding.gather_rows_from_processes(local)
        if bank_features is None:
            raise ValueError("fit() received no images")
        return bank_features

    def fit_features(
        self,
        bank_features: np.ndarray | jax.Array,
        *,
        log: Callable[[str], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> PatchCore:
        """Subsamples patch features [N, D] into the memory bank (``config.sampler``), then
        calibrates the thresholds (``config.calibration``).

        With a calibration the features must be whole images' ([num_images * h * w, D],
        image-major, as ``patch_features`` returns): ``self-excluded`` scores each image against
        the bank without its own rows (the bank is the same as without calibration),
        ``held-out`` keeps a seeded ``calibration_fraction`` of the images out of the bank.
        Raises ValueError if any row is NaN or infinite: one such row would be every test
        patch's nearest neighbour (or nobody's) and silently change every later score.
        ``progress`` is called with the number of greedy coreset steps done after each chunk.
        """
        config = self.config
        _check_finite_rows(bank_features, "patch features")
        config.check_bank_size(self._bank_rows(bank_features.shape[0]))  # before any work
        if config.calibration == "none":
            self._set_memory_bank(self._subsample(bank_features, log, progress)[0])
            self.calibration = self.bank_source_images = None
            return self
        num_patches = math.prod(self.grid_shape)
        features = np.asarray(bank_features)
        if features.ndim != 2 or features.shape[0] % num_patches:
            raise ValueError(
                f"calibration {config.calibration!r} needs the patch features of whole images "
                f"([num_images * {num_patches}, D], as patch_features returns), got "
                f"{features.shape}; or use calibration='none'"
            )
        num_images = features.shape[0] // num_patches
        per_image = features.reshape(num_images, num_patches, -1)
        if config.calibration == "held-out":
            held_out = calibration.held_out_images(
                num_images, config.calibration_fraction, config.seed
            )
            bank_images = np.setdiff1d(np.arange(num_images), held_out)
            features = per_image[bank_images].reshape(-1, features.shape[1])
        elif num_images < 2:
            raise ValueError(
                "self-excluded calibration needs at least 2 training images (each is scored "
                "against the others' bank rows), got 1; use calibration='none'"
            )
        else:
            bank_images = np.arange(num_images)
        memory_bank, rows = self._subsample(features, log, progress, with_rows=True)
        self._set_memory_bank(memory_bank)
        # None for learned proxies: they are no image's rows (only held-out calibrates them).
        self.bank_source_images = (
            None if rows is None else bank_images[rows // num_patches].astype(np.int32)
        )
        start = time.perf_counter()
        if config.calibration == "held-out":
            image_scores, maps = self._calibration_scores(per_image[held_out])
        else:
            image_scores, maps = self._calibration_scores(per_image, self_excluded=True)
            held_out = None
        self.calibration = calibration.calibrate(
            image_scores,
            maps,
            method=config.calibration,
            quantile=config.threshold_quantile,
            images=held_out,
        )
        if log is not None:
            log(
                f"calibration: {self.calibration.describe()} in {time.perf_counter() - start:.1f} s"
            )
        return self

    def _selected_rows(
        self, features: np.ndarray, progress: Callable[[int], None] | None
    ) -> np.ndarray | None:
        """Indices of the rows ``coreset.build_memory_bank`` keeps for ``config`` (the same
        calls with the same key), or None for ``learned_proxies`` (no row is kept as is)."""
        config = self.config
        num_rows = features.shape[0]
        num_samples = max(1, int(num_rows * config.coreset_fraction))
        key = jax.random.key(config.seed)
        if config.sampler == "identity":
            return np.arange(num_rows)
        if config.sampler == "random":
            return np.asarray(coreset.random_subsample(num_rows, num_samples, key))
        if config.sampler == "approx_greedy_coreset":
            return np.asarray(
                coreset.approximate_greedy_coreset(
                    features,
                    num_samples,
                    key=key,
                    projection_dim=config.projection_dim,
                    num_start_points=config.num_start_points,
                    mesh=self.mesh,
                    method=config.coreset_method,
                    progress=progress,
                )
            )
        return None

    def _subsample(
        self,
        bank_features: np.ndarray | jax.Array,
        log: Callable[[str], None] | None,
        progress: Callable[[int], None] | None = None,
        *,
        with_rows: bool = False,
    ) -> tuple[jax.Array, np.ndarray | None]:
        """``(memory_bank [M, D], rows [M] or None)``: ``coreset.build_memory_bank``, or with
        ``with_rows`` the same bank taken as ``bank_features[rows]`` so that each bank row's
        source is known (rows None for ``learned_proxies``)."""
        config = self.config
        num_rows = bank_features.shape[0]
        config.check_bank_size(self._bank_rows(num_rows))  # held-out images leave fewer rows
        if log is not None:
            log(
                f"memory bank: subsampling {num_rows} patches ({config.sampler}, fraction "
                f"{config.coreset_fraction}) on {self._num_shards} device(s)"
            )
        start = time.perf_counter()
        rows = self._selected_rows(bank_features, progress) if with_rows else None
        if rows is not None:
            memory_bank = jnp.asarray(np.asarray(bank_features)[rows], jnp.float32)
        else:
            memory_bank = coreset.build_memory_bank(
                bank_features,
                sampler=config.sampler,
                fraction=config.coreset_fraction,
                key=jax.random.key(config.seed),
                projection_dim=config.projection_dim,
                num_start_points=config.num_start_points,
                mesh=self.mesh,
                coreset_method=config.coreset_method,
                progress=progress,
            )
        memory_bank = jax.block_until_ready(memory_bank)
        if log is not None:
            log(
                f"memory bank: {num_rows} patches -> {memory_bank.shape[0]} "
                f"in {time.perf_counter() - start:.1f} s"
            )
        return memory_bank, rows

    def _calibration_scores(
        self, per_image: np.ndarray, *, self_excluded: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores patch features ``[N, P, D]`` batch by batch: ``([N], [N, H, W])``.

        ``self_excluded``: image ``i`` of ``per_image`` is training image ``i``, and its k-NN
        skips the bank rows taken from it (``calibration.self_excluded_scores``).
        """
        if self_excluded:
            sources = sharding.replicate(self.bank_source_images, self.mesh)
            score = functools.partial(
                calibration.self_excluded_scores, **self.scoring_options(), mesh=self.mesh
            )
        scores, maps = [], []
        for start in range(0, len(per_image), self._batch_size):
            batch = per_image[start : start + self._batch_size]
            num_valid = len(batch)
            padded = sharding.pad_rows(batch, self._batch_size)
            global_batch = jax.make_array_from_process_local_data(self._batch_sharding, padded)
            if self_excluded:
                ids = np.arange(start, start + self._batch_size, dtype=np.int32)
                ids[num_valid:] = -2  # padding: matches no bank row's image
                # Split like the batch (every process passes the same rows; each reads its own).
                global_ids = jax.make_array_from_process_local_data(self._batch_sharding, ids)
                result = score(global_batch, global_ids, self.memory_bank, sources)
            else:
                result = self._score(global_batch, self.memory_bank)
            scores.append(sharding.process_local_rows(result.image_scores)[:num_valid])
            maps.append(sharding.process_local_rows(result.anomaly_maps)[:num_valid])
        return np.concatenate(scores), np.concatenate(maps)

    def calibrate(
        self,
        images: ImageBatches,
        *,
        labels: np.ndarray | None = None,
        masks: np.ndarray | None = None,
    ) -> calibration.Calibration:
        """Calibrates the thresholds on a validation set, replacing the fitted calibration.

        Args:
          images: uint8 [N, H, W, 3] (or batches), nominal unless ``labels`` says otherwise.
          labels: [N] 0/1; with defect images the image threshold is F1-optimal.
          masks: [N, H, W] bool ground truth; with defect pixels the pixel threshold is too.
        """
        image_scores, maps = self.predict(images)
        self.calibration = calibration.calibrate(
            image_scores,
            maps,
            method="validation",
            quantile=self.config.threshold_quantile,
            labels=labels,
            masks=masks,
        )
        return self.calibration

    def bank_size(self, num_images: int) -> int:
        """Rows of the memory bank ``fit`` builds from ``num_images`` images (known up front,
        so that k and b can be checked against it before any work)."""
        return self._bank_rows(num_images * math.prod(self.grid_shape))

    def _bank_rows(self, num_patches: int) -> int:
        """Memory-bank rows kept from ``num_patches`` (``coreset.build_memory_bank``'s rule)."""
        if self.config.sampler == "identity":
            return num_patches
        return max(1, int(num_patches * self.config.coreset_fraction))

    # ------------------------------------------------------------------ incremental fit

    def extend(
        self,
        images: ImageBatches,
        *,
        progress: Callable[[int], None] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> PatchCore:
        """Adds nominal images to a fitted model without a refit: ``patch_features`` then
        ``extend_features``."""
        return self.extend_features(self.patch_features(images, progress=progress), log=log)

    def extend_features(
        self,
        new_features: np.ndarray | jax.Array,
        *,
        log: Callable[[str], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> PatchCore:
        """Grows the memory bank by ``coreset_fraction`` of ``new_features`` [N_new, D].

        The greedy selection continues from the current bank: its rows count as already
        selected, every new row starts at its distance to the nearest of them (after the fit's
        projection, same seed), and ``int(N_new * coreset_fraction)`` new rows are chosen
        (``random``: that many at random; ``identity``: all). The old rows stay, first.

        Unlike a refit on all images, the old selection is not revisited (rows the new images
        make redundant stay) and the start points play no part; the bank grows by the same
        count as a refit's would. Thresholds stay calibrated on the original training images
        (a warning says so): recalibrate with ``calibrate`` on held-out images if they shift.
        ``progress`` counts greedy steps.
        """
        if self.memory_bank is None:
            raise RuntimeError("PatchCore.extend called before fit() or load()")
        config = self.config
        if config.sampler == "learned_proxies":
            raise ValueError(
                "extend continues a selection of bank rows; the learned_proxies sampler has "
                "none: refit instead"
            )
        _check_finite_rows(new_features, "patch features")
        num_rows = new_features.shape[0]
        num_new = max(1, int(num_rows * config.coreset_fraction))
        old_bank = np.asarray(self.memory_bank)
        start = time.perf_counter()
        if config.sampler == "identity":
            rows = np.arange(num_rows)
        elif config.sampler == "random":
            key = jax.random.fold_in(jax.random.key(config.seed), old_bank.shape[0])
            rows = np.asarray(coreset.random_subsample(num_rows, num_new, key))
        else:
            rows = np.asarray(
                coreset.approximate_greedy_coreset(
                    new_features,
                    num_new,
                    key=jax.random.key(config.seed),  # the fit's projection
                    projection_dim=config.projection_dim,
                    mesh=self.mesh,
                    method=config.coreset_method,
                    progress=progress,
                    selected_rows=old_bank,
                )
            )
        added = np.asarray(new_features)[rows].astype(np.float32)
        self._set_memory_bank(np.concatenate([old_bank, added]))
        self.bank_source_images = None  # the old images' rows are not numbered any more
        if log is not None:
            log(
                f"memory bank: {old_bank.shape[0]} + {len(rows)} of {num_rows} new patches -> "
                f"{self.memory_bank.shape[0]} in {time.perf_counter() - start:.1f} s"
            )
        if self.calibration is not None:
            warnings.warn(
                "the decision thresholds stay calibrated on the original training images; "
                "refit, or recalibrate on held-out good images, to include the new ones",
                stacklevel=2,
            )
        return self

    def _set_memory_bank(self, memory_bank: jax.Array | np.ndarray) -> None:
        dim = self.config.target_embed_dimension
        if memory_bank.ndim != 2 or memory_bank.shape[1] != dim or memory_bank.shape[0] < 1:
            raise ValueError(
                f"memory bank must be [M >= 1, {dim}] (target_embed_dimension), "
                f"got {tuple(memory_bank.shape)}"
            )
        self.config.check_bank_size(memory_bank.shape[0])
        memory_bank = np.asarray(memory_bank, np.float32)
        _check_finite_rows(memory_bank, "memory bank")
        # Placed once, so scoring calls do not copy the bank from the host again.
        self.memory_bank = sharding.replicate(memory_bank, self.mesh)

    # ------------------------------------------------------------------ inference

    def score(self, images: ImageBatches) -> Iterator[scoring.ScoreResult]:
        """Yields host-side ``ScoreResult`` per batch (image scores, maps, patch scores).

        An image whose patch features are not all finite scores NaN (never a plausible number).
        """
        if self.memory_bank is None:
            raise RuntimeError("PatchCore.score/predict called before fit() or load()")
        for patch_features, num_valid in self.embed(images):
            result = self._score(patch_features, self.memory_bank)
            yield jax.tree.map(lambda x, n=num_valid: sharding.process_local_rows(x)[:n], result)

    def predict(self, images: ImageBatches) -> tuple[np.ndarray, np.ndarray]:
        """Scores images: returns ``(image_scores [N] float32, anomaly_maps [N, H, W])``."""
        results = list(self.score(images))
        if not results:
            raise ValueError("predict() received no images")
        image_scores = np.concatenate([r.image_scores for r in results])
        anomaly_maps = np.concatenate([r.anomaly_maps for r in results])
        return image_scores, anomaly_maps

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        """Writes an orbax checkpoint folder; see ``patchcore_jax.checkpoint.save``."""
        from patchcore_jax import checkpoint

        return checkpoint.save(self, path, **kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> PatchCore:
        """Restores a model written by ``save``; see ``patchcore_jax.checkpoint.load``."""
        from patchcore_jax import checkpoint

        return checkpoint.load(path, **kwargs)
