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

from patchcore_jax import calibration, coreset, feature_store, features, knn, scoring, sharding
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
        raise ValueError(_non_finite_message(what, bad, rows.shape[0]))


def _non_finite_message(what: str, bad: int, num_rows: int) -> str:
    return (
        f"{what}: {bad} of {num_rows} rows are non-finite (NaN or inf); "
        "check the input images (non-finite or out-of-range pixels) and the backbone weights"
    )


@jax.jit
def _finite_rows(batch: jax.Array) -> jax.Array:
    """[B, P, D] -> [B, P] bool: the rows without a NaN or infinite value."""
    return jnp.all(jnp.isfinite(batch), axis=-1)


def _gather_counts(local: np.ndarray) -> np.ndarray:
    """Every process's ``local`` (equal shapes, small): [processes, *local.shape]."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local[None]
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(local))
    return gathered.reshape(jax.process_count(), *local.shape)


def _gather_from_processes(rows: np.ndarray) -> np.ndarray:
    """Every process's host ``rows`` (any count, even 0) concatenated, process 0's first."""
    if jax.process_count() == 1:
        return rows
    from jax.experimental import multihost_utils

    counts = _gather_counts(np.int64(rows.shape[0])).reshape(-1)
    padded = np.zeros((max(1, int(counts.max())), *rows.shape[1:]), rows.dtype)
    padded[: rows.shape[0]] = rows
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([gathered[p, : counts[p]] for p in range(len(counts))])


def _megabytes(limit: float) -> str:
    return "unlimited" if math.isinf(limit) else f"{limit / 2**20:.0f} MB"


class _ImageLayout:
    """Where each training image of a streamed fit is, numbered as ``patch_features``'s rows
    (process 0's images first): ``process``, ``batch`` (index of the embedded batch),
    ``within`` (index among that process's images of the batch), ``position`` (row of the
    concatenated global batch arrays: ``batch * global_batch + row``), and ``first_image``
    (each process's first image number)."""

    def __init__(self, counts: np.ndarray, batch_sharding, batch_size: int) -> None:
        num_processes, num_batches = counts.shape
        self.global_batch = batch_size * num_processes
        blocks: dict[int, list[tuple[int, int]]] = {}
        for device, index in batch_sharding.devices_indices_map((self.global_batch,)).items():
            start, stop, _ = index[0].indices(self.global_batch)
            blocks.setdefault(device.process_index, []).append((start, stop))
        process, batch, within, position = [], [], [], []
        for q in range(num_processes):
            # This process's rows of a global batch, in the order of its local data.
            rows = np.concatenate([np.arange(a, b) for a, b in sorted(set(blocks[q]))])
            for b in range(num_batches):
                n = int(counts[q, b])
                process.append(np.full(n, q))
                batch.append(np.full(n, b))
                within.append(np.arange(n))
                position.append(b * self.global_batch + rows[:n])
        self.process, self.batch, self.within, self.position = (
            np.concatenate(x).astype(np.int64) for x in (process, batch, within, position)
        )
        self.first_image = np.concatenate([[0], np.cumsum(counts.sum(axis=1))[:-1]])


def _host_rows(result: scoring.ScoreResult, num_valid: int) -> scoring.ScoreResult:
    """This process's first ``num_valid`` rows of every field of a batch result, on the host."""
    return jax.tree.map(lambda x: sharding.process_local_rows(x)[:num_valid], result)


# The compiled programs, shared by every model with the same backbone, shapes, options and
# mesh (arguments are hashable: Flax modules, ints, tuples, meshes), so a second model of the
# same configuration in one process compiles nothing (and the CLI's persistent compilation
# cache covers new processes).


@functools.lru_cache(maxsize=16)
def _embed_program(
    module: Any, pretrain_dim: int, target_dim: int, patch_size: int, precision: str, mesh: Mesh
) -> Callable[[Any, jax.Array], jax.Array]:
    """``(variables, images [B, H, W, 3]) -> patch features [B, P, D]``, split like the images."""
    batch_sharding = sharding.row_sharding(mesh)
    return jax.jit(
        functools.partial(
            embed_images,
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
def _score_program(
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


def _embed_and_score_function(
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
        patch_features = embed_images(
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
def _predict_program(
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
    embed_and_score = _embed_and_score_function(
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
        self._batch_sharding = sharding.row_sharding(self.mesh)
        # What ``precision`` means on this mesh's platform, fixed when the programs are built:
        # ``fast`` takes the fastest approximation the backend has (see ``describe``).
        self.platform: str = self.mesh.devices.flat[0].platform
        self.backbone_dtype, self.candidate_search = backend_numerics(
            config.precision, self.platform
        )
        backbone_precision = "fast" if self.backbone_dtype == "bfloat16" else "exact"
        self._backbone_precision = backbone_precision
        self._embed = _embed_program(
            backbone.module,
            config.pretrain_embed_dimension,
            config.target_embed_dimension,
            config.patch_size,
            backbone_precision,
            self.mesh,
        )
        self._variables = jax.device_put(
            backbone_variables(backbone.variables, backbone_precision),
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
        # Programs are shared by every model of the same shapes and options (compiled once).
        scoring_options = tuple(sorted(self.scoring_options().items()))
        self._score = _score_program(scoring_options, self.mesh)
        # The embed-and-score program's arguments but the mesh (``inference_function``).
        self._program_options = (
            backbone.module,
            config.pretrain_embed_dimension,
            config.target_embed_dimension,
            config.patch_size,
            backbone_precision,
            scoring_options,
        )
        self._predict = _predict_program(*self._program_options, self.mesh)
        self._memory_bank: jax.Array | None = None
        # The bank padded to ``bank_bucket`` rows and its row count: what the scoring programs
        # take (padding rows are never a neighbour); and its candidate-search arrays.
        self._scoring_bank: tuple[jax.Array, jax.Array] | None = None
        self._search: tuple[jax.Array, jax.Array] | None = None
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
            "candidate_search": self.candidate_search or "bfloat16",
        }

    def describe(self) -> str:
        """What the numerics are on this platform, e.g. ``precision fast on cpu: float32
        backbone, low-rank k-NN candidates (r <= 128, C = 16) re-ranked in float32``."""
        config = self.config
        if config.precision == "exact":
            return f"precision exact on {self.platform}: float32 backbone and k-NN"
        count = knn.default_num_candidates(config.num_neighbors)
        search = (
            f"low-rank (r <= {knn.LOW_RANK_DIMS})"
            if self.candidate_search == "low-rank"
            else "bfloat16"
        )
        return (
            f"precision fast on {self.platform}: {self.backbone_dtype} backbone, {search} k-NN "
            f"candidates (C = {count}) re-ranked in float32"
        )

    def search_arrays(self) -> tuple[jax.Array, jax.Array] | None:
        """The memory bank's candidate-search arrays, ``(basis [D, r], projected bank [M, r])``
        for the low-rank search (computed once per bank, in ``_set_memory_bank``), else None."""
        if self._search is None:
            return None
        basis, projected = self._search  # projected: padded to the scoring bank's bucket
        return basis, projected[: self._memory_bank.shape[0]]

    # ------------------------------------------------------------------ embedding

    def embed(self, images: ImageBatches) -> Iterator[tuple[jax.Array, int]]:
        """Yields ``(patch_features [batch, P, D] on device, num_valid_images)`` per batch.

        With several processes, each passes its own images; the yielded array is global and
        ``num_valid_images`` counts this process's images (see ``sharding.process_local_rows``).
        """
        for global_batch, num_valid in self._device_batches(images):
            yield self._embed(self._variables, global_batch), num_valid

    def _device_batches(self, images: ImageBatches) -> Iterator[tuple[jax.Array, int]]:
        """``(uint8 images [batch, H, W, 3] split over the mesh, num_valid_images)`` per batch,
        each padded to the one batch size the programs are compiled for."""
        for batch in _batches(images, self._batch_size, (*self.image_shape, 3)):
            num_valid = batch.shape[0]
            padded = sharding.pad_rows(batch, self._batch_size)
            yield jax.make_array_from_process_local_data(self._batch_sharding, padded), num_valid

    # ------------------------------------------------------------------ fitting

    def fit(
        self,
        images: ImageBatches,
        *,
        progress: Callable[[int], None] | None = None,
        log: Callable[[str], None] | None = None,
        coreset_progress: Callable[[int], None] | None = None,
        spill_dir: str | os.PathLike | None = None,
    ) -> PatchCore:
        """Builds the memory bank from nominal images; the same bank, indices and calibration
        as ``fit_features(patch_features(images))``, without holding every feature on the host.

        With the ``approx_greedy_coreset`` and ``random`` samplers the features of each batch
        stay on the devices as they are embedded: the greedy coreset's random projection is
        applied there batch by batch, the selection runs on the projected rows, and only the
        M selected full rows are gathered into the bank. The full rows (needed again for the
        bank rows and the calibration, batch by batch) are kept where
        ``config.feature_memory_budget`` allows (``feature_store``): on the devices, else in
        host memory, else in a float32 file in ``spill_dir`` (default: the system's temporary
        folder), deleted afterwards. Host memory is then O(M x D + one batch). With several
        processes each keeps its own images' rows. Other samplers take the in-memory path.

        Args:
          images: uint8 [N, H, W, 3] (``config.image_shape``), or an iterable of such batches.
          progress: called with the number of images embedded after each batch.
          log: called with one-line status messages (where the features are, coreset size and
            timing, calibration), first ``describe()`` (the numerics on this platform).
          coreset_progress: called with the number of greedy coreset steps after each chunk.
          spill_dir: folder for the spill file.
        """
        if log is not None:
            log(self.describe())
        if self.config.sampler not in ("approx_greedy_coreset", "random"):
            bank_features = self.patch_features(images, progress=progress)
            return self.fit_features(bank_features, log=log, progress=coreset_progress)
        device_limit, host_limit = feature_store.memory_limits(
            self.config.feature_memory_budget, self.mesh
        )
        with feature_store.FeatureStore(
            device_limit=device_limit, host_limit=host_limit, spill_dir=spill_dir
        ) as store:
            self._fit_from_store(images, store, progress, log, coreset_progress)
        return self

    def _fit_from_store(
        self,
        images: ImageBatches,
        store: feature_store.FeatureStore,
        progress: Callable[[int], None] | None,
        log: Callable[[str], None] | None,
        coreset_progress: Callable[[int], None] | None,
    ) -> None:
        """``fit``'s streaming path: embed into ``store``, select, gather the bank, calibrate."""
        config, mesh = self.config, self.mesh
        greedy = config.sampler == "approx_greedy_coreset"
        key = jax.random.key(config.seed)
        dim = config.target_embed_dimension
        projection = coreset.projection_matrix(key, dim, config.projection_dim) if greedy else None
        if projection is not None:
            projection = sharding.replicate(projection, mesh)
        projected, finite = [], []
        start = time.perf_counter()
        for batch, num_valid in self.embed(images):
            finite.append(_finite_rows(batch))
            if greedy:  # [G * P, projection_dim], split over the mesh like the batch
                projected.append(coreset.project_rows(batch, projection, mesh=mesh))
            store.append(batch, num_valid)
            if progress is not None:
                progress(num_valid)
        store.finish()
        # Every process's images per batch; images are numbered process 0's first, as the
        # rows of ``patch_features``.
        counts = _gather_counts(np.asarray(store.counts, np.int64))
        per_process = counts.sum(axis=1)
        if per_process.sum() == 0:
            raise ValueError("fit() received no images")
        if (per_process == 0).any():
            raise ValueError(
                f"every process must contribute rows; counts per process: {per_process}"
            )
        num_patches = math.prod(self.grid_shape)
        num_images = int(per_process.sum())
        num_rows = num_images * num_patches
        bad = sum(
            int(np.count_nonzero(~sharding.process_local_rows(f)[:n]))
            for f, n in zip(finite, store.counts, strict=True)
        )
        bad = int(_gather_counts(np.int64(bad)).sum())
        if log is not None:
            log(
                f"features: {num_rows} x {dim} float32 ({num_rows * dim * 4 / 2**20:.0f} MB) "
                f"of {num_images} images in {time.perf_counter() - start:.1f} s; this process's "
                f"{store.describe()} (budget {_megabytes(store.device_limit)} on the device, "
                f"{_megabytes(store.host_limit)} on the host)"
            )
        if bad:
            raise ValueError(_non_finite_message("patch features", bad, num_rows))
        config.check_bank_size(self._bank_rows(num_rows))  # before any work
        if config.calibration == "held-out":
            held_out = calibration.held_out_images(
                num_images, config.calibration_fraction, config.seed
            )
            bank_images = np.setdiff1d(np.arange(num_images), held_out)
        elif config.calibration == "self-excluded" and num_images < 2:
            raise ValueError(
                "self-excluded calibration needs at least 2 training images (each is scored "
                "against the others' bank rows), got 1; use calibration='none'"
            )
        else:
            bank_images = np.arange(num_images)

        # Where each image is: its process, batch, index among that process's images of the
        # batch (``store``'s order), and row of the global batch array.
        layout = _ImageLayout(counts, self._batch_sharding, self._batch_size)
        num_bank_rows = len(bank_images) * num_patches
        config.check_bank_size(self._bank_rows(num_bank_rows))
        num_samples = max(1, int(num_bank_rows * config.coreset_fraction))
        if log is not None:
            log(
                f"memory bank: subsampling {num_bank_rows} patches ({config.sampler}, fraction "
                f"{config.coreset_fraction}) on {self._num_shards} device(s)"
            )
        start = time.perf_counter()
        if greedy:
            positions = (
                layout.position[bank_images][:, None] * num_patches + np.arange(num_patches)
            ).reshape(-1)
            padded = coreset._padded_rows(num_bank_rows, mesh)
            beyond = len(projected) * layout.global_batch * num_patches  # zero rows
            positions = np.pad(positions, (0, padded - num_bank_rows), constant_values=beyond)
            rows_on_mesh = feature_store.assemble_rows(
                tuple(projected), sharding.replicate(positions.astype(np.int32), mesh), mesh=mesh
            )
            del projected
            selected = coreset.greedy_coreset_from_projected(
                rows_on_mesh,
                num_samples,
                num_rows=num_bank_rows,
                key=key,
                num_start_points=config.num_start_points,
                mesh=mesh,
                method=config.coreset_method,
                progress=coreset_progress,
            )
            del rows_on_mesh
        else:
            selected = coreset.random_subsample(num_bank_rows, num_samples, key)
        rows = np.asarray(selected).astype(np.int64)
        source_images = bank_images[rows // num_patches]
        patches = rows % num_patches
        owners = layout.process[source_images]
        memory_bank = np.zeros((num_samples, dim), np.float32)
        for index in range(len(store)):
            mine = np.flatnonzero(
                (owners == jax.process_index()) & (layout.batch[source_images] == index)
            )
            if mine.size:
                memory_bank[mine] = store.take(
                    index, layout.within[source_images[mine]], patches[mine]
                )
        if jax.process_count() > 1:  # each row from the process that holds it
            gathered = _gather_counts(memory_bank)
            memory_bank = gathered[owners, np.arange(num_samples)]
        self._set_memory_bank(memory_bank)
        if log is not None:
            log(
                f"memory bank: {num_bank_rows} patches -> {num_samples} "
                f"in {time.perf_counter() - start:.1f} s"
            )
        if config.calibration == "none":
            self.calibration = self.bank_source_images = None
            return
        self.bank_source_images = source_images.astype(np.int32)
        start = time.perf_counter()
        if config.calibration == "held-out":
            image_scores, maps = self._held_out_scores_from_store(store, layout, held_out)
        else:
            image_scores, maps = self._self_excluded_scores_from_store(store, layout)
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

    def _self_excluded_scores_from_store(
        self, store: feature_store.FeatureStore, layout: _ImageLayout
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every training image scored without its own bank rows, read back batch by batch
        (each process scores its own images): ``([N], [N, H, W])`` in image order."""
        sources = sharding.replicate(self.bank_source_images, self.mesh)
        score = functools.partial(
            scoring.score_patch_features, **self.scoring_options(), mesh=self.mesh
        )
        first = layout.first_image[jax.process_index()]
        scores, maps = [], []
        for index in range(len(store)):
            num_valid = store.counts[index]
            batch = store.global_batch(index, self._batch_size, self._batch_sharding)
            ids = np.full((self._batch_size,), -2, np.int32)  # padding: matches no bank row
            ids[:num_valid] = np.arange(first, first + num_valid)
            first += num_valid
            global_ids = jax.make_array_from_process_local_data(self._batch_sharding, ids)
            result = score(
                batch,
                self.memory_bank,
                search=self.search_arrays(),
                image_ids=global_ids,
                bank_source_images=sources,
            )
            scores.append(sharding.process_local_rows(result.image_scores)[:num_valid])
            maps.append(sharding.process_local_rows(result.anomaly_maps)[:num_valid])
        return (
            _gather_from_processes(np.concatenate(scores)),
            _gather_from_processes(np.concatenate(maps)),
        )

    def _held_out_scores_from_store(
        self, store: feature_store.FeatureStore, layout: _ImageLayout, held_out: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The held-out images (sorted) scored against the bank, read back batch by batch and
        regrouped into full batches; every process makes the same number of calls."""
        size = self._batch_size
        mine = held_out[layout.process[held_out] == jax.process_index()]
        num_calls = max(
            -(-int(np.count_nonzero(layout.process[held_out] == q)) // size)
            for q in range(jax.process_count())
        )
        scores, maps, pending = [], [], []

        def score_pending() -> None:
            num_valid = sum(len(p) for p in pending)
            padded = np.zeros((size, *store.row_shape), np.float32)
            if pending:
                padded[:num_valid] = np.concatenate(pending)
            global_batch = jax.make_array_from_process_local_data(self._batch_sharding, padded)
            result = self._score(global_batch, *self._scoring_bank, self._search)
            scores.append(sharding.process_local_rows(result.image_scores)[:num_valid])
            maps.append(sharding.process_local_rows(result.anomaly_maps)[:num_valid])
            pending.clear()

        calls = 0
        for index in range(len(store)):
            wanted = mine[layout.batch[mine] == index]
            if not wanted.size:
                continue
            rows = store.local_rows(index)[layout.within[wanted]]
            while rows.shape[0]:
                room = size - sum(len(p) for p in pending)
                pending.append(rows[:room])
                rows = rows[room:]
                if sum(len(p) for p in pending) == size:
                    score_pending()
                    calls += 1
        while calls < num_calls:
            score_pending()
            calls += 1
        return (
            _gather_from_processes(np.concatenate(scores)),
            _gather_from_processes(np.concatenate(maps)),
        )

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
        skips the bank rows taken from it (``scoring.score_patch_features`` with image ids).
        """
        if self_excluded:
            sources = sharding.replicate(self.bank_source_images, self.mesh)
            score = functools.partial(
                scoring.score_patch_features, **self.scoring_options(), mesh=self.mesh
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
                result = score(
                    global_batch,
                    self.memory_bank,
                    search=self.search_arrays(),
                    image_ids=global_ids,
                    bank_source_images=sources,
                )
            else:
                result = self._score(global_batch, *self._scoring_bank, self._search)
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

    @property
    def memory_bank(self) -> jax.Array | None:
        """The memory bank [M, D] float32, replicated over the mesh (None before ``fit``).
        Assigning one validates it (shape, k and b, finite rows) like ``fit`` does."""
        return self._memory_bank

    @memory_bank.setter
    def memory_bank(self, memory_bank: jax.Array | np.ndarray | None) -> None:
        if memory_bank is None:
            self._memory_bank = self._scoring_bank = None
        else:
            self._set_memory_bank(memory_bank)

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
        self._memory_bank = sharding.replicate(memory_bank, self.mesh)
        num_rows = memory_bank.shape[0]
        bucket = bank_bucket(num_rows)
        self._scoring_bank = (
            sharding.replicate(sharding.pad_rows(memory_bank, bucket), self.mesh),
            sharding.replicate(np.int32(num_rows), self.mesh),
        )
        self._search = None
        if self.candidate_search == "low-rank":  # the basis and projected bank, once per bank
            basis, projected = knn.low_rank_search(memory_bank)
            projected = sharding.pad_rows(np.asarray(projected), bucket)
            self._search = (
                sharding.replicate(np.asarray(basis), self.mesh),
                sharding.replicate(projected, self.mesh),
            )

    # ------------------------------------------------------------------ inference

    def score(self, images: ImageBatches) -> Iterator[scoring.ScoreResult]:
        """Yields host-side ``ScoreResult`` per batch (image scores, maps, patch scores).

        Each batch runs as one compiled program (backbone, patch features and k-NN scoring
        fused). The pipeline keeps one batch in flight: batch k + 1 is dispatched, and its
        results start copying to the host, before batch k's results are handed back, so the
        devices, the copies and the host's decoding of the next images overlap.
        An image whose patch features are not all finite scores NaN (never a plausible number).
        """
        if self.memory_bank is None:
            raise RuntimeError("PatchCore.score/predict called before fit() or load()")
        pending: tuple[scoring.ScoreResult, int] | None = None
        for global_batch, num_valid in self._device_batches(images):
            result = self._predict(self._variables, global_batch, *self._scoring_bank, self._search)
            for leaf in jax.tree.leaves(result):
                leaf.copy_to_host_async()
            if pending is not None:
                yield _host_rows(*pending)
            pending = (result, num_valid)
        if pending is not None:
            yield _host_rows(*pending)

    def predict(
        self, images: ImageBatches, *, progress: Callable[[int], None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores images: returns ``(image_scores [N] float32, anomaly_maps [N, H, W])``.
        ``progress`` is called with the number of images scored after each batch."""
        results = []
        for result in self.score(images):
            results.append(result)
            if progress is not None:
                progress(len(result.image_scores))
        if not results:
            raise ValueError("predict() received no images")
        image_scores = np.concatenate([r.image_scores for r in results])
        anomaly_maps = np.concatenate([r.anomaly_maps for r in results])
        return image_scores, anomaly_maps

    def inference_function(self) -> Callable[[jax.Array], scoring.ScoreResult]:
        """The model's inference as one pure, jittable function: uint8 images [B, H, W, 3] ->
        ``ScoreResult`` ([B] image scores, [B, H, W] maps, ...), with the backbone variables
        (in this platform's backbone dtype), the memory bank [M, D] and its candidate-search
        arrays as constants. The computation ``score`` compiles over the mesh, here on one
        device and without the bank's bucket padding (equal to float32 rounding): for
        ``jax.export`` (``patchcore_jax.export``) and other JAX programs."""
        if self.memory_bank is None:
            raise ValueError("PatchCore.inference_function called before fit() or load()")
        embed_and_score = _embed_and_score_function(*self._program_options, None)
        variables = backbone_variables(self.backbone.variables, self._backbone_precision)
        memory_bank = jnp.asarray(np.asarray(self.memory_bank))
        search = self.search_arrays()
        if search is not None:
            search = tuple(jnp.asarray(np.asarray(x)) for x in search)

        def infer(images: jax.Array) -> scoring.ScoreResult:
            return embed_and_score(variables, images, memory_bank, None, search)

        return infer

    @property
    def members(self) -> list[PatchCore]:
        """``[self]``: the models that score, as ``Ensemble.members`` (one interface)."""
        return [self]

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        """Writes an orbax checkpoint folder; see ``patchcore_jax.checkpoint.save``."""
        from patchcore_jax import checkpoint

        return checkpoint.save(self, path, **kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> PatchCore:
        """Restores a single model written by ``save``; see ``checkpoint.load_patchcore``
        (``patchcore_jax.load`` opens either kind)."""
        from patchcore_jax import checkpoint

        return checkpoint.load_patchcore(path, **kwargs)
