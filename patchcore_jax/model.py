"""PatchCore: fit a memory bank on nominal images, then score and localise anomalies.

This module only orchestrates the device stages (backbone -> features -> bank -> coreset ->
scoring); the pure, jittable functions underneath (``features.embed_images``,
``coreset.traceable_greedy_coreset``, ``scoring.score_patch_features``) are public for use inside
other JAX programs.
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from patchcore_jax import (
    bank,
    calibration,
    coreset,
    features,
    interrupt,
    preprocess,
    programs,
    scoring,
    sharding,
)
from patchcore_jax.backbones import Backbone, model_backbone
from patchcore_jax.config import PatchCoreConfig
from patchcore_jax.files import quantity
from patchcore_jax.progress import report_done

ImageBatches = np.ndarray | jax.Array | Iterable[np.ndarray]


class PatchCore:
    """A PatchCore anomaly detector.

    >>> model = PatchCore(PatchCoreConfig(backbone="mobilenet_v2", coreset_fraction=0.1))
    >>> model.fit(train_images)                      # uint8 [N, 224, 224, 3], or batches of them
    >>> prediction = model.predict(test_images)       # calibration.Prediction
    >>> prediction.image_scores, prediction.decisions, prediction.anomaly_maps

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
        self.image_shape: tuple[int, int] = config.image_shape
        self.backbone = model_backbone(
            backbone, config.backbone, config.layers, self.image_shape, config.batch_norm_probe
        )
        backbone = self.backbone
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
        self.backbone_dtype, self.candidate_search = programs.backend_numerics(
            config.precision, self.platform
        )
        backbone_precision = "fast" if self.backbone_dtype == "bfloat16" else "exact"
        self._backbone_precision = backbone_precision
        # The embedding program's arguments but the mesh: one tuple for every program.
        patching = (config.patch_size, config.patch_stride)
        embed_options = (
            backbone.module,
            config.pretrain_embed_dimension,
            config.target_embed_dimension,
            *patching,
            backbone_precision,
        )
        self._embed = programs.embed_program(*embed_options, self.mesh)
        self._variables = jax.device_put(
            features.backbone_variables(backbone.variables, backbone_precision),
            sharding.replicated(self.mesh),
        )
        self.grid_shape: tuple[int, int] = features.grid_shape(
            backbone.module, backbone.variables, self.image_shape, *patching
        )
        # Programs are shared by every model of the same shapes and options (compiled once).
        scoring_options = tuple(sorted(self.scoring_options().items()))
        self._score = programs.score_program(scoring_options, self.mesh)
        # The embed-and-score program's arguments but the mesh (``inference_function``).
        self._program_options = (*embed_options, scoring_options)
        self._predict = programs.predict_program(*self._program_options, self.mesh)
        self._memory_bank: jax.Array | None = None
        # The bank padded to ``bank_bucket`` rows and its row count: what the scoring programs
        # take (padding rows are never a neighbour); and its candidate-search arrays.
        self._scoring_bank: tuple[jax.Array, jax.Array] | None = None
        self._search: tuple[jax.Array, jax.Array] | None = None
        # Thresholds and score distributions (``fit`` with ``config.calibration``, ``calibrate``)
        # and the training image each bank row was taken from (known after a calibrated fit).
        self.calibration: calibration.Calibration | None = None
        self.bank_source_images: np.ndarray | None = None
        # Wall seconds of the last fit's phases: "features", "coreset", "calibration".
        self.fit_timings: dict[str, float] = {}
        self.knn_counts: dict[str, int] = {"queries": 0, "fallbacks": 0}  # certified k-NN
        if memory_bank is not None:
            self._set_memory_bank(memory_bank)

    def scoring_options(self) -> dict[str, Any]:
        """The keyword arguments (all but ``mesh``) of ``scoring.score_patch_features`` with
        which this model scores (``programs.scoring_options``)."""
        return programs.scoring_options(self.config, self.grid_shape, self.candidate_search)

    def describe(self) -> str:
        """The numerics on this platform (``describe_numerics``), the certified k-NN's fraction."""
        numerics = (self.config.precision, self.platform, self.config.num_neighbors)
        return programs.describe_numerics(*numerics) + programs.describe_fallbacks(self.knn_counts)

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
        for batch in preprocess.checked_batches(images, self._batch_size, (*self.image_shape, 3)):
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
        calibration_progress: Callable[[int], None] | None = None,
        spill_dir: str | os.PathLike | None = None,
    ) -> PatchCore:
        """Builds the memory bank from nominal images, then calibrates the thresholds; the same
        bank, indices and calibration as ``fit_features(patch_features(images))``.

        The features of each batch stay on the devices as they are embedded: the greedy
        coreset's random projection is applied there batch by batch, the selection runs on the
        projected rows, and only the M selected full rows are gathered into the bank. The full
        rows (needed again for the bank rows and the calibration, batch by batch) are kept
        where ``config.feature_memory_budget`` allows (``bank.FeatureStore``): on the devices,
        else in host memory, else in a float32 file in ``spill_dir`` (default: the system's
        temporary folder), deleted afterwards. Host memory is then O(M x D + one batch) with
        every sampler but ``learned_proxies``, which trains on all bank rows at once (read back
        into host memory: O(N x D)). With several processes each keeps its own images' rows.
        The wall seconds of the phases are in ``fit_timings``.

        Args:
          images: uint8 [N, H, W, 3] (``config.image_shape``), or an iterable of such batches.
          progress: called with the number of images embedded after each batch (computed).
          coreset_progress, calibration_progress: called with 0 when the greedy selection and
            the calibration start, then with the steps done / images scored after each chunk.
          log: called with one-line status messages (where the features are, coreset size and
            timing, calibration), first ``describe()`` (the numerics on this platform).
          spill_dir: folder for the spill file.
        """
        if log is not None:
            log(self.describe())
        finish = functools.partial(self._fit_store, calibration_progress=calibration_progress)
        return self._stream(finish, images, progress, log, coreset_progress, spill_dir)

    def _stream(self, finish, images, progress, log, coreset_progress, spill_dir) -> PatchCore:
        """Embeds ``images`` into a feature store within the memory budget, then ``finish``es
        from it (``_fit_store`` or ``_extend_store``): the one streaming path."""
        budget = self.config.feature_memory_budget
        with bank.FeatureStore.within_budget(budget, self.mesh, spill_dir) as store:
            projected, layout = self._embed_into(store, images, progress, log)
            finish(store, layout, projected, log, coreset_progress)
        return self

    def fit_features(
        self,
        bank_features: np.ndarray | jax.Array,
        *,
        log: Callable[[str], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> PatchCore:
        """``fit`` on precomputed patch features [N, D] (host rows, the same on every process):
        they are placed in a host-tier ``bank.FeatureStore`` (without a copy) and go through
        ``fit``'s engine: the memory bank (``config.sampler``), then the calibration
        (``config.calibration``).

        With a calibration the features must be whole images' ([num_images * h * w, D],
        image-major, as ``patch_features`` returns): ``self-excluded`` scores each image against
        the bank without its own rows (the bank is the same as without calibration),
        ``held-out`` keeps a seeded ``calibration_fraction`` of the images out of the bank.
        Raises ValueError if any row is NaN or infinite: one such row would be every test
        patch's nearest neighbour (or nobody's) and silently change every later score.
        ``progress`` is called with the number of greedy coreset steps done after each chunk.
        """
        config = self.config
        config.check_bank_size(config.bank_rows(bank_features.shape[0]))  # before any work
        start = time.perf_counter()
        store, layout, projected = self._store_features(
            bank_features, whole_images=config.calibration != "none"
        )
        with store:
            self.fit_timings = {"features": time.perf_counter() - start}
            self._fit_store(store, layout, projected, log, progress)
        return self

    def _store_features(
        self, rows: np.ndarray | jax.Array, *, whole_images: bool
    ) -> tuple[bank.FeatureStore, bank.ImageLayout, list[jax.Array]]:
        """``bank.store_features`` in this model's batches (whole images refused or not)."""
        greedy = self.config.sampler == "approx_greedy_coreset"
        return bank.store_features(
            rows,
            math.prod(self.grid_shape),
            self._batch_size,
            mesh=self.mesh,
            projection=self._replicated_projection() if greedy else None,
            project=greedy,
            whole_images_for=f"calibration {self.config.calibration!r}" if whole_images else None,
        )

    @functools.cached_property
    def _projection(self) -> np.ndarray | None:
        """The greedy coreset's projection [projection_dim, D] (None: none), from the seed."""
        dims = self.config.target_embed_dimension, self.config.projection_dim
        return coreset.projection_matrix(jax.random.key(self.config.seed), *dims)

    def _replicated_projection(self) -> jax.Array | None:
        return None if self._projection is None else sharding.replicate(self._projection, self.mesh)

    def _embed_into(
        self,
        store: bank.FeatureStore,
        images: ImageBatches,
        progress: Callable[[int], None] | None,
        log: Callable[[str], None] | None,
    ) -> tuple[list[jax.Array], bank.ImageLayout]:
        """Embeds ``images`` into ``store``: ``(projected rows per batch (greedy sampler
        only), layout)``; ValueError (after the log line) if a feature row is non-finite."""
        start = time.perf_counter()
        greedy = self.config.sampler == "approx_greedy_coreset"
        projection = self._replicated_projection() if greedy else None
        projected = []
        for batch, num_valid in report_done(self.embed(images), progress):
            if greedy:  # [G * P, projection_dim], split over the mesh like the batch
                projected.append(coreset.project_rows(batch, projection, mesh=self.mesh))
            store.append(batch, num_valid)
            interrupt.check()
        store.finish()
        layout = bank.ImageLayout.of(store, self._batch_sharding, self._batch_size)
        bad = int(sharding.gather_from_processes(np.int64(store.non_finite_rows())).sum())
        num_rows, dim = layout.num_images * store.row_shape[0], store.row_shape[1]
        self.fit_timings = {"features": time.perf_counter() - start}
        if log is not None:
            log(
                f"features: {num_rows} x {dim} float32 ({num_rows * dim * 4 / 2**20:.0f} MB) "
                f"of {quantity(layout.num_images, 'image')} in "
                f"{self.fit_timings['features']:.1f} s; this process's {store.describe()}"
            )
        if bad:
            raise ValueError(bank.non_finite_message("patch features", bad, num_rows))
        return projected, layout

    def _fit_store(
        self,
        store: bank.FeatureStore,
        layout: bank.ImageLayout,
        projected: list[jax.Array],
        log: Callable[[str], None] | None,
        progress: Callable[[int], None] | None,
        calibration_progress: Callable[[int], None] | None = None,
    ) -> None:
        """The fit engine once the features are stored: held-out split, memory bank,
        calibration (``fit_timings`` gets ``coreset`` and ``calibration``)."""
        config = self.config
        num_images = layout.num_images
        config.check_bank_size(config.bank_rows(num_images * store.row_shape[0]))  # no work yet
        held_out = calibration.fit_held_out(
            config.calibration, num_images, config.calibration_fraction, config.seed
        )
        all_images = np.arange(num_images)
        bank_images = all_images if held_out is None else np.setdiff1d(all_images, held_out)
        start = time.perf_counter()
        source_images = self._select_bank(store, layout, projected, bank_images, log, progress)
        self.fit_timings["coreset"] = time.perf_counter() - start
        start = time.perf_counter()
        self.calibration = self.bank_source_images = None
        if config.calibration != "none":
            if source_images is not None:  # learned proxies are no image's rows
                self.bank_source_images = source_images.astype(np.int32)
            image_scores, maps = self._calibration_scores(
                store, layout, held_out, calibration_progress
            )
            self.calibration = calibration.calibrate(
                image_scores,
                maps,
                method=config.calibration,
                quantile=config.threshold_quantile,
                images=held_out,
            )
        self.fit_timings["calibration"] = seconds = time.perf_counter() - start
        if log is not None and self.calibration is not None:
            knn = programs.describe_fallbacks(self.knn_counts)  # the calibration's k-NN
            log(f"calibration: {self.calibration.describe()} in {seconds:.1f} s{knn}")

    def _select_bank(
        self,
        store: bank.FeatureStore,
        layout: bank.ImageLayout,
        projected: list[jax.Array],
        bank_images: np.ndarray,
        log: Callable[[str], None] | None,
        progress: Callable[[int], None] | None,
    ) -> np.ndarray | None:
        """Sets the memory bank: ``config.sampler`` on the rows of ``bank_images`` (sorted).
        Returns each bank row's source image [M], None for learned proxies (no image's rows)."""
        config = self.config
        num_rows = len(bank_images) * store.row_shape[0]
        config.check_bank_size(config.bank_rows(num_rows))
        if log is not None:
            log(
                f"memory bank: subsampling {num_rows} patches ({config.sampler}, fraction "
                f"{config.coreset_fraction}) on {self._num_shards} device(s)"
            )
        start = time.perf_counter()
        memory_bank, source_images = bank.select_bank(
            store,
            layout,
            projected,
            bank_images,
            config,
            key=jax.random.key(config.seed),
            mesh=self.mesh,
            progress=progress,
        )
        self._set_memory_bank(memory_bank)
        if log is not None:
            log(
                f"memory bank: {num_rows} patches -> {self.memory_bank.shape[0]} "
                f"in {time.perf_counter() - start:.1f} s"
            )
        return source_images

    def _calibration_scores(
        self,
        store: bank.FeatureStore,
        layout: bank.ImageLayout,
        held_out: np.ndarray | None,
        progress: Callable[[int], None] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``([N], [N, H, W])`` calibration scores, in image order, read back batch by batch
        (each process scores its own images): the ``held_out`` images against the bank, or,
        with ``held_out`` None, every training image without its own bank rows
        (``scoring.score_patch_features`` with image ids). ``progress``: 0, then images scored."""
        if progress is not None:
            progress(0)
        if held_out is None:
            memory_bank, rows_in_use, search, sources = programs.self_excluded_bank(
                self.memory_bank,
                self.bank_source_images,
                self._search,
                self.mesh,
                self.config.bank_block_size,
            )
            options = self.scoring_options()
            batches = bank.self_excluded_batches(
                store, layout, self._batch_size, self._batch_sharding
            )

            def score(batch: jax.Array, ids: jax.Array, valid: jax.Array) -> scoring.ScoreResult:
                return scoring.score_patch_features(
                    batch,
                    memory_bank,
                    **options,
                    mesh=self.mesh,
                    num_valid=rows_in_use,
                    search=search,
                    image_ids=ids,
                    bank_source_images=sources,
                    valid_images=valid,
                )
        else:
            batches = bank.held_out_batches(
                store, layout, held_out, self._batch_size, self._batch_sharding
            )

            def score(batch: jax.Array, ids: None, valid: jax.Array) -> scoring.ScoreResult:
                return self._score(batch, *self._scoring_bank, self._search, valid)

        scores, maps = [], []
        for batch, ids, num_valid in batches:
            interrupt.check()
            valid = sharding.valid_rows(num_valid, self._batch_size, self._batch_sharding)
            result = programs.host_rows(score(batch, ids, valid), num_valid, self.knn_counts)
            scores.append(result.image_scores)
            maps.append(result.anomaly_maps)
            if progress is not None:
                progress(num_valid)
        return tuple(
            sharding.gather_rows_from_processes(np.concatenate(x), every_process=False)
            for x in (scores, maps)
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

    def calibrate(
        self,
        images: ImageBatches,
        *,
        labels: np.ndarray | None = None,
        masks: np.ndarray | None = None,
    ) -> calibration.Calibration:
        """Calibrates the thresholds on a validation set, replacing the fitted calibration.

        Args:
          images: uint8 [N, H, W, 3] (or batches), nominal unless ``labels`` says otherwise
            (with several processes: this process's share; ``labels`` and ``masks`` are of
            every process's images, process 0's first).
          labels: [N] 0/1; with defect images the image threshold is F1-optimal.
          masks: [N, H, W] bool ground truth; with defect pixels the pixel threshold is too.
        """
        prediction = self.predict(images)
        # With several processes each scores its own images; all calibrate on every image.
        image_scores, maps = (
            sharding.gather_rows_from_processes(x)
            for x in (prediction.image_scores, prediction.anomaly_maps)
        )
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
        return self.config.bank_rows(num_images * math.prod(self.grid_shape))

    # ------------------------------------------------------------------ incremental fit

    def extend(
        self,
        images: ImageBatches,
        *,
        progress: Callable[[int], None] | None = None,
        log: Callable[[str], None] | None = None,
        coreset_progress: Callable[[int], None] | None = None,
        spill_dir: str | os.PathLike | None = None,
    ) -> PatchCore:
        """Adds nominal images to a fitted model without a refit; the same bank as
        ``extend_features(patch_features(images))``, with the features kept like ``fit``
        keeps them (``progress`` counts images, ``coreset_progress`` greedy steps)."""
        self._check_extendable()
        return self._stream(self._extend_store, images, progress, log, coreset_progress, spill_dir)

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
        self._check_extendable()
        store, layout, projected = self._store_features(new_features, whole_images=False)
        with store:
            self._extend_store(store, layout, projected, log, progress)
        return self

    def _check_extendable(self) -> None:
        if self.memory_bank is None:
            raise RuntimeError("PatchCore.extend called before fit() or load()")
        if self.config.sampler == "learned_proxies":
            raise ValueError(
                "extend continues a selection of bank rows; the learned_proxies sampler has "
                "none: refit instead"
            )

    def _extend_store(
        self,
        store: bank.FeatureStore,
        layout: bank.ImageLayout,
        projected: list[jax.Array],
        log: Callable[[str], None] | None,
        progress: Callable[[int], None] | None,
    ) -> None:
        """Appends ``config.sampler``'s choice of the stored rows to the memory bank."""
        config = self.config
        num_rows = layout.num_images * store.row_shape[0]
        old_bank = np.asarray(self.memory_bank)
        start = time.perf_counter()
        added, _ = bank.select_bank(
            store,
            layout,
            projected,
            np.arange(layout.num_images),
            config,
            # Draws the random sampler's rows; the greedy one continues from the bank instead.
            key=jax.random.fold_in(jax.random.key(config.seed), old_bank.shape[0]),
            mesh=self.mesh,
            progress=progress,
            selected_rows=coreset.project_host_rows(old_bank, self._projection)
            if config.sampler == "approx_greedy_coreset"
            else None,
        )
        added = np.asarray(added)
        self._set_memory_bank(np.concatenate([old_bank, added]))
        self.bank_source_images = None  # the old images' rows are not numbered any more
        if log is not None:
            log(
                f"memory bank: {old_bank.shape[0]} + {len(added)} of {num_rows} new patches -> "
                f"{self.memory_bank.shape[0]} in {time.perf_counter() - start:.1f} s"
            )
        if self.calibration is not None:
            warnings.warn(
                "the decision thresholds stay calibrated on the original training images; "
                "refit, or recalibrate on held-out good images, to include the new ones",
                stacklevel=3,
            )

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
        bank.check_finite_rows(memory_bank, "memory bank")
        # Placed once, so scoring calls do not copy the bank from the host again.
        self._memory_bank = sharding.replicate(memory_bank, self.mesh)
        self._scoring_bank, self._search = programs.scoring_bank(
            memory_bank, self.candidate_search, self.mesh
        )
        self.knn_counts = {"queries": 0, "fallbacks": 0}  # counted where a certified k-NN ran

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
            interrupt.check()
            valid = sharding.valid_rows(num_valid, self._batch_size, self._batch_sharding)
            bank_arrays = (*self._scoring_bank, self._search)
            result = self._predict(self._variables, global_batch, *bank_arrays, valid)
            for leaf in jax.tree.leaves(result):
                leaf.copy_to_host_async()
            if pending is not None:
                yield programs.host_rows(*pending, self.knn_counts)
            pending = (result, num_valid)
        if pending is not None:
            yield programs.host_rows(*pending, self.knn_counts)

    def predict(
        self, images: ImageBatches, *, progress: Callable[[int], None] | None = None
    ) -> calibration.Prediction:
        """Scores images: raw ``image_scores`` [N] and ``anomaly_maps`` [N, H, W] with the
        calibrated ``normalized_scores`` and ``decisions`` (None without a calibration).
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
        return calibration.Prediction.from_scores(image_scores, anomaly_maps, self.calibration)

    def bank_inputs(self) -> dict[str, np.ndarray]:
        """The inference's per-bank arguments on the host, in order: ``memory_bank`` [bucket, D]
        float32 (padded), ``num_valid`` int32 [] (M), ``search_0``...: the search arrays' leaves."""
        if self.memory_bank is None:
            raise ValueError("PatchCore.bank_inputs called before fit() or load()")
        search = self._search if self.config.precision == "fast" else None  # exports: plain scan
        leaves = [*self._scoring_bank, *jax.tree.leaves(search)]
        names = ["memory_bank", "num_valid"] + [f"search_{i}" for i in range(len(leaves) - 2)]
        return {name: np.asarray(leaf) for name, leaf in zip(names, leaves, strict=True)}

    def inference_function(self, *, bank_input: bool = False) -> Callable[..., scoring.ScoreResult]:
        """``score``'s computation of a whole batch on one device as a pure function (for
        ``jax.export``): uint8 images [B, H, W, 3] -> ``ScoreResult``, backbone variables as
        constants; ``infer(images)`` with ``bank_inputs()`` as constants too, or (``bank_input``)
        ``infer(images, *bank_inputs().values())`` for any bank of this configuration and bucket."""
        if self.memory_bank is None:
            raise ValueError("PatchCore.inference_function called before fit() or load()")
        embed_and_score = programs.embed_and_score_function(*self._program_options, None)
        variables = features.backbone_variables(self.backbone.variables, self._backbone_precision)
        search = jax.tree.structure(self._search if self.config.precision == "fast" else None)
        infer = programs.with_bank_arguments(embed_and_score, variables, search)
        if bank_input:
            return infer
        constants = [jnp.asarray(x) for x in self.bank_inputs().values()]
        return lambda images: infer(images, *constants)

    @property
    def members(self) -> list[PatchCore]:
        """``[self]``: the models that score, as ``Ensemble.members`` (one interface)."""
        return [self]
