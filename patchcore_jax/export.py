"""Serialises a fitted, calibrated model's whole inference with ``jax.export`` (StableHLO).

The exported program maps preprocessed uint8 crops ``[B, H, W, 3]`` (B symbolic) to image
scores and anomaly maps; the backbone weights and the memory bank are constants inside it. The
calibration (threshold, normalisation range) goes into the file's checksummed metadata only, and
``patchcore_jax.exported.load`` applies it from there, with jax and numpy only: one source of
what a deployed model decides.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from patchcore_jax import checkpoint, exported
from patchcore_jax.files import atomic_path
from patchcore_jax.version import package_version

if TYPE_CHECKING:
    from patchcore_jax.calibration import Calibration
    from patchcore_jax.model import PatchCore

PLATFORMS: tuple[str, ...] = ("cpu", "cuda", "tpu")


def export_function(model: PatchCore) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """What ``export_model`` serialises: ``model.inference_function()``, uint8 ``[B, H, W, 3]``
    -> (image_scores [B], anomaly_maps [B, H, W]).

    Images run one at a time (``lax.map``), so the program is the same for any batch size and
    each image's result equals ``model.predict``'s to float32 rounding.
    """
    if model.memory_bank is None:
        raise ValueError("cannot export an unfitted model: call fit() first")
    # The model's own program, with the numerics it chose for its platform
    # (``PatchCore.describe``): the backbone's dtype and the k-NN's candidate search.
    embed_and_score = model.inference_function()

    def one_image(image: jax.Array) -> tuple[jax.Array, jax.Array]:
        result = embed_and_score(image[None])
        return result.image_scores[0], result.anomaly_maps[0]

    def infer(images: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jax.lax.map(one_image, images)

    return infer


def check_export_target(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``path`` if ``export`` may write its file there; a one-line error naming it otherwise.

    An existing export (any format version) is replaced; any other existing file only with
    ``overwrite``; a folder, or a path inside a checkpoint folder (its ``CURRENT``, a version),
    never.

    Raises:
      IsADirectoryError, FileExistsError, FileNotFoundError (missing parent folder).
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"--out {target} is a folder; give a file name")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: folder {target.parent} does not exist")
    model_folder = checkpoint.enclosing_checkpoint(target.parent)
    if model_folder is not None:
        raise FileExistsError(
            f"--out {target} is inside the checkpoint folder {model_folder}; write the export "
            "file elsewhere"
        )
    if (target.exists() or target.is_symlink()) and not (
        overwrite or exported.is_export_file(target)
    ):
        raise FileExistsError(
            f"--out {target} exists and is not a patchcore-jax export; choose another file or "
            "pass --overwrite to replace it"
        )
    return target


def export_model(
    model: PatchCore,
    path: str | os.PathLike,
    *,
    platforms: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes ``model``'s inference to the file ``path`` (atomically); returns its metadata.

    Args:
      platforms: lowering targets; default: cpu plus each of cuda and tpu that lowers on this
        machine without the hardware.
      overwrite: replace an existing file that is not an export (``check_export_target``).
    Raises:
      ValueError: unfitted or uncalibrated model, a non-finite threshold, or a requested
        platform that fails to lower.
      OSError: ``path`` refused by ``check_export_target``.
    """
    target = check_export_target(path, overwrite=overwrite)
    infer = jax.jit(export_function(model))
    calibration = _finite_calibration(model)
    height, width = model.image_shape
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8)
    if platforms is None:
        lowered = []
        for platform in PLATFORMS:  # one failed platform must not cost the others
            try:
                jax.export.export(infer, platforms=(platform,))(spec)
            except Exception:  # lowering rules missing for this platform here
                if platform == "cpu":
                    raise
                continue
            lowered.append(platform)
        platforms = lowered
    try:
        program = jax.export.export(infer, platforms=tuple(platforms))(spec)
    except Exception as error:
        raise ValueError(
            f"cannot export for {list(platforms)}: {type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''}"
        ) from error
    metadata = {
        "package_version": package_version(),
        "platforms": list(program.platforms),
        "image_shape": [height, width],
        "outputs": list(exported.OUTPUTS),
        "config": model.config.to_dict(),
        "calibration": {
            "method": calibration.method,
            "rule": calibration.rule,
            "quantile": calibration.quantile,
            "image_threshold": calibration.image_threshold,
            "image_min": calibration.image_min,
            "image_max": calibration.image_max,
            "pixel_threshold": calibration.pixel_threshold,
            "pixel_min": calibration.pixel_min,
            "pixel_max": calibration.pixel_max,
        },
        "preprocessing": {
            "resize_mode": model.config.resize_mode,
            "resize": model.config.resize,
            "image_shape": [height, width],
        },
    }
    check_export_target(target, overwrite=overwrite)  # again: lowering took a while
    with atomic_path(target) as tmp:
        exported.write_checksummed(
            tmp, exported.KIND, exported.FORMAT_VERSION, metadata, program.serialize(), "program"
        )
    return metadata


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
