"""Serialises a fitted, calibrated model's whole inference with ``jax.export`` (StableHLO).

The exported program maps preprocessed uint8 crops ``[B, H, W, 3]`` (B symbolic) to image
scores and anomaly maps, embedding and scoring the whole batch at once; the backbone weights are
constants inside it. The memory bank is either a constant too (one file: the calibration goes
into its checksummed metadata) or, with ``bank_path``, an input: then the bank's arrays, its
calibration and its configuration go into a separate bank file, and one program serves every
bank of its configuration and bucketed size (categories of a line, a bank grown by ``extend``).
``patchcore_jax.exported.load`` applies the calibration from the metadata, with jax and numpy
only: one source of what a deployed model decides.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from patchcore_jax import checkpoint, checkpoint_folder, exported
from patchcore_jax.ensemble import Ensemble
from patchcore_jax.exported import BANK_KIND
from patchcore_jax.files import atomic_path
from patchcore_jax.version import package_version

if TYPE_CHECKING:
    from patchcore_jax.calibration import Calibration
    from patchcore_jax.model import PatchCore

PLATFORMS: tuple[str, ...] = ("cpu", "cuda", "tpu")


# Config fields that only shape the fit (bank selection, calibration, evaluation, batching):
# a bank of a configuration runs in a program exported from any model that differs only here.
_FIT_ONLY_FIELDS = (
    "mask_threshold",
    "sampler",
    "coreset_fraction",
    "projection_dim",
    "num_start_points",
    "coreset_method",
    "seed",
    "batch_size",
    "calibration",
    "calibration_fraction",
    "threshold_quantile",
    "feature_memory_budget",
)


ENSEMBLE_BANKS = (
    "--bank-out exports one model's bank; an ensemble's banks stay inside its program "
    "(export it with --out only)"
)


def export_function(
    model: PatchCore | Ensemble, *, bank_input: bool = False
) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """What ``export_model`` serialises: ``model.inference_function(bank_input=...)``, uint8
    ``[B, H, W, 3]`` (and, with ``bank_input``, ``model.bank_inputs()``'s arrays) ->
    (image_scores [B], anomaly_maps [B, H, W]); an ensemble's members' raw outputs stacked,
    ([members, B], [members, B, H, W]), banks inside (the loader combines them per batch).

    The whole batch is embedded and scored at once (B symbolic: one program for every batch
    size); each image's result equals ``model.predict``'s to float32 rounding: only the
    summation order of the backbone's and the k-NN's matmuls depends on the batch size.
    """
    for member in model.members:
        if member.memory_bank is None:
            raise ValueError("cannot export an unfitted model: call fit() first")
    if isinstance(model, Ensemble):
        if bank_input:
            raise ValueError(ENSEMBLE_BANKS)
        members = [member.inference_function() for member in model.members]

        def infer_members(images: jax.Array) -> tuple[jax.Array, jax.Array]:
            results = [member(images) for member in members]
            scores = jnp.stack([result.image_scores for result in results])
            return scores, jnp.stack([result.anomaly_maps for result in results])

        return infer_members
    # The model's own program, with the numerics it chose for its platform
    # (``PatchCore.describe``): the backbone's dtype and the k-NN's candidate search.
    embed_and_score = model.inference_function(bank_input=bank_input)

    def infer(images: jax.Array, *bank_arrays: jax.Array) -> tuple[jax.Array, jax.Array]:
        result = embed_and_score(images, *bank_arrays)
        return result.image_scores, result.anomaly_maps

    return infer


def inference_configuration(model: PatchCore | Ensemble) -> dict[str, Any]:
    """What a bank file must share with a program file: the config fields the inference uses
    (all but ``_FIT_ONLY_FIELDS``), the crop shape and the platform's numerics (an ensemble:
    ``{"members": [each member's]}``)."""
    if isinstance(model, Ensemble):
        return {"members": [inference_configuration(member) for member in model.members]}
    configuration = model.config.to_dict()
    for name in _FIT_ONLY_FIELDS:
        configuration.pop(name)
    configuration["image_shape"] = list(model.image_shape)
    configuration["backbone_dtype"] = model.backbone_dtype
    configuration["candidate_search"] = model.candidate_search
    return configuration


def check_export_target(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    option: str = "--out",
    kind: str = exported.KIND,
) -> Path:
    """``path`` if ``export`` may write its ``kind`` file (``exported.KIND`` or ``BANK_KIND``)
    there; a one-line error naming it (as ``option``) otherwise.

    An existing file of that kind (any format version) is replaced; any other existing file only
    with ``overwrite``; a folder, or a path inside a checkpoint folder (its ``CURRENT``, a
    version), never.

    Raises:
      IsADirectoryError, FileExistsError, FileNotFoundError (missing parent folder).
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{option} {target} is a folder; give a file name")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: folder {target.parent} does not exist")
    model_folder = checkpoint_folder.enclosing_checkpoint(target.parent)
    if model_folder is not None:
        raise FileExistsError(
            f"{option} {target} is inside the checkpoint folder {model_folder}; write the "
            f"{kind} file elsewhere"
        )
    if (target.exists() or target.is_symlink()) and not (
        overwrite or exported.is_export_file(target, kind)
    ):
        raise FileExistsError(
            f"{option} {target} exists and is not a patchcore-jax {kind} file; choose another "
            "file or pass --overwrite to replace it"
        )
    return target


def export_model(
    model: PatchCore | Ensemble,
    path: str | os.PathLike,
    *,
    bank_path: str | os.PathLike | None = None,
    platforms: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes ``model``'s inference program to the file ``path`` (atomically); returns its
    metadata.

    Args:
      model: a fitted, calibrated PatchCore, or an Ensemble: its members' programs in one,
        banks inside and no calibration (``exported.load`` combines their outputs over each
        called batch, as ``Ensemble.predict`` does; no decisions).
      bank_path: None: the memory bank is a constant of the program and the calibration goes
        into its metadata. A file name: the program takes the bank as an input
        (``bank_inputs`` in its metadata) and ``export_bank`` writes this model's bank there.
      platforms: lowering targets; default: cpu plus each of cuda and tpu that lowers on this
        machine without the hardware.
      overwrite: replace existing files that are not exports (``check_export_target``).
    Raises:
      ValueError: unfitted or uncalibrated model, a non-finite threshold, ``path`` equal to
        ``bank_path``, or a requested platform that fails to lower.
      OSError: ``path`` or ``bank_path`` refused by ``check_export_target``.
    """
    target = check_export_target(path, overwrite=overwrite)
    if bank_path is not None:
        check_export_target(bank_path, overwrite=overwrite, option="--bank-out", kind=BANK_KIND)
        if Path(bank_path).resolve() == target.resolve():
            raise ValueError(f"--out and --bank-out are the same file {target}; give two names")
    infer = export_function(model, bank_input=bank_path is not None)
    ensemble = isinstance(model, Ensemble)
    calibration = None if ensemble else _finite_calibration(model)
    bank_arrays = {} if bank_path is None else model.bank_inputs()
    bank_specs = exported.pack_arrays(bank_arrays)[0] if bank_arrays else []
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in bank_arrays.values()]
    program = _lower(infer, model.image_shape, specs, platforms)
    height, width = model.image_shape
    metadata = {
        "package_version": package_version(),
        "platforms": list(program.platforms),
        "image_shape": [height, width],
        "outputs": list(exported.OUTPUTS),
        "config": model.config.to_dict(),
        "configuration": inference_configuration(model),
        "bank_inputs": bank_specs,
        "calibration": None if bank_specs or ensemble else _calibration_fields(calibration),
        "preprocessing": _preprocessing(model),
    }
    if ensemble:  # no calibration: the loader combines the members' outputs over each batch
        metadata["ensemble"] = {
            "members": len(model.members),
            "combination": exported.ENSEMBLE_COMBINATION,
            "member_configs": [member.config.to_dict() for member in model.members],
        }
    check_export_target(target, overwrite=overwrite)  # again: lowering took a while
    with atomic_path(target) as tmp:
        exported.write_checksummed(
            tmp, exported.KIND, exported.FORMAT_VERSION, metadata, program.serialize(), "program"
        )
    if bank_path is not None:
        export_bank(model, bank_path, overwrite=overwrite)
    return metadata


def export_checkpoint(
    model_path: str | os.PathLike,
    out: str | os.PathLike | None,
    *,
    bank_out: str | os.PathLike | None = None,
    platforms: Sequence[str] | None = None,
    overwrite: bool = False,
) -> list[str]:
    """The ``export`` command: checks the targets, loads the checkpoint ``model_path``, writes
    the program ``out`` (its bank inside, or ``bank_out`` as an input) and/or only the bank file
    ``bank_out``; returns what was written, e.g. ``["p.pcjx (program for cpu)", ...]``."""
    if out is None and bank_out is None:
        raise ValueError("export needs --out PROGRAM, --bank-out BANK or both")
    if out is not None:
        check_export_target(out, overwrite=overwrite)  # before loading the model
    if bank_out is not None:
        check_export_target(bank_out, overwrite=overwrite, option="--bank-out", kind=BANK_KIND)
    model = checkpoint.load(model_path)
    written = []
    if out is not None:
        options = {"bank_path": bank_out, "platforms": platforms, "overwrite": overwrite}
        metadata = export_model(model, out, **options)
        written.append(f"{out} (program for {', '.join(metadata['platforms'])})")
    else:
        export_bank(model, bank_out, overwrite=overwrite)
    if bank_out is not None:
        written.append(f"{bank_out} (bank of {model.memory_bank.shape[0]} rows)")
    return written


def export_bank(
    model: PatchCore, path: str | os.PathLike, *, overwrite: bool = False
) -> dict[str, Any]:
    """Writes ``model``'s bank file to ``path`` (atomically): ``model.bank_inputs()``'s arrays,
    the calibration and ``inference_configuration``; returns its metadata. It runs in any
    program exported with ``bank_path`` from a model of the same configuration and bucket
    (``exported.load(PROGRAM, bank=path)``), e.g. after ``extend`` only this file is new.

    Raises:
      ValueError: unfitted or uncalibrated model, or a non-finite threshold.
      OSError: ``path`` refused by ``check_export_target``.
    """
    target = check_export_target(path, overwrite=overwrite, option="--bank-out", kind=BANK_KIND)
    if isinstance(model, Ensemble):
        raise ValueError(ENSEMBLE_BANKS)
    calibration = _finite_calibration(model)
    specs, payload = exported.pack_arrays(model.bank_inputs())
    metadata = {
        "package_version": package_version(),
        "configuration": inference_configuration(model),
        "config": model.config.to_dict(),
        "bank_rows": int(model.memory_bank.shape[0]),
        "arrays": specs,
        "calibration": _calibration_fields(calibration),
        "preprocessing": _preprocessing(model),
    }
    with atomic_path(target) as tmp:
        exported.write_checksummed(
            tmp, BANK_KIND, exported.BANK_FORMAT_VERSION, metadata, payload, "bank"
        )
    return metadata


def _lower(
    infer: Callable[..., Any],
    image_shape: tuple[int, int],
    bank_specs: Sequence[jax.ShapeDtypeStruct],
    platforms: Sequence[str] | None,
) -> jax.export.Exported:
    """``jax.export`` of ``infer`` for uint8 [batch, H, W, 3] (batch symbolic) and the bank
    inputs, for ``platforms`` (default: cpu and each other one that lowers here)."""
    infer = jax.jit(infer)
    (batch,) = jax.export.symbolic_shape("batch")
    specs = (jax.ShapeDtypeStruct((batch, *image_shape, 3), jnp.uint8), *bank_specs)
    if platforms is None:
        lowered = []
        for platform in PLATFORMS:  # one failed platform must not cost the others
            try:
                jax.export.export(infer, platforms=(platform,))(*specs)
            except Exception:  # lowering rules missing for this platform here
                if platform == "cpu":
                    raise
                continue
            lowered.append(platform)
        platforms = lowered
    try:
        return jax.export.export(infer, platforms=tuple(platforms))(*specs)
    except Exception as error:
        raise ValueError(
            f"cannot export for {list(platforms)}: {type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''}"
        ) from error


def _calibration_fields(calibration: Calibration) -> dict[str, Any]:
    """The calibration as the metadata records it (the loader applies the image fields)."""
    names = ("method", "rule", "quantile", "image_threshold", "image_min", "image_max")
    names += ("pixel_threshold", "pixel_min", "pixel_max")
    return {name: getattr(calibration, name) for name in names}


def _preprocessing(model: PatchCore) -> dict[str, Any]:
    """How images become the crops the program takes (the caller's part)."""
    config = model.config
    image_shape = list(model.image_shape)
    return {"resize_mode": config.resize_mode, "resize": config.resize, "image_shape": image_shape}


def _finite_calibration(model: PatchCore) -> Calibration:
    """The model's calibration, which the export applies; ValueError if it has none or its
    image threshold or range is not finite (every decision would be wrong)."""
    calibration = model.calibration
    if calibration is None:
        raise ValueError(
            "cannot export a model without calibration (fitted with calibration 'none' or by an "
            "older version): its decisions would have no threshold; refit it"
        )
    values = (calibration.image_threshold, calibration.image_min, calibration.image_max)
    if not all(math.isfinite(value) for value in values):
        raise ValueError(
            f"cannot export a model whose image threshold and range {values} are not finite: "
            "its decisions would be wrong; refit it"
        )
    return calibration
