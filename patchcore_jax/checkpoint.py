"""orbax checkpoints of fitted models, single or ensemble, validated on restore.

A single model's checkpoint holds the memory bank (an orbax array, so it restores sharded) and a
JSON record of everything needed to reproduce the scores: the full config, the backbone's name and
weights hash, the preprocessing, the calibration, the package version and a sha256 of the bank's
bytes. The record carries a sha256 of itself (``record_sha256``, as does an ensemble's record), so
an edited or damaged record is refused on load; records written before it existed load as before.

The versioned folder that holds them, and how a save replaces a model atomically, are
``checkpoint_folder``'s.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from patchcore_jax import checkpoint_folder, sharding
from patchcore_jax.backbones import (
    Backbone,
    probed_statistics,
    recorded_backbone,
    restore_probe,
)
from patchcore_jax.calibration import Calibration
from patchcore_jax.checkpoint_folder import RECORD, STATE
from patchcore_jax.config import PatchCoreConfig
from patchcore_jax.ensemble import NORMALISATION, Ensemble
from patchcore_jax.errors import CheckpointError
from patchcore_jax.files import atomic_write_text
from patchcore_jax.model import PatchCore
from patchcore_jax.version import package_version

if TYPE_CHECKING:
    from jax.sharding import Mesh

FORMAT = "patchcore-jax/1"
ENSEMBLE_FORMAT = "patchcore-jax-ensemble/1"
ENSEMBLE_RECORD = "ensemble.json"
_STATISTICS = "batch_norm_statistics"  # the probed BatchNorm statistics, in the state


def _array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def _record_digest(record: dict[str, Any]) -> str:
    """sha256 of a JSON record without its ``record_sha256`` (key order and tuple/list blind)."""
    body = {key: value for key, value in record.items() if key != "record_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _signed(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "record_sha256": _record_digest(record)}


def _check_digest(path: Path, record: dict[str, Any]) -> None:
    """CheckpointError naming ``path`` if the record does not match its ``record_sha256``
    (records written before the digest existed have none and are not checked)."""
    if "record_sha256" in record and record["record_sha256"] != _record_digest(record):
        raise CheckpointError(
            f"{path} does not match its recorded sha256: the checkpoint's record was edited or "
            "is damaged (restore the original or refit)"
        )


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save(model: PatchCore | Ensemble, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Writes ``model`` (fitted; a PatchCore or an Ensemble) to the folder ``path``; returns its
    absolute path.

    The new version is complete before ``CURRENT`` is switched to it in one ``os.replace``
    (``checkpoint_folder.write_version``), so a crash or kill at any point leaves the old model
    or the new one loadable, never neither. Raises CheckpointError (one line, naming the path)
    if it cannot be written.
    """
    if isinstance(model, Ensemble):
        return save_ensemble(model, path, overwrite=overwrite)
    if model.memory_bank is None:
        raise CheckpointError("cannot save an unfitted PatchCore model: call fit() first")
    record = _signed(_model_record(model))
    state = {"memory_bank": model.memory_bank}
    statistics = probed_statistics(model.backbone)
    if statistics is not None:
        state[_STATISTICS] = statistics
    ocp, checkpointer = _checkpointer()

    def write(staging: Path) -> None:
        # With several processes all of them write through orbax (it coordinates them).
        try:
            with _orbax_quietly():
                checkpointer.save(
                    staging,
                    ocp.args.Composite(
                        **{
                            STATE: ocp.args.StandardSave(state),
                            RECORD: ocp.args.JsonSave(record),
                        }
                    ),
                )
        except Exception as error:  # orbax/tensorstore: disk full, permissions, ...
            raise CheckpointError(
                f"cannot write the checkpoint {staging.parent}: {_first_line(error)}"
            ) from error

    return checkpoint_folder.write_version(path, write, overwrite=overwrite)


def _model_record(model: PatchCore) -> dict[str, Any]:
    """The JSON record of a fitted single model: everything needed to reproduce its scores."""
    memory_bank = np.asarray(model.memory_bank)
    statistics = probed_statistics(model.backbone)
    return {
        "format": FORMAT,
        "package_version": package_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": model.config.to_dict(),
        "backbone": {
            "name": model.backbone.name,
            "layers": list(model.backbone.layers),
            "weights_sha256": model.backbone.weights_sha256,
            "batch_norm_probe": model.backbone.probed_image_shape is not None
            and model.backbone.has_batch_stats,
            # The probe's statistics are in the state (absent: probed again at load).
            "probed_statistics": None
            if statistics is None
            else {
                "image_shape": list(model.backbone.probed_image_shape),
                "size": int(statistics.size),
                "sha256": _array_digest(statistics),
            },
        },
        "preprocessing": {
            "resize_mode": model.config.resize_mode,
            "resize": model.config.resize,
            "image_shape": list(model.config.image_shape),
        },
        "memory_bank": {
            "shape": list(memory_bank.shape),
            "dtype": "float32",
            "sha256": _array_digest(memory_bank),
        },
        # Thresholds and the calibration score distributions (None: not calibrated).
        "calibration": None if model.calibration is None else model.calibration.to_dict(),
    }


def save_ensemble(ensemble: Ensemble, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Writes a fitted ensemble as one new version: every member a complete single-model
    checkpoint (``save``) in ``member0/``, ``member1/``..., and the record ``ensemble.json``
    (format, member folders, normalisation). One process only. Returns the absolute path."""
    if jax.process_count() > 1:
        raise NotImplementedError("saving an ensemble runs in one process only")
    if any(member.memory_bank is None for member in ensemble.members):
        raise CheckpointError("cannot save an unfitted ensemble: call fit() first")
    names = [f"member{index}" for index in range(len(ensemble.members))]
    record = _signed({"format": ENSEMBLE_FORMAT, "members": names, "normalisation": NORMALISATION})

    def write(staging: Path) -> None:
        staging.mkdir()
        for member, name in zip(ensemble.members, names, strict=True):
            save(member, staging / name)
        atomic_write_text(staging / ENSEMBLE_RECORD, json.dumps(record, indent=2) + "\n")

    return checkpoint_folder.write_version(path, write, overwrite=overwrite)


class _DropOrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


@contextlib.contextmanager
def _orbax_quietly() -> Iterator[None]:
    """Runs an orbax call without its error logs, which print one traceback per writer thread
    (about 115 lines for a full disk) while the caller reports one line (the orbax error chained
    to it). On failure, waits for orbax's writer threads, which outlive the exception, and keeps
    dropping orbax's error logs afterwards: a straggler may still log the same failure."""
    before = set(threading.enumerate())
    logger = logging.getLogger("absl")
    drop = _DropOrbaxErrors()
    logger.addFilter(drop)
    failed = False
    unraisable_hook, thread_hook = sys.unraisablehook, threading.excepthook
    # A failed restore leaves orbax coroutines and callbacks that report their own tracebacks
    # when collected ("Exception ignored in <coroutine ...>", "Event loop is closed").
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None
    try:
        yield
    except BaseException:
        failed = True
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:  # threads may start threads: until none is left
            running = [t for t in set(threading.enumerate()) - before if t.is_alive()]
            if not running:
                break
            for thread in running:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        gc.collect()
        raise
    finally:
        sys.unraisablehook, threading.excepthook = unraisable_hook, thread_hook
        if not failed:
            logger.removeFilter(drop)


def _first_line(error: BaseException) -> str:
    """``Type: first line`` of an error, without TensorStore's spec dump (``<bound method``)."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    line = re.split(r"\s*See full TensorStore details|\s*<bound method", line)[0][:300]
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON record of a single-model checkpoint (config, backbone, preprocessing, bank
    digest)."""
    target = Path(path).absolute()
    version = checkpoint_folder.resolve(target)
    if _read_ensemble_record(target, version) is not None:
        raise CheckpointError(f"{target} holds an ensemble: each member folder has its record")
    return _read_record(target, version)


def _read_record(target: Path, folder: Path) -> dict[str, Any]:
    """The record of the orbax checkpoint ``folder`` (the model at ``target``), validated."""
    ocp, checkpointer = _checkpointer()
    try:
        restore_args = ocp.args.Composite(**{RECORD: ocp.args.JsonRestore()})
        with _orbax_quietly():
            record = checkpointer.restore(folder, restore_args)[RECORD]
    except Exception as error:  # orbax raises several types for missing or broken items
        raise CheckpointError(
            f"{target} is not a complete patchcore-jax checkpoint (its record cannot be read: "
            f"{_first_line(error)})"
        ) from error
    if not isinstance(record, dict):
        raise CheckpointError(f"{target}: its record is not a JSON object")
    if record.get("format") != FORMAT:
        raise CheckpointError(
            f"{target} has format {record.get('format')!r}; this version reads {FORMAT!r}"
        )
    _check_digest(folder / RECORD / "metadata", record)
    return record


def _read_ensemble_record(target: Path, version: Path) -> dict[str, Any] | None:
    """The ensemble record of a resolved checkpoint version, or None for a single model."""
    path = version / ENSEMBLE_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{target}: the ensemble record cannot be read: {error}") from error
    members = record.get("members") if isinstance(record, dict) else None
    if record.get("format") != ENSEMBLE_FORMAT or not isinstance(members, list) or not members:
        raise CheckpointError(f"{target}: not a {ENSEMBLE_FORMAT} ensemble record")
    _check_digest(path, record)
    return record


def load(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    backbone: Backbone | None = None,
    backbones: Sequence[Backbone | None] | None = None,
    expected_config: PatchCoreConfig | None = None,
) -> PatchCore | Ensemble:
    """Restores the fitted model at ``path``, a PatchCore or an Ensemble, whichever it holds
    (``patchcore_jax.load``); both have the same interface.

    Args:
      path: checkpoint folder written by ``save``.
      mesh: devices to run on (default: all).
      backbone: a single model's backbone; default: ``recorded_backbone`` (``load_backbone``
        of the recorded name and layers, random-init weights rebuilt). Its weights hash must
        equal the recorded one (else the scores would silently change).
      backbones: an ensemble's, per member (None entries: loaded by name).
      expected_config: a single model's recorded config must equal it.
    Raises:
      CheckpointError: naming what is missing, damaged or mismatched.
    """
    target = Path(path).absolute()
    version = checkpoint_folder.resolve(target)  # one version for every read
    record = _read_ensemble_record(target, version)
    if record is None:
        if backbones is not None:
            raise ValueError(f"{target} holds a single model: pass backbone=, not backbones=")
        return _restore_model(target, version, backbone, mesh, expected_config)
    if backbone is not None or expected_config is not None:
        raise ValueError(f"{target} holds an ensemble: pass backbones=, not backbone=")
    return _restore_ensemble(target, version, record, backbones, mesh)


def _restore_ensemble(
    target: Path,
    version: Path,
    record: dict[str, Any],
    backbones: Sequence[Backbone | None] | None,
    mesh: Mesh | None,
) -> Ensemble:
    """The members of an ensemble version, each checked as a single model."""
    members = record["members"]
    backbones = [None] * len(members) if backbones is None else backbones
    if len(backbones) != len(members):
        raise ValueError(f"{target} has {len(members)} members but {len(backbones)} backbones")
    mesh = sharding.make_mesh() if mesh is None else mesh
    return Ensemble(
        [
            _load_member(version / name, member_backbone, mesh)
            for name, member_backbone in zip(members, backbones, strict=True)
        ]
    )


def _load_member(path: Path, backbone: Backbone | None, mesh: Mesh) -> PatchCore:
    """One member of an ensemble version: a complete single-model checkpoint."""
    target = path.absolute()
    return _restore_model(target, checkpoint_folder.resolve(target), backbone, mesh, None)


def _restore_model(
    target: Path,
    version: Path,
    backbone: Backbone | None,
    mesh: Mesh | None,
    expected_config: PatchCoreConfig | None,
) -> PatchCore:
    """The single model of a checkpoint version, checked whole and matching its backbone."""
    record = _read_record(target, version)
    config = _recorded_config(target, record, expected_config)
    if backbone is None:
        weights = record["backbone"]["weights_sha256"]
        backbone = recorded_backbone(config.backbone, config.layers, weights)
    _check_backbone(target, record["backbone"], backbone)
    # Restored replicated onto this run's devices, whatever topology wrote it.
    mesh = sharding.make_mesh() if mesh is None else mesh
    probed = record["backbone"].get("probed_statistics")
    memory_bank, statistics = _restore_state(target, version, record, mesh)
    if statistics is not None and backbone.probed_image_shape is None:  # else the caller's
        try:
            backbone = restore_probe(backbone, tuple(probed["image_shape"]), statistics)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{target}: {error}") from error
    model = PatchCore(config, backbone=backbone, mesh=mesh, memory_bank=memory_bank)
    if record.get("calibration") is not None:
        try:
            model.calibration = Calibration.from_dict(record["calibration"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{target}: invalid recorded calibration: {error}") from error
    return model


def _recorded_config(
    target: Path, record: dict[str, Any], expected_config: PatchCoreConfig | None
) -> PatchCoreConfig:
    """The record's config, checked against ``expected_config`` and the recorded bank shape."""
    try:
        # Checkpoints from before the probe existed were fitted with pristine statistics.
        # ... and without calibration.
        config = PatchCoreConfig.from_dict(
            {"batch_norm_probe": False, "calibration": "none", **record["config"]}
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{target}: invalid recorded config: {error}") from error
    if expected_config is not None and expected_config != config:
        diffs = expected_config.differences(config)
        raise CheckpointError(f"{target}: config differs from the expected one: {diffs}")
    shape = tuple(record.get("memory_bank", {}).get("shape", ()))
    if len(shape) != 2 or shape[1] != config.target_embed_dimension:
        raise CheckpointError(
            f"{target}: memory bank shape {shape} does not match the recorded "
            f"target_embed_dimension {config.target_embed_dimension}"
        )
    try:
        config.check_bank_size(shape[0])
    except ValueError as error:
        raise CheckpointError(f"{target}: {error}") from error
    return config


def _check_backbone(target: Path, recorded: dict[str, Any], backbone: Backbone) -> None:
    """CheckpointError unless ``backbone`` is the recorded one (name, layers, weights)."""
    if backbone.name != recorded["name"] or tuple(backbone.layers) != tuple(recorded["layers"]):
        raise CheckpointError(
            f"{target}: fitted with backbone {recorded['name']} {recorded['layers']}, "
            f"not {backbone.name} {list(backbone.layers)}"
        )
    if backbone.weights_sha256 != recorded["weights_sha256"]:
        raise CheckpointError(
            f"{target}: fitted with {recorded['name']} weights sha256 "
            f"{recorded['weights_sha256'][:16]}..., but the loaded weights have "
            f"{backbone.weights_sha256[:16]}...; scores would not be comparable. Load the "
            "original weights or refit."
        )


def _restore_state(
    target: Path, version: Path, record: dict[str, Any], mesh: Mesh
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(memory bank [M, D] float32, probed BatchNorm statistics [S] float32 or None)`` of a
    checkpoint version, each checked against its recorded sha256."""
    ocp, checkpointer = _checkpointer()
    bank_record = record.get("memory_bank", {})
    probed = record["backbone"].get("probed_statistics")
    shape = tuple(bank_record["shape"])
    replicated = sharding.replicated(mesh)
    abstract = {"memory_bank": jax.ShapeDtypeStruct(shape, np.float32, sharding=replicated)}
    if probed is not None:
        size = (int(probed["size"]),)
        abstract[_STATISTICS] = jax.ShapeDtypeStruct(size, np.float32, sharding=replicated)
    try:
        with _orbax_quietly():
            restored = checkpointer.restore(
                version,
                ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract)}),
            )[STATE]
            memory_bank = np.asarray(restored["memory_bank"])
            statistics = None
            if probed is not None:
                statistics = np.asarray(restored[_STATISTICS])
    except Exception as error:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(
            f"{target}: the memory bank cannot be read; the checkpoint is damaged or partial "
            f"({_first_line(error)})"
        ) from error
    if memory_bank.shape != shape or _array_digest(memory_bank) != bank_record.get("sha256"):
        raise CheckpointError(
            f"{target}: the memory bank's contents do not match its recorded sha256; "
            "the checkpoint is damaged"
        )
    if statistics is not None and _array_digest(statistics) != probed.get("sha256"):
        raise CheckpointError(
            f"{target}: the probed BatchNorm statistics do not match their recorded sha256; "
            "the checkpoint is damaged"
        )
    return memory_bank, statistics
