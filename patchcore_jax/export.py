"""Serialises a fitted, calibrated model's whole inference with ``jax.export`` (StableHLO).

The exported program maps preprocessed uint8 crops ``[B, H, W, 3]`` (B symbolic) to image
scores, normalised scores, decisions and anomaly maps; the backbone weights and the memory bank
are constants inside it. ``patchcore_jax.exported.load`` runs it with jax and numpy only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from patchcore_jax import exported
from patchcore_jax.files import atomic_path
from patchcore_jax.version import package_version

if TYPE_CHECKING:
    from patchcore_jax.model import PatchCore

PLATFORMS: tuple[str, ...] = ("cpu", "cuda", "tpu")


def export_function(model: PatchCore) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
    """What ``export_model`` serialises: ``model.inference_function()`` with its calibration,
    uint8 ``[B, H, W, 3]`` -> (image_scores [B], normalized_scores [B], decisions [B] bool,
    anomaly_maps [B, H, W]).

    Images run one at a time (``lax.map``), so the program is the same for any batch size and
    each image's result equals ``model.predict``'s to float32 rounding.
    """
    if model.memory_bank is None:
        raise ValueError("cannot export an unfitted model: call fit() first")
    calibration = model.calibration
    if calibration is None:
        raise ValueError(
            "cannot export a model without calibration (fitted with calibration 'none' or by an "
            "older version): its decisions would have no threshold; refit it"
        )
    # The model's own program, with the numerics it chose for its platform
    # (``PatchCore.describe``): the backbone's dtype and the k-NN's candidate search.
    embed_and_score = model.inference_function()

    def one_image(image: jax.Array) -> tuple[jax.Array, jax.Array]:
        result = embed_and_score(image[None])
        return result.image_scores[0], result.anomaly_maps[0]

    def infer(images: jax.Array):
        image_scores, anomaly_maps = jax.lax.map(one_image, images)
        return (
            image_scores,
            calibration.normalize_image_scores(image_scores),
            image_scores >= calibration.image_threshold,
            anomaly_maps,
        )

    return infer


def export_model(
    model: PatchCore,
    path: str | os.PathLike,
    *,
    platforms: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Writes ``model``'s inference to the file ``path`` (atomically); returns its header.

    Args:
      platforms: lowering targets; default: cpu plus each of cuda and tpu that lowers on this
        machine without the hardware.
    Raises:
      ValueError: unfitted or uncalibrated model, or a requested platform that fails to lower.
    """
    infer = jax.jit(export_function(model))
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
    calibration = model.calibration
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
    target = Path(path)
    with atomic_path(target) as tmp:
        exported.write(tmp, metadata, program.serialize())
    return metadata
