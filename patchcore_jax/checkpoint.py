"""orbax checkpoints of fitted models, single or ensemble, validated on restore.

A single model's checkpoint holds the memory bank (an orbax array, so it restores sharded) and a
JSON record of everything needed to reproduce the scores: the full config, the backbone's name and
weights hash, the preprocessing, the calibration, the package version and a sha256 of the bank's
bytes. The record carries a sha256 of itself (``record_sha256``, as does an ensemble's record), so
an edited or damaged record is refused on load; records written before it existed load as before.

Layout: the checkpoint folder holds versions and a pointer::

    MODEL/CURRENT                  one line: the name of the version folder that is the model
    MODEL/v000002/                 a single model: an orbax checkpoint, state/ (the bank) and
                                   record/ (the JSON record)
    MODEL/v000002/ensemble.json    or an ensemble: {"format", "members": ["member0", ...],
    MODEL/v000002/member0/         "normalisation"} and one complete single-model checkpoint
                                   folder per member

Saving locks the folder (``files.exclusive_lock`` on the folder itself: a second writer fails at
once), writes the next version in full (``write_version``: orbax commits it), then replaces
``CURRENT`` with one ``os.replace``, then removes the versions older than the new one. A kill at
any moment leaves ``CURRENT`` naming a complete version, old or new (a single model or an
ensemble, never a mix), so loading always finds a model; the next save removes what a killed one
left. Saving only ever deletes entries it wrote (versions, its staging folders and pointer
temporaries); other files in the folder are left alone. Folders written before the pointer
existed (an orbax checkpoint at MODEL itself) still load, and the next save replaces them in the
same way.

The protocol is written here rather than with orbax's ``CheckpointManager``: that one finds the
latest version by listing its step folders (there is no ``CURRENT`` to switch atomically), every
step must be an orbax checkpoint (an ensemble's version is a folder of member checkpoints), and it
does not read the folders written before the pointer existed.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from patchcore_jax import interrupt, sharding
from patchcore_jax.backbones import Backbone, recorded_backbone
from patchcore_jax.calibration import Calibration
from patchcore_jax.config import PatchCoreConfig
from patchcore_jax.ensemble import NORMALISATION, Ensemble
from patchcore_jax.files import atomic_write_text, exclusive_lock, nearest_existing, unwritable
from patchcore_jax.model import PatchCore
from patchcore_jax.version import package_version

if TYPE_CHECKING:
    from jax.sharding import Mesh

FORMAT = "patchcore-jax/1"
ENSEMBLE_FORMAT = "patchcore-jax-ensemble/1"
ENSEMBLE_RECORD = "ensemble.json"
_STATE = "state"
_RECORD = "record"


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not match what the caller loads it with."""


def _bank_digest(memory_bank: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(memory_bank, dtype=np.float32).tobytes()).hexdigest()


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


def check_destination(path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """The absolute ``path`` if a checkpoint can be saved there; CheckpointError otherwise.

    Cheap, and called before any work (``fit``) so a bad ``--out`` fails in a second, not after
    feature extraction: ``path`` must be a new folder (its nearest existing ancestor a writable
    folder), an empty folder, or a writable patchcore-jax checkpoint (replaced if ``overwrite``)
    whose ``CURRENT`` is readable, and no other run may be saving into it.
    """
    target = Path(path).absolute()
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise CheckpointError(f"{target} is a file, not a checkpoint folder")
        if _layout(target) is None and not all(map(_is_leftover, target.iterdir())):
            raise CheckpointError(
                f"{target} exists and is not a patchcore-jax checkpoint; refusing to write into it"
            )
        if _layout(target) is not None and not overwrite:
            raise CheckpointError(f"{target} exists; pass overwrite=True to replace it")
        problem = unwritable(target)
        if problem:
            raise CheckpointError(f"cannot write to {target}: {problem}")
        _current_version(target)  # a damaged pointer is reported now
        if jax.process_index() == 0:  # the one process that locks it (``write_version``)
            with _locked(target):  # another run saving into it is reported now
                pass
        return target
    ancestor = nearest_existing(target.parent)
    if not ancestor.is_dir():
        raise CheckpointError(f"cannot create {target}: {ancestor} is a file, not a folder")
    problem = unwritable(ancestor)
    if problem:
        raise CheckpointError(f"cannot create {target}: {ancestor} is not writable ({problem})")
    return target


def enclosing_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint folder that ``path`` is or lies inside (links resolved), or None.

    A folder counts when it holds ``CURRENT``, a version folder (``vNNNNNN``, also the
    leftover of an unfinished first save) or a checkpoint written before the pointer existed:
    other tools must never write files there (``CURRENT`` replaced by a foreign file makes the
    model unloadable).
    """
    for folder in [Path(path).resolve(), *Path(path).resolve().parents]:
        try:
            if folder.is_dir() and (
                _layout(folder) is not None
                or any(_VERSION.fullmatch(e.name) and e.is_dir() for e in folder.iterdir())
            ):
                return folder
        except OSError:  # an unreadable ancestor is no checkpoint we could have written
            continue
    return None


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """The checkpoint folder ``target`` locked for one writer (CheckpointError if it is not)."""
    try:
        with exclusive_lock(target, f"checkpoint folder {target}"):
            yield
    except FileExistsError as error:
        raise CheckpointError(str(error)) from None


def _reached(point: str) -> None:
    """Called at each step of ``write_version`` (a no-op); tests replace it to kill the process
    there."""


def save(model: PatchCore | Ensemble, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Writes ``model`` (fitted; a PatchCore or an Ensemble) to the folder ``path``; returns its
    absolute path.

    The new version is complete before ``CURRENT`` is switched to it in one ``os.replace``
    (``write_version``), so a crash or kill at any point leaves the old model or the new one
    loadable, never neither. Raises CheckpointError (one line, naming the path) if it cannot be
    written.
    """
    if isinstance(model, Ensemble):
        return save_ensemble(model, path, overwrite=overwrite)
    if model.memory_bank is None:
        raise CheckpointError("cannot save an unfitted PatchCore model: call fit() first")
    record = _signed(_model_record(model))
    ocp, checkpointer = _checkpointer()

    def write(staging: Path) -> None:
        # With several processes all of them write through orbax (it coordinates them).
        try:
            with _orbax_quietly():
                checkpointer.save(
                    staging,
                    ocp.args.Composite(
                        **{
                            _STATE: ocp.args.StandardSave({"memory_bank": model.memory_bank}),
                            _RECORD: ocp.args.JsonSave(record),
                        }
                    ),
                )
        except Exception as error:  # orbax/tensorstore: disk full, permissions, ...
            raise CheckpointError(
                f"cannot write the checkpoint {staging.parent}: {_first_line(error)}"
            ) from error

    return write_version(path, write, overwrite=overwrite)


def _model_record(model: PatchCore) -> dict[str, Any]:
    """The JSON record of a fitted single model: everything needed to reproduce its scores."""
    memory_bank = np.asarray(model.memory_bank)
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
        },
        "preprocessing": {
            "resize_mode": model.config.resize_mode,
            "resize": model.config.resize,
            "image_shape": list(model.config.image_shape),
        },
        "memory_bank": {
            "shape": list(memory_bank.shape),
            "dtype": "float32",
            "sha256": _bank_digest(memory_bank),
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

    return write_version(path, write, overwrite=overwrite)


def write_version(
    path: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = True
) -> Path:
    """Writes a new version of the checkpoint folder ``path`` and makes it current; returns the
    absolute path.

    The versioned-folder protocol of every checkpoint (module docstring): ``write(staging)``
    fills the hidden folder ``.vNNNNNN.saving`` (it does not exist yet), which is then renamed
    to ``vNNNNNN``; ``CURRENT`` is switched to it in one ``os.replace``, and the versions older
    than it are removed. The folder stays locked from before the first write to after the last
    removal (a second writer fails at once: CheckpointError), and what killed saves left is
    removed first. If ``write`` raises (or Ctrl-C was pressed meanwhile: ``interrupt.check``),
    its staging folder is removed and the previous model stays current. With several processes
    every process calls ``write`` (for orbax, which coordinates them) and process 0 alone
    creates, locks, switches and cleans.
    """
    target = check_destination(path, overwrite=overwrite)
    is_primary = jax.process_index() == 0
    created = not target.exists()
    if is_primary:
        target.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(target) if is_primary else contextlib.nullcontext():
            _write_locked(target, write, is_primary)
    except BaseException:
        if is_primary and created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # nothing of ours or anyone's in it
        raise
    _barrier("patchcore_jax.checkpoint.save:done")
    return target


def _write_locked(target: Path, write: Callable[[Path], None], is_primary: bool) -> None:
    """``write_version``'s steps once the folder ``target`` exists and is locked."""
    if is_primary:
        _remove_leftovers(target)
    _barrier("patchcore_jax.checkpoint.save:prepared")
    current = _current_version(target)
    name = f"v{(int(current[1:]) if current else 0) + 1:06d}"
    staging = target / f".{name}.saving"
    _reached("writing")
    try:
        write(staging)
        interrupt.check()  # Ctrl-C while writing: the previous model stays current
    except BaseException:
        if is_primary:
            shutil.rmtree(staging, ignore_errors=True)  # only this save's: the folder is locked
        raise
    _reached("written")
    if is_primary:
        os.rename(staging, target / name)
        _fsync_dir(target)
        _reached("renamed")
        _write_pointer(target, name)
        _reached("switched")
        _remove_leftovers(target, older_than=name)
        _reached("cleaned")


_POINTER = "CURRENT"
_VERSION = re.compile(r"v\d{6}")
_LEGACY = (_STATE, _RECORD, "_CHECKPOINT_METADATA", "commit_success.txt")


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


def _layout(folder: Path) -> str | None:
    """``"versioned"`` (CURRENT + versions), ``"legacy"`` (orbax checkpoint at the folder) or
    None (not a patchcore-jax checkpoint)."""
    if (folder / _POINTER).is_file():
        return "versioned"
    if (folder / _RECORD).is_dir():
        return "legacy"
    return None


def _current_version(folder: Path) -> str | None:
    """The version ``CURRENT`` names, or None if there is no pointer. CheckpointError naming
    the file if it names none (empty, binary garbage, unreadable)."""
    pointer = folder / _POINTER
    try:
        content = pointer.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise CheckpointError(f"{pointer} cannot be read: {error.strerror}") from None
    name = content.decode("utf-8", errors="replace").strip()
    if not _VERSION.fullmatch(name):
        raise CheckpointError(
            f"{pointer} is damaged: expected the name of a version folder (v000001 ...), found "
            f"{content[:40]!r}; restore it, or remove the folder"
        )
    return name


def _write_pointer(folder: Path, name: str) -> None:
    """Replaces ``CURRENT`` atomically (and durably: fsync of the file and the folder)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{_POINTER}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(name + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, folder / _POINTER)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _is_leftover(entry: Path) -> bool:
    """Whether ``entry`` is something an interrupted save wrote (a version or staging folder,
    a pointer temporary): a folder holding only these is an unfinished first save."""
    name = entry.name
    return bool(
        _VERSION.fullmatch(name)
        or (name.startswith(".v") and ".saving" in name)
        or (name.startswith(f".{_POINTER}.") and name.endswith(".tmp"))
    )


def _remove_leftovers(folder: Path, older_than: str | None = None) -> None:
    """Deletes what earlier saves wrote and no longer need: every version but the current one,
    staging folders, pointer temporaries, and a legacy checkpoint once a pointer replaced it;
    with ``older_than`` (the version a save just made current) only the versions older than it
    and a legacy checkpoint, so a writer never deletes another's newer version. Nothing else is
    touched."""
    current = _current_version(folder)
    for entry in folder.iterdir():
        if older_than is not None:
            stale = _VERSION.fullmatch(entry.name) is not None and entry.name < older_than
        else:
            stale = _is_leftover(entry) and entry.name != current
        ours = stale or (current is not None and entry.name in _LEGACY)
        if not ours:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _resolve(target: Path) -> Path:
    """The orbax checkpoint folder holding the model saved at ``target``."""
    if not target.is_dir():
        leftovers = sorted(target.parent.glob(f".{target.name}.previous"))
        hint = f"; an interrupted save left {leftovers[0]}" if leftovers else ""
        raise CheckpointError(f"no checkpoint at {target}{hint}")
    layout = _layout(target)
    if layout == "legacy":
        return target
    if layout is None:
        unfinished = any(map(_is_leftover, target.iterdir()))
        hint = "; a save was interrupted before it finished: fit again" if unfinished else ""
        raise CheckpointError(f"no checkpoint at {target} (no {_POINTER} file){hint}")
    version = target / _current_version(target)
    if not version.is_dir():
        raise CheckpointError(
            f"{target} is damaged: {_POINTER} names {version.name}, which does not exist"
        )
    return version


def _barrier(name: str) -> None:
    """Waits for every process (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON record of a single-model checkpoint (config, backbone, preprocessing, bank
    digest)."""
    target = Path(path).absolute()
    version = _resolve(target)
    if _read_ensemble_record(target, version) is not None:
        raise CheckpointError(f"{target} holds an ensemble: each member folder has its record")
    return _read_record(target, version)


def _read_record(target: Path, folder: Path) -> dict[str, Any]:
    """The record of the orbax checkpoint ``folder`` (the model at ``target``), validated."""
    ocp, checkpointer = _checkpointer()
    try:
        restore_args = ocp.args.Composite(**{_RECORD: ocp.args.JsonRestore()})
        with _orbax_quietly():
            record = checkpointer.restore(folder, restore_args)[_RECORD]
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
    _check_digest(folder / _RECORD / "metadata", record)
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
    version = _resolve(target)  # one version for every read
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
    return _restore_model(target, _resolve(target), backbone, mesh, None)


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
    memory_bank = _restore_bank(target, version, record.get("memory_bank", {}), mesh)
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


def _restore_bank(
    target: Path, version: Path, bank_record: dict[str, Any], mesh: Mesh
) -> np.ndarray:
    """The memory bank [M, D] float32 of a checkpoint version, checked against its sha256."""
    ocp, checkpointer = _checkpointer()
    shape = tuple(bank_record["shape"])
    abstract = {
        "memory_bank": jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding.replicated(mesh))
    }
    try:
        with _orbax_quietly():
            restored = checkpointer.restore(
                version,
                ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)}),
            )
            memory_bank = np.asarray(restored[_STATE]["memory_bank"])
    except Exception as error:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(
            f"{target}: the memory bank cannot be read; the checkpoint is damaged or partial "
            f"({_first_line(error)})"
        ) from error
    if memory_bank.shape != shape or _bank_digest(memory_bank) != bank_record.get("sha256"):
        raise CheckpointError(
            f"{target}: the memory bank's contents do not match its recorded sha256; "
            "the checkpoint is damaged"
        )
    return memory_bank
