"""Runs a model written by ``patchcore-jax export`` with jax and numpy only.

A deployed model needs nothing else: no flax, orbax or backbone code. Each file is a checksummed
container (``write_checksummed``): a kind-and-version line, one line per section with its byte
length and sha256, the JSON metadata and the payload. A program file holds the ``jax.export``
serialisation of the model's scoring of a whole batch (StableHLO with the backbone weights as
constants, batch dimension symbolic) and either the memory bank inside it with the calibration
in its metadata, or (``export --bank-out``) the bank as an input: then a bank file holds the
bank's arrays, calibration and configuration, and one program runs every bank of its
configuration. Everything is verified before anything is parsed, and the threshold and
normalisation applied come from the metadata alone::

    from patchcore_jax import exported
    model = exported.load("bottle.pcjx")  # or exported.load("line.pcjx", bank="bottle.pcjb")
    outputs = model(images)  # uint8 [B, H, W, 3] preprocessed crops
    outputs["image_scores"], outputs["normalized_scores"], outputs["decisions"],
    outputs["anomaly_maps"]

A program compiles once per batch size B in a process (H, W and the bank are fixed by the
export); ``load`` turns on JAX's persistent compilation cache (the CLI's folder,
``sharding.default_compile_cache``) so that later processes reuse those compilations.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax.sharding import default_compile_cache, enable_compile_cache

KIND = "export"
# 2: checksummed sections, calibration applied from the metadata; 3: the whole batch at once,
# the bank padded to its bucket, optionally an input (``bank_inputs`` in the metadata).
FORMAT_VERSION = 3
BANK_KIND = "bank"
BANK_FORMAT_VERSION = 1
OUTPUTS: tuple[str, ...] = ("image_scores", "normalized_scores", "decisions", "anomaly_maps")
# An ensemble's scores and maps (``combine``): one definition, the model's and the loader's.
ENSEMBLE_COMBINATION = (
    "per member min-max over the scored set (scores and maps separately), then mean"
)
_SECTION = re.compile(rb"([a-z]+) (\d+) sha256:([0-9a-f]{64})")
_HEADER_LIMIT = 4096  # the text lines before the metadata are far shorter
_PROGRAM_CACHE_SIZE = 8
_PROGRAMS: dict[str, Any] = {}  # sha256 of a serialised program -> the deserialised program


def normalize(values: Any, threshold: float, minimum: float, maximum: float) -> Any:
    """anomalib's normalisation: ``clip((values - threshold) / (maximum - minimum) + 0.5, 0, 1)``.

    Works on numpy and jax arrays (same dtype out as in for float32). Lives here so that the
    deployed loader applies the very function ``Calibration`` uses.
    """
    xp = jnp if isinstance(values, jax.Array) else np
    span = maximum - minimum if maximum > minimum else 1.0
    values = xp.asarray(values, dtype=xp.float32)
    return xp.clip((values - xp.float32(threshold)) / xp.float32(span) + xp.float32(0.5), 0, 1)


def min_max(values: np.ndarray) -> np.ndarray:
    """(values - min) / (max - min) over the whole array; NaN entries stay NaN and are ignored
    for min and max; a constant array becomes zeros (the reference would divide by zero)."""
    values = np.asarray(values, np.float32)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return values.copy()
    low, high = finite.min(), finite.max()
    if high == low:
        return np.where(np.isnan(values), values, 0.0).astype(np.float32)
    return (values - low) / (high - low)


def combine(
    member_scores: Sequence[Any], member_maps: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's ensemble combination (``Ensemble.predict``; an exported ensemble's
    loader applies it to each called batch).

    Args:
      member_scores: per member, image scores [N].
      member_maps: per member, anomaly maps [N, H, W].
    Returns:
      (image_scores [N], anomaly_maps [N, H, W]) float32: the mean over members of each
      member's scores (maps) min-max normalised over all N images (all N*H*W pixels).
    """
    if not member_scores or len(member_scores) != len(member_maps):
        raise ValueError(
            f"combine needs scores and maps of the same members, got {len(member_scores)} "
            f"and {len(member_maps)}"
        )
    shapes = {np.shape(s) for s in member_scores}, {np.shape(m) for m in member_maps}
    if len(shapes[0]) != 1 or len(shapes[1]) != 1:
        raise ValueError(
            f"members scored different image sets: score shapes {sorted(shapes[0])}, "
            f"map shapes {sorted(shapes[1])}"
        )
    scores = np.mean([min_max(s) for s in member_scores], axis=0)
    maps = np.mean([min_max(m) for m in member_maps], axis=0)
    return scores.astype(np.float32), maps.astype(np.float32)


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


def is_export_file(path: str | os.PathLike, kind: str = KIND) -> bool:
    """Whether ``path`` is a file that begins like a patchcore-jax ``kind`` file (any format
    version, damaged or not): one that ``export`` may replace without ``--overwrite``."""
    try:
        with open(path, "rb") as file:
            _format_version(file.read(_HEADER_LIMIT), Path(path), kind)
    except (OSError, ValueError):
        return False
    return True


def pack_arrays(arrays: dict[str, np.ndarray]) -> tuple[list[list[Any]], bytes]:
    """``(specs, payload)``: ``[[name, dtype name, shape], ...]`` and the arrays' little-endian
    C-order bytes one after another, as a bank file stores them (``unpack_arrays``)."""
    specs, parts = [], []
    for name, array in arrays.items():
        array = np.asarray(array)
        specs.append([name, array.dtype.name, list(array.shape)])
        parts.append(np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes())
    return specs, b"".join(parts)


def unpack_arrays(specs: Any, payload: memoryview, path: Path) -> dict[str, np.ndarray]:
    """The arrays ``pack_arrays`` wrote, read-only views of ``payload``; ValueError naming
    ``path`` if the specs are not ``[name, dtype, shape]`` or do not add up to the payload."""
    damaged = f"{path} is a damaged patchcore-jax {BANK_KIND} file"
    arrays, offset = {}, 0
    try:
        for name, dtype_name, shape in specs:
            dtype = np.dtype(jnp.dtype(dtype_name)).newbyteorder("<")
            if not all(isinstance(size, int) and size >= 0 for size in shape):
                raise ValueError(f"shape {shape}")
            count = math.prod(shape)
            array = np.frombuffer(payload, dtype, count, offset).reshape(shape)
            arrays[str(name)] = array
            offset += count * dtype.itemsize
    except (TypeError, ValueError) as error:
        raise ValueError(f"{damaged} (its array list cannot be read: {error})") from None
    if offset != len(payload):
        raise ValueError(f"{damaged} (its arrays take {offset} bytes, it holds {len(payload)})")
    return arrays


def read_bank(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Reads and verifies a bank file (``export --bank-out``): ``(metadata, arrays)``.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError (one line naming ``path``): not a bank file, damaged, another format version.
    """
    path = Path(path)
    remedy = "export the bank again with this version (export MODEL --bank-out BANK)"
    metadata, payload = read_checksummed(path, BANK_KIND, BANK_FORMAT_VERSION, remedy)
    return metadata, unpack_arrays(metadata.get("arrays"), payload, path)


class ExportedModel:
    """A loaded export: call it on uint8 ``[B, H, W, 3]`` crops of ``image_shape``.

    Attributes:
      metadata: the program file's verified JSON metadata (``format_version``, ``config``,
        ``configuration``, ``platforms``, ``image_shape``, ``bank_inputs``, ``package_version``
        and, when the bank is inside, ``calibration``).
      bank_metadata: the bank file's (``configuration``, ``config``, ``calibration``,
        ``arrays``, ``bank_rows``), or None when the bank is inside the program.
      image_shape: ``(H, W)`` of the crops it takes.
      members: None, or an exported ensemble's member count (``metadata["ensemble"]``).
    The ``calibration`` applied is the bank file's, else the program file's.
    """

    def __init__(
        self,
        metadata: dict[str, Any],
        program: Any,
        path: Path,
        bank: tuple[dict[str, Any], dict[str, np.ndarray], Path] | None = None,
    ) -> None:
        self.metadata = metadata
        self.bank_metadata = None if bank is None else bank[0]
        source = metadata if bank is None else {**bank[0], "image_shape": metadata["image_shape"]}
        self.members = _ensemble_members(metadata, path)
        self.image_shape, self._calibration = _applied(
            source, path if bank is None else bank[2], calibrated=self.members is None
        )
        self._program = program
        self._path = path
        # Placed once: every call passes the same device arrays.
        self._bank_arrays = [] if bank is None else [jnp.asarray(x) for x in bank[1].values()]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray | None]:
        """uint8 ``[B, H, W, 3]`` (B >= 1) -> ``{image_scores [B] float32, normalized_scores [B]
        float32, decisions [B] bool, anomaly_maps [B, H, W] float32}``, the batch at once.

        An ensemble (``members``): its scores and maps are ``combine``d over these B images
        (as ``Ensemble.predict`` of them), ``member_scores [members, B]`` the raw ones, and
        ``normalized_scores`` and ``decisions`` are None (an ensemble has no calibration)."""
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
        outputs = self._program.call(images, *self._bank_arrays)
        image_scores, anomaly_maps = (np.asarray(x) for x in outputs)
        if self.members is not None:  # [members, B]: combined over this batch, no decisions
            combined_scores, combined_maps = combine(list(image_scores), list(anomaly_maps))
            return {
                "image_scores": combined_scores,
                "normalized_scores": None,
                "decisions": None,
                "anomaly_maps": combined_maps,
                "member_scores": image_scores,
            }
        threshold, minimum, maximum = self._calibration
        return {
            "image_scores": image_scores,
            "normalized_scores": normalize(image_scores, threshold, minimum, maximum),
            "decisions": image_scores >= threshold,
            "anomaly_maps": anomaly_maps,
        }


def _ensemble_members(metadata: dict[str, Any], path: Path) -> int | None:
    """The number of members of an exported ensemble (>= 1), or None for a single model."""
    ensemble = metadata.get("ensemble")
    if ensemble is None:
        return None
    members = ensemble.get("members") if isinstance(ensemble, dict) else None
    if not isinstance(members, int) or members < 1:
        raise ValueError(f"{path}: its metadata's ensemble {ensemble!r} has no member count")
    return members


def _applied(
    metadata: dict[str, Any], path: Path, calibrated: bool = True
) -> tuple[tuple[int, int], tuple[float, ...] | None]:
    """The crop shape and the (image_threshold, image_min, image_max) the model applies, checked
    (finite numbers, two positive sizes); None for an ensemble (not ``calibrated``)."""
    try:
        shape = tuple(metadata["image_shape"])
        calibration = metadata["calibration"] if calibrated else {}
        keys = ("image_threshold", "image_min", "image_max") if calibrated else ()
        values = tuple(calibration[k] for k in keys)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: its metadata lacks {error}; export the model again") from None
    if len(shape) != 2 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"{path}: its metadata image_shape {list(shape)} is not [H, W]")
    if not calibrated:
        return shape, None
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        raise ValueError(
            f"{path}: its calibration (image_threshold, image_min, image_max) = {values} is not "
            "finite numbers; refit and export the model again"
        )
    return shape, tuple(float(v) for v in values)


def _check_bank(
    program: Any, metadata: dict[str, Any], bank_metadata: dict[str, Any], arrays, paths
) -> None:
    """ValueError (one line naming both files) unless the bank file's configuration equals the
    program's and its arrays are the names, dtypes and shapes the program takes."""
    path, bank_path = paths
    refit = "export the program from the bank's model (export MODEL --out PROGRAM --bank-out)"
    ours, theirs = metadata.get("configuration"), bank_metadata.get("configuration")
    if not isinstance(ours, dict) or not isinstance(theirs, dict):
        raise ValueError(f"{path} or {bank_path}: its metadata lacks 'configuration'; {refit}")
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key) != theirs.get(key):
            raise ValueError(
                f"{bank_path} is a bank of another configuration than {path}: {key} "
                f"{theirs.get(key)!r} (bank) vs {ours.get(key)!r} (program); {refit}"
            )
    expected = [
        f"{name} {aval.dtype.name}{list(aval.shape)}"
        for (name, *_), aval in zip(metadata["bank_inputs"], program.in_avals[1:], strict=False)
    ]
    found = [f"{name} {array.dtype.name}{list(array.shape)}" for name, array in arrays.items()]
    if found != expected or len(expected) != len(program.in_avals) - 1:
        raise ValueError(
            f"{bank_path} does not fit {path}: the bank holds {', '.join(found)}; the program "
            f"takes {', '.join(expected)} (a bank grown past its bucket needs its program "
            f"again); {refit}"
        )
    rows, num_valid = arrays.get("memory_bank"), arrays.get("num_valid")
    if rows is not None and num_valid is not None and not 1 <= int(num_valid) <= len(rows):
        raise ValueError(f"{bank_path}: num_valid {int(num_valid)} is not in [1, {len(rows)}]")


def _deserialize(serialized: memoryview, path: Path) -> Any:
    """The ``jax.export`` program of ``serialized``, shared by every load of the same bytes in
    this process (the last ``_PROGRAM_CACHE_SIZE``), so that a program loaded with many banks
    compiles once per batch size."""
    digest = hashlib.sha256(serialized).hexdigest()
    if digest not in _PROGRAMS:
        try:
            program = jax.export.deserialize(bytearray(serialized))
        except Exception as error:  # flatbuffer and MLIR parsers raise many types
            raise ValueError(
                f"{path} is a damaged patchcore-jax export file (its program cannot be read: "
                f"{type(error).__name__})"
            ) from None
        if len(_PROGRAMS) >= _PROGRAM_CACHE_SIZE:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        _PROGRAMS[digest] = program
    return _PROGRAMS[digest]


def load(
    path: str | os.PathLike,
    bank: str | os.PathLike | None = None,
    compile_cache: bool | str | os.PathLike = True,
) -> ExportedModel:
    """Reads an export file (and a bank file), verifying checksums and format versions before
    deserialising, and, with ``bank``, that the bank is one of the program's configuration.

    Args:
      path: a program file written by ``export --out``.
      bank: a bank file written by ``export --bank-out``; required for a program exported with
        ``--bank-out``, refused for one with its bank inside.
      compile_cache: the folder of JAX's persistent compilation cache, turned on for this
        process unless one is already set (``jax_compilation_cache_dir``): True is
        ``$PATCHCORE_COMPILE_CACHE`` (``off``: none), else ``~/.cache/patchcore-jax/xla``;
        False turns nothing on. Programs that compile in >= 1 s (JAX's threshold: each batch
        size's compilation, typically 10-30 s) are kept, so a new process skips them.
    Raises:
      FileNotFoundError: no file at ``path`` or ``bank``.
      ValueError (one line naming the file, both for a mismatch): not an export or bank file,
        damaged (a checksum, its length or its header), another format version, metadata
        without a usable calibration, a bank of another configuration, shape or bucket.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}")
    remedy = "export the model again with this version"
    metadata, serialized = read_checksummed(path, KIND, FORMAT_VERSION, remedy)
    takes_bank = bool(metadata.get("bank_inputs"))
    if takes_bank and bank is None:
        raise ValueError(
            f"{path} takes its memory bank as an input (exported with --bank-out): load it "
            "with bank=BANK, a bank file of its configuration"
        )
    if bank is not None and not takes_bank:
        raise ValueError(
            f"{path} has its memory bank inside (exported without --bank-out): load it "
            f"without {bank}, or export the program with --bank-out"
        )
    bank_file = None
    if bank is not None:
        bank_metadata, arrays = read_bank(bank)
        bank_file = (bank_metadata, arrays, Path(bank))
    program = _deserialize(serialized, path)
    folder = default_compile_cache() if compile_cache is True else compile_cache
    if folder not in (False, "off") and jax.config.jax_compilation_cache_dir is None:
        enable_compile_cache(folder, every_program=False)
    if bank_file is not None:
        _check_bank(program, metadata, bank_file[0], bank_file[1], (path, bank_file[2]))
    return ExportedModel(metadata, program, path, bank_file)
