"""Runs a model written by ``patchcore-jax export`` with jax and numpy only.

A deployed model needs nothing else: no flax, orbax or backbone code. The file holds a magic
line, a JSON header (format version, config, thresholds, platforms) and the ``jax.export``
serialisation of the whole inference (StableHLO with the backbone weights and the memory bank
as constants, batch dimension symbolic)::

    from patchcore_jax import exported
    model = exported.load("bottle.pcjx")
    outputs = model(images)  # uint8 [B, H, W, 3] preprocessed crops
    outputs["image_scores"], outputs["normalized_scores"], outputs["decisions"],
    outputs["anomaly_maps"]
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import jax
import numpy as np

FORMAT_VERSION = 1
MAGIC = b"patchcore-jax export\n"
_LENGTH = struct.Struct("<Q")  # byte length of the JSON header
OUTPUTS: tuple[str, ...] = ("image_scores", "normalized_scores", "decisions", "anomaly_maps")


class ExportedModel:
    """A loaded export: call it on uint8 ``[B, H, W, 3]`` crops of ``image_shape``.

    Attributes:
      metadata: the file's JSON header (``format_version``, ``config``, ``calibration``
        thresholds, ``platforms``, ``image_shape``, ``package_version``).
      image_shape: ``(H, W)`` of the crops it takes.
    """

    def __init__(self, metadata: dict[str, Any], program: Any, path: Path) -> None:
        self.metadata = metadata
        self.image_shape: tuple[int, int] = tuple(metadata["image_shape"])
        self._program = program
        self._path = path

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 ``[B, H, W, 3]`` -> ``{image_scores [B] float32, normalized_scores [B] float32,
        decisions [B] bool, anomaly_maps [B, H, W] float32}``."""
        images = np.asarray(images)
        expected = (*self.image_shape, 3)
        if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [B, {', '.join(map(str, expected))}] preprocessed crops, "
                f"got {images.dtype} {images.shape}"
            )
        platform = jax.default_backend()
        if platform not in self._program.platforms:
            raise ValueError(
                f"{self._path} was exported for {list(self._program.platforms)}, not for this "
                f"machine's {platform!r}; export again with that platform"
            )
        outputs = self._program.call(images)
        return {name: np.asarray(value) for name, value in zip(OUTPUTS, outputs, strict=True)}


def write(path: str | os.PathLike, metadata: dict[str, Any], serialized: bytes) -> None:
    """Writes the file layout (magic, header length, JSON header, program) to ``path``."""
    header = json.dumps({"format_version": FORMAT_VERSION, **metadata}).encode()
    with open(path, "wb") as file:
        file.write(MAGIC + _LENGTH.pack(len(header)) + header)
        file.write(serialized)


def load(path: str | os.PathLike) -> ExportedModel:
    """Reads an export file, checking its kind and format version.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: not an export file, damaged, or written in another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}")
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path} is not a patchcore-jax export file (unexpected start)")
    start = len(MAGIC) + _LENGTH.size
    try:
        (length,) = _LENGTH.unpack_from(data, len(MAGIC))
        metadata = json.loads(data[start : start + length])
        version = metadata["format_version"]
    except (struct.error, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is a damaged patchcore-jax export file ({error})") from None
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has export format version {version}; this patchcore-jax reads version "
            f"{FORMAT_VERSION}: export the model again with this version"
        )
    try:
        program = jax.export.deserialize(bytearray(data[start + length :]))
    except Exception as error:  # flatbuffer and MLIR parsers raise many types
        raise ValueError(
            f"{path} is a damaged patchcore-jax export file (its program cannot be read: "
            f"{type(error).__name__})"
        ) from None
    return ExportedModel(metadata, program, path)
