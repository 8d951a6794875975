"""PatchCore: fit a memory bank on nominal images, then score and localise anomalies.

This module only orchestrates the device stages (backbone -> features -> coreset -> scoring); the
pure, jittable functions underneath (``embed_images``, ``features.patch_features``,
``coreset.build_memory_bank``, ``scoring.score_patch_features``) are public for use inside other
JAX programs.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from patchcore_jax import coreset, features, scoring, sharding
from patchcore_jax.backbones import Backbone, load_backbone
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
) -> jax.Array:
    """Backbone + locally aware patch features, one pure function.

    Args:
      module: the backbone's Flax module (returns a dict of stage outputs, first = finest grid).
      variables: its variables.
      images: [B, H, W, 3] uint8 (or float 0..255) RGB.
    Returns:
      [B, h * w, target_embed_dimension] float32 patch features on the finest stage's grid.
    """
    stage_outputs = module.apply(variables, images)
    return features.patch_features(
        list(stage_outputs.values()),
        pretrain_embed_dimension=pretrain_embed_dimension,
        target_embed_dimension=target_embed_dimension,
        patch_size=patch_size,
    )


def _batches(
    images: ImageBatches, batch_size: int, image_shape: tuple[int, int, int]
) -> Iterator[np.ndarray]:
    """Host batches of at most ``batch_size`` images from an array or an iterable of batches.

    Every batch must be [B, *image_shape] (the preprocessed crops the model was built for).
    """
    for batch in [images] if isinstance(images, np.ndarray | jax.Array) else images:
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[1:] != image_shape:
            expected = ", ".join(map(str, ("B", *image_shape)))
            raise ValueError(f"images must be preprocessed crops [{expected}], got {batch.shape}")
        for start in range(0, batch.shape[0], batch_size):
            yield batch[start : start + batch_size]


class PatchCore:
    """A PatchCore anomaly detector.

    >>> model = PatchCore(PatchCoreConfig(backbone="mobilenet_v2", coreset_fraction=0.1))
    >>> model.fit(train_images)                      # uint8 [N, 224, 224, 3], or batches of them
    >>> image_scores, anomaly_maps = model.predict(test_images)

    Images are preprocessed uint8 crops (see ``patchcore_jax.preprocess``). Work is spread over
    ``mesh`` (default: every device, data-parallel); results do not depend on the device count.
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
            ),
            in_shardings=(sharding.replicated(self.mesh), batch_sharding),
            out_shardings=batch_sharding,
        )
        self._variables = jax.device_put(backbone.variables, sharding.replicated(self.mesh))
        # (h, w) of the patch grid: the finest stage's output for the configured crop.
        stage_shapes = jax.eval_shape(
            backbone.module.apply,
            backbone.variables,
            jax.ShapeDtypeStruct((1, config.crop, config.crop, 3), jnp.uint8),
        )
        finest = next(iter(stage_shapes.values()))
        self.grid_shape: tuple[int, int] = (int(finest.shape[1]), int(finest.shape[2]))
        # Results come back split like the images, so each process reads its own rows.
        self._score = jax.jit(
            functools.partial(
                scoring.score_patch_features,
                grid_shape=self.grid_shape,
                out_shape=(config.crop, config.crop),
                num_neighbors=config.num_neighbors,
                distance=config.distance,
                reweight=config.reweight,
                reweight_neighbors=config.reweight_neighbors,
                sigma=config.anomaly_map_sigma,
                bank_block_size=config.bank_block_size,
                query_block_size=config.query_block_size,
                mesh=self.mesh,
            ),
            out_shardings=batch_sharding,
        )
        self.memory_bank: jax.Array | None = None
        if memory_bank is not None:
            self._set_memory_bank(memory_bank)

    # ------------------------------------------------------------------ embedding

    def embed(self, images: ImageBatches) -> Iterator[tuple[jax.Array, int]]:
        """Yields ``(patch_features [batch, P, D] on device, num_valid_images)`` per batch.

        With several processes, each passes its own images; the yielded array is global and
        ``num_valid_images`` counts this process's images (see ``sharding.process_local_rows``).
        """
        crop = self.config.crop
        for batch in _batches(images, self._batch_size, (crop, crop, 3)):
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
          images: uint8 [N, crop, crop, 3], or an iterable of such batches (host memory then
            grows with the bank, not with the images).
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
        """Subsamples patch features [N, D] into the memory bank (``config.sampler``).

        ``progress`` is called with the number of greedy coreset steps done after each chunk.
        """
        config = self.config
        num_rows = bank_features.shape[0]
        if log is not None:
            log(
                f"memory bank: subsampling {num_rows} patches ({config.sampler}, fraction "
                f"{config.coreset_fraction}) on {self._num_shards} device(s)"
            )
        start = time.perf_counter()
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
        self._set_memory_bank(memory_bank)
        return self

    def _set_memory_bank(self, memory_bank: jax.Array | np.ndarray) -> None:
        dim = self.config.target_embed_dimension
        if memory_bank.ndim != 2 or memory_bank.shape[1] != dim or memory_bank.shape[0] < 1:
            raise ValueError(
                f"memory bank must be [M >= 1, {dim}] (target_embed_dimension), "
                f"got {tuple(memory_bank.shape)}"
            )
        # Placed once, so scoring calls do not copy the bank from the host again.
        self.memory_bank = sharding.replicate(np.asarray(memory_bank, np.float32), self.mesh)

    # ------------------------------------------------------------------ inference

    def score(self, images: ImageBatches) -> Iterator[scoring.ScoreResult]:
        """Yields host-side ``ScoreResult`` per batch (image scores, maps, patch scores)."""
        if self.memory_bank is None:
            raise RuntimeError("PatchCore.score/predict called before fit() or load()")
        for patch_features, num_valid in self.embed(images):
            result = self._score(patch_features, self.memory_bank)
            yield jax.tree.map(lambda x, n=num_valid: sharding.process_local_rows(x)[:n], result)

    def predict(self, images: ImageBatches) -> tuple[np.ndarray, np.ndarray]:
        """Scores images: returns ``(image_scores [N] float32, anomaly_maps [N, crop, crop])``."""
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
