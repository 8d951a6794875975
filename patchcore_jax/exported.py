"""Runs a model written by ``patchcore-jax export`` with jax and numpy only.

A deployed model needs nothing else: no flax, orbax or backbone code. The file is a checksummed
container (``write_checksummed``): a kind-and-version line, one line per section with its byte
length and sha256, the JSON metadata (config, calibration, platforms) and the ``jax.export``
serialisation of the model's scoring (StableHLO with the backbone weights and the memory bank as
constants, batch dimension symbolic). Both sections are verified before anything is parsed, and
the threshold and normalisation applied come from the metadata alone::

    from patchcore_jax import exported
    model = exported.load("bottle.pcjx")
    outputs = model(images)  # uint8 [B, H, W, 3] preprocessed crops
    outputs["image_scores"], outputs["normalized_scores"], outputs["decisions"],
    outputs["anomaly_maps"]
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KIND = "export"
FORMAT_VERSION = 2  # 2: checksummed sections; calibration applied from the metadata
OUTPUTS: tuple[str, ...] = ("image_scores", "normalized_scores", "decisions", "anomaly_maps")
_SECTION = re.compile(rb"([a-z]+) (\d+) sha256:([0-9a-f]{64})")
_HEADER_LIMIT = 4096  # the text lines before the metadata are far shorter


def normalize(values: Any, threshold: float, minimum: float, maximum: float) -> Any:
    """anomalib's normalisation: ``clip((values - threshold) / (maximum - minimum) + 0.5, 0, 1)``.

    Works on numpy and jax arrays (same dtype out as in for float32). Lives here so that the
    deployed loader applies the very function ``Calibration`` uses.
    """
    xp = jnp if isinstance(values, jax.Array) else np
    span = maximum - minimum if maximum > minimum else 1.0
    values = xp.asarray(values, dtype=xp.float32)
    return xp.clip((values - xp.float32(threshold)) / xp.float32(span) + xp.float32(0.5), 0, 1)


def write_checksummed(
    path: str | os.PathLike,
    kind: str,
    version: int,
    metadata: dict[str, Any],
    payload: bytes | memoryview,
    payload_name: str,
) -> None:
    """Writes a checksummed container to ``path`` (the caller makes it atomic).

    Layout: ``patchcore-jax KIND VERSION``, ``metadata LENGTH sha256:HEX``,
    ``PAYLOAD_NAME LENGTH sha256:HEX`` (text lines), then the JSON metadata (with
    ``format_version``) and the payload bytes. ``read_checksummed`` verifies it.
    """
    fields = {"format_version": version}
    fields.update((key, value) for key, value in metadata.items() if key != "format_version")
    header = json.dumps(fields, allow_nan=False).encode()
    lines = [f"patchcore-jax {kind} {version}"]
    for name, section in (("metadata", header), (payload_name, payload)):
        lines.append(f"{name} {len(section)} sha256:{hashlib.sha256(section).hexdigest()}")
    with open(path, "wb") as file:
        file.write("\n".join(lines).encode() + b"\n")
        file.write(header)
        file.write(payload)


def read_checksummed(
    path: str | os.PathLike, kind: str, version: int, remedy: str
) -> tuple[dict[str, Any], memoryview]:
    """Reads and verifies a ``write_checksummed`` file: (metadata, payload).

    Args:
      remedy: what to do about another format version (e.g. "export the model again").
    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError (one line naming ``path``): another kind of file, another format version
        (a file without a version is version 1), a bad header, a truncated or extended file,
        or a section whose sha256 does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} file at {path}")
    data = memoryview(path.read_bytes())
    found = _format_version(bytes(data[:_HEADER_LIMIT]), path, kind)
    if found != str(version):
        raise ValueError(
            f"{path} has {kind} format version {found}; this patchcore-jax reads version "
            f"{version}: {remedy}"
        )
    damaged = f"{path} is a damaged patchcore-jax {kind} file"
    lines = bytes(data[:_HEADER_LIMIT]).split(b"\n", 3)
    sections = [_SECTION.fullmatch(line) for line in lines[1:3]]
    if len(lines) < 4 or not all(sections) or sections[0][1] != b"metadata":
        raise ValueError(f"{damaged} (its header lines cannot be read)")
    start = sum(len(line) + 1 for line in lines[:3])
    lengths = [int(match[2]) for match in sections]
    if len(data) != start + sum(lengths):
        how = "truncated" if len(data) < start + sum(lengths) else "longer than its header says"
        raise ValueError(f"{damaged} ({how}: {len(data)} bytes, expected {start + sum(lengths)})")
    parts = [data[start : start + lengths[0]], data[start + lengths[0] :]]
    for match, part in zip(sections, parts, strict=True):
        if hashlib.sha256(part).hexdigest() != match[3].decode():
            raise ValueError(f"{damaged} (its {match[1].decode()} does not match its sha256)")
    try:
        metadata = json.loads(bytes(parts[0]))
    except ValueError as error:
        raise ValueError(f"{damaged} (its metadata is not JSON: {error})") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{damaged} (its metadata is not a JSON object)")
    return metadata, parts[1]


def _format_version(start: bytes, path: Path, kind: str) -> str:
    """The version on the first line ``patchcore-jax KIND [VERSION]`` ("1" when absent)."""
    line = start.split(b"\n", 1)[0] if b"\n" in start else b""
    prefix = f"patchcore-jax {kind}".encode()
    if line == prefix:
        return "1"  # format 1 had no version on its first line
    if not line.startswith(prefix + b" "):
        raise ValueError(f"{path} is not a patchcore-jax {kind} file (unexpected start)")
    return line[len(prefix) + 1 :].decode(errors="replace")[:20]


def is_export_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that begins like a patchcore-jax export (any format version,
    damaged or not): one that ``export`` may replace without ``--overwrite``."""
    try:
        with open(path, "rb") as file:
            _format_version(file.read(_HEADER_LIMIT), Path(path), KIND)
    except (OSError, ValueError):
        return False
    return True


class ExportedModel:
    """A loaded export: call it on uint8 ``[B, H, W, 3]`` crops of ``image_shape``.

    Attributes:
      metadata: the file's verified JSON metadata (``format_version``, ``config``,
        ``calibration`` thresholds, ``platforms``, ``image_shape``, ``package_version``); its
        ``calibration`` is what the model applies.
      image_shape: ``(H, W)`` of the crops it takes.
    """

    def __init__(self, metadata: dict[str, Any], program: Any, path: Path) -> None:
        self.metadata = metadata
        self.image_shape, self._calibration = _applied(metadata, path)
        self._program = program
        self._path = path

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 ``[B, H, W, 3]`` (B >= 1) -> ``{image_scores [B] float32, normalized_scores [B]
        float32, decisions [B] bool, anomaly_maps [B, H, W] float32}``."""
        images = np.asarray(images)
        expected = (*self.image_shape, 3)
        if (
            images.ndim != 4
            or images.shape[1:] != expected
            or images.dtype != np.uint8
            or not len(images)
        ):
            raise ValueError(
                f"images must be uint8 [B, {', '.join(map(str, expected))}] preprocessed crops "
                f"with B >= 1, got {images.dtype} {images.shape}"
            )
        platform = jax.default_backend()
        if platform not in self._program.platforms:
            raise ValueError(
                f"{self._path} was exported for {list(self._program.platforms)}, not for this "
                f"machine's {platform!r}; export again with that platform"
            )
        image_scores, anomaly_maps = (np.asarray(x) for x in self._program.call(images))
        threshold, minimum, maximum = self._calibration
        return {
            "image_scores": image_scores,
            "normalized_scores": normalize(image_scores, threshold, minimum, maximum),
            "decisions": image_scores >= threshold,
            "anomaly_maps": anomaly_maps,
        }


def _applied(metadata: dict[str, Any], path: Path) -> tuple[tuple[int, int], tuple[float, ...]]:
    """The crop shape and the (image_threshold, image_min, image_max) the model applies, checked
    (finite numbers, two positive sizes)."""
    try:
        shape = tuple(metadata["image_shape"])
        calibration = metadata["calibration"]
        values = tuple(calibration[k] for k in ("image_threshold", "image_min", "image_max"))
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: its metadata lacks {error}; export the model again") from None
    if len(shape) != 2 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"{path}: its metadata image_shape {list(shape)} is not [H, W]")
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        raise ValueError(
            f"{path}: its calibration (image_threshold, image_min, image_max) = {values} is not "
            "finite numbers; refit and export the model again"
        )
    return shape, tuple(float(v) for v in values)


def load(path: str | os.PathLike) -> ExportedModel:
    """Reads an export file, verifying its checksums and format version before deserialising.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError (one line naming ``path``): not an export file, damaged (a checksum, its length
        or its header), written in another format version, or metadata without a usable
        calibration.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}")
    remedy = "export the model again with this version"
    metadata, serialized = read_checksummed(path, KIND, FORMAT_VERSION, remedy)
    try:
        program = jax.export.deserialize(bytearray(serialized))
    except Exception as error:  # flatbuffer and MLIR parsers raise many types
        raise ValueError(
            f"{path} is a damaged patchcore-jax export file (its program cannot be read: "
            f"{type(error).__name__})"
        ) from None
    return ExportedModel(metadata, program, path)
