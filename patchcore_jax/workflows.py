"""Folders in, files out: fit a dataset folder, predict image files, evaluate a dataset.

The command line (``cli.py``) and the benchmark (``benchmark.py``) are thin layers over these
calls, and a Python user calls them the same way::

    from patchcore_jax import PatchCoreConfig, workflows

    config = PatchCoreConfig(backbone="mobilenet_v2")
    model = workflows.fit_folder("data/bottle", "runs/model", config)
    report = workflows.evaluate_dataset(model, "data/bottle", "runs/evaluation")
    predictions = workflows.predict_files(model, ["data/bottle/test/broken_large"], "runs/pred")

A model argument is a fitted ``PatchCore`` or ``Ensemble``, or the path of a checkpoint of
either kind. Every workflow takes ``progress(stage, count, total)`` (``patchcore_jax.progress``:
``count`` more items of ``total`` done in ``stage``, 0 when it starts; stages ``features``,
``coreset``, ``calibration``, ``validation``, ``scoring``, ``heatmaps``), and ``log(message)``
for one-line status messages; by default neither reports anything. Bad input fails before any
work with a one-line ValueError / OSError.

With several processes (``sharding.initialize_distributed``; the CLI's ``--distributed``) every
process calls the same workflow with the same arguments: each reads only its share of the
images (``sharding.process_share`` of the sorted list), the results are gathered in the
single-process order, and process 0 alone writes files (``primary_output_folder``). An error in
one process (an unreadable image, a bad folder) ends every process with the same one-line
``sharding.ProcessFailure``: they agree on success at the end of each step and each batch
(``sharding.agreed``).

Every image is decoded before any work (``check_usable``; by every process): an unusable one
fails the run, or with ``skip_unreadable`` is left out and recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from patchcore_jax import (
    calibration,
    checkpoint,
    checkpoint_folder,
    interrupt,
    metrics,
    preprocess,
    reports,
    sharding,
)
from patchcore_jax.config import PatchCoreConfig
from patchcore_jax.datasets import folders
from patchcore_jax.ensemble import Ensemble
from patchcore_jax.files import (
    atomic_write_text,
    check_writable_folder,
    output_folder,
    quantity,
    write_csv,
)
from patchcore_jax.image_reader import ImageReader, log_counts
from patchcore_jax.model import PatchCore
from patchcore_jax.progress import Log, Progress, counted, no_log, no_progress, stage_counter

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from patchcore_jax.backbones import Backbone

Model = PatchCore | Ensemble
ModelOrPath = Model | str | os.PathLike


def fit_timings(model: Model) -> dict[str, float]:
    """Seconds of the last fit's phases (``features``, ``coreset``, ``calibration``), summed
    over an ensemble's members."""
    totals = dict.fromkeys(("features", "coreset", "calibration"), 0.0)
    for member in model.members:
        for phase, seconds in member.fit_timings.items():
            totals[phase] += seconds
    return totals


def _load(model: ModelOrPath, mesh: Mesh | None) -> Model:
    return model if isinstance(model, PatchCore | Ensemble) else checkpoint.load(model, mesh=mesh)


def _batches(
    paths: Sequence[Path], config: PatchCoreConfig, reader: ImageReader | None
) -> Iterator[np.ndarray]:
    """This process's uint8 batches of ``paths`` (read by ``reader``): all of them with one
    process; with several, its ``process_share`` in ``share_batch_sizes`` batches, each read in
    ``sharding.agreed``."""
    options = {**preprocess.image_options(config), "reader": reader}
    if jax.process_count() == 1:
        return preprocess.iter_image_batches(paths, config.batch_size, **options)
    sizes = sharding.share_batch_sizes(len(paths), config.batch_size)
    share = paths[sharding.process_share(len(paths))[0]]
    batches = preprocess.iter_image_batches(share, config.batch_size, **options)
    return sharding.agreed_items(sharding.rebatch(batches, sizes), len(sizes))


def _share_size(num_items: int) -> int:
    """How many of ``num_items`` images this process reads (progress totals)."""
    share = sharding.process_share(num_items)[0]
    return share.stop - share.start


def primary_output_folder(
    path: str | os.PathLike, **options: bool
) -> contextlib.AbstractContextManager[Path]:
    """``files.output_folder(path, **options)`` on process 0; on the other processes of a
    multi-process job, which write nothing, just the path."""
    if sharding.is_primary_process():
        return output_folder(path, **options)
    return contextlib.nullcontext(Path(path))


def check_usable(
    paths: Sequence[Path],
    config: PatchCoreConfig,
    what: str,
    reader: ImageReader | None = None,
    **choice: Any,
) -> preprocess.Unusable:
    """``preprocess.check_images`` in ``config``'s geometry (read by ``reader``), then
    ``preprocess.refuse_unusable`` (``choice``: its ``skip_unreadable`` and ``hint``): the
    unusable images left to skip."""
    options = preprocess.image_options(config)
    unusable = preprocess.check_images(paths, **options, reader=reader)
    preprocess.refuse_unusable(unusable, len(paths), what, **choice)
    return unusable


# ---------------------------------------------------------------- fit


@dataclass
class ValidationSet:
    """Images that calibrate a fitted model: labelled (with masks) or nominal only."""

    paths: list[Path]
    labels: np.ndarray | None = None  # [N] 0/1
    masks: np.ndarray | None = None  # [N, H, W] bool


def load_validation_set(folder: str | os.PathLike, config: PatchCoreConfig) -> ValidationSet:
    """A validation folder (``folders.load_validation_folder``): MVTec layout (labels and masks,
    so F1-optimal thresholds) or good images only (quantile thresholds)."""
    dataset = folders.load_validation_folder(folder)
    if not dataset.test_samples:
        return ValidationSet(list(dataset.train_paths))
    folders.validate_masks(dataset)
    return ValidationSet(dataset.test_image_paths, dataset.test_labels, test_masks(dataset, config))


def build_model(
    configs: PatchCoreConfig | Sequence[PatchCoreConfig],
    num_images: int,
    *,
    backbones: Sequence[Backbone | None] | None = None,
    mesh: Mesh | None = None,
) -> Model:
    """An unfitted model (one config) or ensemble (several), checked against a training set of
    ``num_images`` images (k and b against the bank size) before any work."""
    configs = [configs] if isinstance(configs, PatchCoreConfig) else list(configs)
    if len(configs) > 1 and jax.process_count() > 1:
        raise ValueError("an ensemble (several --backbone) is fitted by one process; give one")
    mesh = sharding.make_mesh() if mesh is None else mesh
    if len(configs) > 1:
        model: Model = Ensemble.from_configs(configs, backbones=backbones, mesh=mesh)
    else:
        model = PatchCore(configs[0], backbone=backbones[0] if backbones else None, mesh=mesh)
    for member in model.members:
        member.config.check_bank_size(member.bank_size(num_images))
    return model


def fit_model(
    model: Model,
    train_paths: Sequence[Path],
    *,
    validation: ValidationSet | None = None,
    spill_dir: str | os.PathLike | None = None,
    reader: ImageReader | None = None,
    progress: Progress = no_progress,
    log: Log = no_log,
) -> Model:
    """Fits ``model`` (``build_model``) on image files read by ``reader`` (default: threads of
    this process); a ``validation`` set then calibrates it (a single model only). Returns
    ``model``; its phases' seconds are in ``fit_timings``. Callers check the images first
    (``check_usable``), as the folder workflows do."""
    config = model.config
    # Every member embeds every image (this process's share of them).
    num_images = _share_size(len(train_paths)) * len(model.members)
    coreset_steps = sum(member.bank_size(len(train_paths)) for member in model.members)
    calibrated = _calibrated_images(model, len(train_paths))
    progress("features", 0, num_images)  # an ensemble's next members: Ensemble.fit
    model.fit(
        _batches(train_paths, config, reader),
        progress=stage_counter(progress, "features", num_images),
        log=log,
        coreset_progress=stage_counter(progress, "coreset", coreset_steps),  # greedy samplers only
        calibration_progress=stage_counter(progress, "calibration", calibrated),
        spill_dir=spill_dir,
    )
    if validation is not None:  # an ensemble refuses (its scores have no fixed threshold)
        total = _share_size(len(validation.paths))
        batches = counted(_batches(validation.paths, config, reader), progress, "validation", total)
        model.calibrate(batches, labels=validation.labels, masks=validation.masks)
        log(f"calibration: {model.calibration.describe()}")
    return model


def _calibrated_images(model: Model, num_images: int) -> int:
    """How many of this process's ``num_images`` training images the fit's calibrations score,
    over the members (``progress`` totals)."""
    share = np.arange(num_images)[sharding.process_share(num_images)[0]]
    total = 0
    for config in (member.config for member in model.members):
        held_out = calibration.fit_held_out(
            config.calibration, num_images, config.calibration_fraction, config.seed
        )
        scored = share if held_out is None else np.intersect1d(share, held_out)
        total += len(scored) if config.calibration != "none" else 0
    return total


def save_model(model: Model, out: str | os.PathLike, log: Log = no_log) -> Path:
    """``checkpoint.save(model, out)``, then (process 0) its calibration picture in the folder
    (``reports.write_calibration_figure``); returns the folder."""
    saved = checkpoint.save(model, out)
    log(f"saved model to {saved}")
    if sharding.is_primary_process():
        figure = reports.write_calibration_figure(saved, model.calibration)
        if figure is not None:
            log(f"calibration scores: {figure} ({model.calibration.describe_false_alarms()})")
    return saved


def training_images(
    folder: str | os.PathLike, train_images: int | None = None, train_seed: int = 0
) -> list[Path]:
    """A folder's training images, or the few-shot subset of ``train_images`` of them
    (``folders.few_shot_subset``)."""
    paths = folders.load_train_paths(folder)
    if train_images is not None:
        paths = folders.few_shot_subset(paths, train_images, train_seed)
    return paths


def fit_folder(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    configs: PatchCoreConfig | Sequence[PatchCoreConfig],
    *,
    train_images: int | None = None,
    train_seed: int = 0,
    validation: str | os.PathLike | None = None,
    spill_dir: str | os.PathLike | None = None,
    backbones: Sequence[Backbone | None] | None = None,
    mesh: Mesh | None = None,
    reader: ImageReader | None = None,
    progress: Progress = no_progress,
    log: Log = no_log,
) -> Model:
    """Fits a model on ``folder``'s nominal training images and saves it to ``out``.

    Args:
      folder: MVTec AD layout (only ``train/`` is read) or a folder of good images.
      configs: one config, or one per ensemble member.
      train_images, train_seed: fit on a seeded few-shot subset (``training_images``).
      validation: calibrate on this folder instead of the config's calibration
        (``load_validation_set``; single models only).
      spill_dir: folder of the spill file (``bank.FeatureStore``), for every member.
      backbones: per member, its backbone (``build_model``; None entries: loaded by name).
      reader: how images are read (worker processes, crop cache; ``ImageReader``); its counts
        are logged when it has a cache. Default: threads of this process, no cache.
    Raises:
      ValueError / OSError before any work: a bad ``out`` or ``spill_dir``, too few images for
      the bank or the held-out calibration, an unreadable validation set.
      interrupt.Interrupted: Ctrl-C (``interrupt.handling_sigint``), before ``out`` changes.
    """
    configs = [configs] if isinstance(configs, PatchCoreConfig) else list(configs)
    if validation is not None:
        if len(configs) > 1:
            raise ValueError("a validation set calibrates one model, not an ensemble of several")
        configs = [configs[0].replace(calibration="none")]  # the validation set calibrates
    with sharding.agreed():  # every process's checks pass, or every process stops here
        checkpoint_folder.check_destination(out)  # a bad destination fails now, not after the work
        if spill_dir is not None:
            check_writable_folder(spill_dir, "--spill-dir")
        config = configs[0]
        paths = training_images(folder, train_images, train_seed)
        if config.calibration == "held-out":
            try:
                calibration.held_out_images(len(paths), config.calibration_fraction, config.seed)
            except ValueError as error:
                raise ValueError(f"PatchCoreConfig.calibration_fraction: {error}") from None
        check_usable(paths, config, "training images", reader)
        validation_set = None if validation is None else load_validation_set(validation, config)
        if validation_set is not None:
            folders.check_validation_apart(paths, validation_set.paths)
            check_usable(validation_set.paths, config, "validation images", reader)
        model = build_model(configs, len(paths), backbones=backbones, mesh=mesh)
    names = ",".join(c.backbone for c in configs)
    log(f"fitting {names} on {quantity(len(paths), 'image')} of {folder}")
    fit_model(
        model,
        paths,
        validation=validation_set,
        spill_dir=spill_dir,
        reader=reader,
        progress=progress,
        log=log,
    )
    interrupt.check()
    log_counts(reader, log)
    save_model(model, out, log)
    return model


def extend_folder(
    folder: str | os.PathLike,
    model_path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    train_images: int | None = None,
    train_seed: int = 0,
    spill_dir: str | os.PathLike | None = None,
    config_values: dict[str, Any] | None = None,
    mesh: Mesh | None = None,
    reader: ImageReader | None = None,
    progress: Progress = no_progress,
    log: Log = no_log,
) -> PatchCore:
    """Adds ``folder``'s training images to the model saved at ``model_path``
    (``PatchCore.extend``; its features spilled into ``spill_dir`` if they must) and saves it
    to ``out`` (default: replaces ``model_path``).

    ``config_values``: config fields given with the request (the command line's model options);
    the model's config cannot change, so each must equal the model's (else ValueError listing
    those that differ). Ensembles cannot be extended (ValueError). ``reader``: as
    ``fit_folder``'s."""
    out = model_path if out is None else out
    with sharding.agreed():
        checkpoint_folder.check_destination(out)  # a bad destination fails now, not after the work
        if spill_dir is not None:
            check_writable_folder(spill_dir, "--spill-dir")
        model = checkpoint.load(model_path, mesh=mesh)
        if isinstance(model, Ensemble):
            raise ValueError(
                f"{model_path} holds an ensemble; ensembles cannot be resumed: fit anew"
            )
        model.config.check_unchanged(
            config_values or {}, f"{model_path}: its options cannot change when resuming"
        )
        paths = training_images(folder, train_images, train_seed)
        check_usable(paths, model.config, "training images", reader)
    added = quantity(len(paths), "image")
    log(f"adding {added} of {folder} to {model_path} ({model.config.backbone})")
    features = stage_counter(progress, "features", _share_size(len(paths)))
    batches = _batches(paths, model.config, reader)
    model.extend(batches, progress=features, log=log, spill_dir=spill_dir)
    interrupt.check()
    log_counts(reader, log)
    save_model(model, out, log)
    return model


# ---------------------------------------------------------------- scoring


def score_files(
    model: Model,
    paths: Sequence[Path],
    *,
    keep_images: bool = False,
    reader: ImageReader | None = None,
    progress: Progress,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Scores image files (read by ``reader``) batch by batch: ``(image_scores [N],
    anomaly_maps [N, H, W], uint8 crops [N, H, W, 3] if keep_images (for heatmaps: no image is
    decoded twice) else None)``. With several processes each scores its share; every process
    gets every image's rows."""
    images: list[np.ndarray] = []

    def remembered(batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for batch in batches:
            if keep_images:
                images.append(batch)
            yield batch

    total = _share_size(len(paths)) * len(model.members)
    batches = remembered(_batches(paths, model.config, reader))
    progress("scoring", 0, total)  # the clock starts with the first batch's decoding
    gather = sharding.gather_rows_from_processes
    prediction = model.predict(batches, progress=stage_counter(progress, "scoring", total))
    scores, maps = gather(prediction.image_scores), gather(prediction.anomaly_maps)
    return scores, maps, (gather(np.concatenate(images)) if keep_images else None)


# ---------------------------------------------------------------- predict


@dataclass
class Predictions:
    """What ``predict_files`` scored and wrote."""

    paths: list[Path]
    names: list[str]
    image_scores: np.ndarray  # [N]
    decisions: np.ndarray | None  # [N] bool at the calibrated threshold (None: uncalibrated)
    calibration: calibration.Calibration | None
    scores_csv: Path
    num_heatmaps: int
    num_masks: int
    unreadable: preprocess.Unusable  # (path, reason) of the images left out (``skip_unreadable``)


def predict_files(
    model: ModelOrPath,
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    recursive: bool = False,
    heatmaps: bool = True,
    masks: bool = False,
    overwrite: bool = False,
    skip_unreadable: bool = False,
    mesh: Mesh | None = None,
    reader: ImageReader | None = None,
    progress: Progress = no_progress,
    log: Log = no_log,
) -> Predictions:
    """Scores image files and folders (``recursive``: sub-folders too) and writes into ``out``:
    ``scores.csv`` (image, name, score, normalised score and decision when calibrated, heatmap
    and mask files), ``heatmaps/`` and with ``masks`` binary defect masks in ``masks/``
    (calibrated models only). ``overwrite`` replaces a previous run's results in ``out``.
    An unusable image (``check_usable``) is an error before any work, or with
    ``skip_unreadable`` is listed in ``unreadable.csv`` and ``Predictions.unreadable``.
    ``reader``: as ``fit_folder``'s (its counts go to ``log``)."""
    with contextlib.ExitStack() as stack:
        with sharding.agreed():
            model = _load(model, mesh)
            thresholds = model.calibration
            if masks and thresholds is None:
                raise ValueError(
                    "--masks needs a calibrated model; this one has no calibration (fitted with "
                    "--calibration none or by an older version, or an ensemble)"
                )
            paths, names = folders.output_names(images, recursive)
            unreadable = check_usable(
                paths,
                model.config,
                "images",
                reader,
                skip_unreadable=skip_unreadable,
                hint=preprocess.SKIP,
            )
            skipped = dict(unreadable)
            kept = [i for i, path in enumerate(paths) if path not in skipped]
            paths, names = [paths[i] for i in kept], [names[i] for i in kept]
            out_dir = stack.enter_context(primary_output_folder(out, overwrite=overwrite))
        scored = score_files(model, paths, keep_images=heatmaps, reader=reader, progress=progress)
        scores, maps, crops = scored
        log_counts(reader, log)
        decisions = None if thresholds is None else thresholds.decisions(scores)
        with sharding.agreed():
            if sharding.is_primary_process():
                if unreadable:
                    write_csv(out_dir / "unreadable.csv", ["image", "reason"], unreadable)
                heatmap_progress = stage_counter(progress, "heatmaps", len(paths))
                reports.write_predictions(
                    out_dir, model, paths, names, scores, maps, crops, masks, heatmap_progress
                )
    return Predictions(
        paths,
        names,
        scores,
        decisions,
        thresholds,
        out_dir / "scores.csv",
        num_heatmaps=len(paths) if heatmaps else 0,
        num_masks=len(paths) if masks else 0,
        unreadable=unreadable,
    )


# ---------------------------------------------------------------- evaluate


def test_masks(dataset: folders.Dataset, config: PatchCoreConfig) -> np.ndarray:
    """The ground truth of ``dataset``'s test images in ``config``'s frame, [N, H, W] bool
    (all-normal where an image has no mask); read before any image is scored."""
    return preprocess.load_masks(
        dataset.test_mask_paths,
        **preprocess.image_options(config),
        image_paths=dataset.test_image_paths,
        threshold=config.mask_threshold,
    )


@dataclass
class Evaluation:
    """A model's scores on a dataset's test images and the MVTec AD metrics of them."""

    dataset: folders.Dataset
    image_scores: np.ndarray  # [N]
    anomaly_maps: np.ndarray  # [N, H, W]
    masks: np.ndarray  # [N, H, W] bool
    images: np.ndarray | None  # [N, H, W, 3] uint8 crops (keep_images) or None
    metrics: dict[str, Any]  # ``metrics.evaluate``
    scoring_seconds: float  # decode + embed + score of the test images


def evaluate_model(
    model: Model,
    dataset: folders.Dataset,
    masks: np.ndarray,
    *,
    keep_images: bool = False,
    reader: ImageReader | None = None,
    progress: Progress = no_progress,
) -> Evaluation:
    """Scores ``dataset``'s test images and computes the MVTec AD metrics (``metrics.evaluate``)
    against ``masks`` (``test_masks``); defect images without a mask stay out of the pixel
    metrics."""
    paths = dataset.test_image_paths
    start = time.perf_counter()
    scored = score_files(model, paths, keep_images=keep_images, reader=reader, progress=progress)
    scores, maps, images = scored
    seconds = time.perf_counter() - start
    results = metrics.evaluate(
        dataset.test_labels, scores, masks, maps, pixel_images=dataset.has_pixel_labels
    )
    return Evaluation(dataset, scores, maps, masks, images, results, seconds)


def evaluation_report(evaluation: Evaluation, model: Model) -> dict[str, Any]:
    """``metrics.json``'s content without the paths: the metrics, confusion counts at the
    calibrated and F1-optimal thresholds, per-defect-type metrics, notes and the config."""
    dataset, scores = evaluation.dataset, evaluation.image_scores
    labels, has_pixels = np.asarray(dataset.test_labels), dataset.has_pixel_labels
    defect_types = [s.defect_type for s in dataset.test_samples]
    per_type = metrics.evaluate_per_defect_type(
        defect_types, labels, scores, evaluation.masks, evaluation.anomaly_maps, has_pixels
    )
    results = evaluation.metrics
    thresholds = model.calibration
    notes = metrics.missing_metric_reasons(results)
    if thresholds is None:
        notes.append("the model has no calibration: no calibrated threshold to report")
    named = {
        "calibrated": None if thresholds is None else thresholds.image_threshold,
        "f1_optimal": results["f1_threshold"],
    }
    confusion = {
        name: None
        if value is None
        else {"threshold": value, **metrics.confusion_counts(labels, scores, value)}
        for name, value in named.items()
    }
    report = {
        **results,
        "confusion": confusion,
        "calibration": None if thresholds is None else thresholds.describe(),
        "num_without_masks": int(np.count_nonzero(~has_pixels)),
        "per_defect_type": per_type,
        "notes": notes,
        "config": model.config.to_dict(),
    }
    if isinstance(model, Ensemble):
        report["members"] = [member.config.to_dict() for member in model.members]
    return report


def evaluate_dataset(
    model: ModelOrPath,
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mask_threshold: int | None = None,
    allow_missing_masks: bool = False,
    heatmaps: bool = True,
    overwrite: bool = False,
    skip_unreadable: bool = False,
    mesh: Mesh | None = None,
    reader: ImageReader | None = None,
    progress: Progress = no_progress,
    log: Log = no_log,
) -> dict[str, Any]:
    """Evaluates a model on ``folder``'s test set (MVTec AD layout) and writes into ``out``
    (``default_evaluation_folder`` for a saved model): ``metrics.json`` (the
    returned report: ``evaluation_report`` plus the dataset, the model and the ``figures``),
    ``per_image.csv`` (score, calibrated and F1-optimal-oracle decisions, heatmap),
    ``heatmaps/`` and the pictures of the operating point (``reports.score_figures``).

    Args:
      mask_threshold: binarise masks that are not 0/255 at this value (default: the model's).
      allow_missing_masks: accept defect images without a mask (left out of pixel metrics).
      skip_unreadable: leave unusable test images (``check_usable``) out of the metrics, listed
        in the report's ``unreadable`` and ``unreadable.csv`` (default: an error, before scoring).
      reader: as ``fit_folder``'s.
    Raises:
      ValueError / OSError before any image is scored: an unreadable model, dataset, image or
      mask.
    """
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"{out} is a file; expected an output folder (--out)")
    model_name = None if isinstance(model, PatchCore | Ensemble) else str(model)
    with contextlib.ExitStack() as stack:
        with sharding.agreed():  # every process reads the model and the masks
            model = _load(model, mesh)  # checked first
            config = model.config
            if mask_threshold is not None:
                config = config.replace(mask_threshold=mask_threshold)
            dataset = folders.load_dataset(
                folder, allow_missing_masks=allow_missing_masks, train=False
            )
            paths, skip = dataset.test_image_paths, skip_unreadable
            unreadable = check_usable(
                paths, config, "test images", reader, skip_unreadable=skip, hint=preprocess.SKIP
            )
            skipped = {path for path, _ in unreadable}
            kept = tuple(s for s in dataset.test_samples if s.image_path not in skipped)
            dataset = dataclasses.replace(dataset, test_samples=kept)
            folders.validate_masks(dataset)
            masks = test_masks(dataset, config)  # a broken mask is reported before any scoring
            out_dir = stack.enter_context(primary_output_folder(out, overwrite=overwrite))
        missing = int(np.count_nonzero(~dataset.has_pixel_labels))
        if missing:
            log(f"{missing} defective images without masks are left out of the pixel metrics")
        evaluation = evaluate_model(
            model, dataset, masks, keep_images=heatmaps, reader=reader, progress=progress
        )
        log_counts(reader, log)
        report = {
            "dataset": str(folder),
            "model": model_name,
            **evaluation_report(evaluation, model),
            "unreadable": [{"image": str(path), "reason": why} for path, why in unreadable],
            "figures": reports.score_figures(dataset.test_labels),
        }
        if unreadable:
            report["notes"].append(
                f"{len(unreadable)} unreadable test images were left out of every metric "
                f"({preprocess.describe_unusable(unreadable)})"
            )
        with sharding.agreed():
            if sharding.is_primary_process():
                if unreadable:
                    write_csv(out_dir / "unreadable.csv", ["image", "reason"], unreadable)
                reports.write_score_figures(
                    out_dir,
                    report["figures"],
                    dataset.test_samples,
                    evaluation.image_scores,
                    report["confusion"],
                )
                atomic_write_text(out_dir / "metrics.json", json.dumps(report, indent=2) + "\n")
                reports.write_per_image(
                    out_dir,
                    evaluation.dataset.test_samples,
                    evaluation.image_scores,
                    evaluation.anomaly_maps,
                    evaluation.images if heatmaps else None,
                    evaluation.masks,
                    evaluation.metrics["f1_threshold"],
                    model.calibration,
                    stage_counter(progress, "heatmaps", len(evaluation.dataset.test_samples)),
                )
    return report


def default_evaluation_folder(model_path: str | os.PathLike) -> Path:
    """``MODEL_evaluation`` beside a saved model (which stays untouched)."""
    model_path = Path(model_path).absolute()
    return model_path.with_name(f"{model_path.name}_evaluation")
