"""orbax checkpoints of fitted PatchCore models, validated on restore.

A checkpoint is a folder holding the memory bank (an orbax array, so it restores sharded) and a
JSON record of everything needed to reproduce the scores: the full config, the backbone's name and
weights hash, the preprocessing, the package version and a sha256 of the bank's bytes.

Saving never harms an existing good model: the new checkpoint is written beside it and swapped in
with renames only once orbax has committed it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from patchcore_jax import sharding
from patchcore_jax.config import PatchCoreConfig
from patchcore_jax.version import package_version

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from patchcore_jax.backbones import Backbone
    from patchcore_jax.model import PatchCore

FORMAT = "patchcore-jax/1"
_STATE = "state"
_RECORD = "record"


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not match what the caller loads it with."""


def _bank_digest(memory_bank: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(memory_bank, dtype=np.float32).tobytes()).hexdigest()


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save(model: PatchCore, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Writes ``model`` (fitted) to the folder ``path``; returns its absolute path.

    The bank is written first to a sibling temporary folder; an existing checkpoint at ``path``
    is replaced only after the new one is complete, so a crash leaves the old one intact.
    """
    if model.memory_bank is None:
        raise CheckpointError("cannot save an unfitted PatchCore model: call fit() first")
    target = Path(path).absolute()
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target} exists; pass overwrite=True to replace it")
    if target.exists() and not (target / _RECORD).exists():
        raise CheckpointError(
            f"{target} exists and is not a patchcore-jax checkpoint; refusing to replace it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    memory_bank = np.asarray(model.memory_bank)
    record = {
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
    ocp, checkpointer = _checkpointer()
    # With several processes all of them write through orbax (it coordinates them), and
    # process 0 alone swaps the folders; the barriers keep the others from running ahead.
    is_primary = jax.process_index() == 0
    staging = target.with_name(f".{target.name}.saving")
    if is_primary:
        shutil.rmtree(staging, ignore_errors=True)
    _barrier("patchcore_jax.checkpoint.save:staging")
    try:
        checkpointer.save(
            staging,
            ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardSave({"memory_bank": model.memory_bank}),
                    _RECORD: ocp.args.JsonSave(record),
                }
            ),
        )
    except BaseException:
        if is_primary:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if is_primary:
        backup = target.with_name(f".{target.name}.previous")
        shutil.rmtree(backup, ignore_errors=True)
        if target.exists():
            os.rename(target, backup)
        os.rename(staging, target)
        shutil.rmtree(backup, ignore_errors=True)
    _barrier("patchcore_jax.checkpoint.save:done")
    return target


def _barrier(name: str) -> None:
    """Waits for every process (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON record of a checkpoint (config, backbone, preprocessing, bank digest)."""
    target = Path(path).absolute()
    if not target.is_dir():
        leftovers = sorted(target.parent.glob(f".{target.name}.previous"))
        hint = f"; an interrupted save left {leftovers[0]}" if leftovers else ""
        raise CheckpointError(f"no checkpoint at {target}{hint}")
    ocp, checkpointer = _checkpointer()
    try:
        restore_args = ocp.args.Composite(**{_RECORD: ocp.args.JsonRestore()})
        record = checkpointer.restore(target, restore_args)[_RECORD]
    except Exception as error:  # orbax raises several types for missing or broken items
        raise CheckpointError(
            f"{target} is not a complete patchcore-jax checkpoint (its record cannot be read: "
            f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''})"
        ) from error
    if not isinstance(record, dict):
        raise CheckpointError(f"{target}: its record is not a JSON object")
    if record.get("format") != FORMAT:
        raise CheckpointError(
            f"{target} has format {record.get('format')!r}; this version reads {FORMAT!r}"
        )
    return record


def load(
    path: str | os.PathLike,
    *,
    backbone: Backbone | None = None,
    mesh: Mesh | None = None,
    expected_config: PatchCoreConfig | None = None,
) -> PatchCore:
    """Restores a fitted model, checking that it is whole and matches its backbone.

    Args:
      path: checkpoint folder written by ``save``.
      backbone: the backbone to use; default: ``load_backbone`` of the recorded name and layers.
        Its weights hash must equal the recorded one (else the scores would silently change).
      mesh: devices to run on (default: all).
      expected_config: if given, the recorded config must equal it.
    Raises:
      CheckpointError: naming what is missing, damaged or mismatched.
    """
    from patchcore_jax.backbones import load_backbone
    from patchcore_jax.model import PatchCore

    target = Path(path).absolute()
    record = read_record(target)
    try:
        # Checkpoints from before the probe existed were fitted with pristine statistics.
        # ... and without calibration.
        config = PatchCoreConfig.from_dict(
            {"batch_norm_probe": False, "calibration": "none", **record["config"]}
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{target}: invalid recorded config: {error}") from error
    if expected_config is not None and expected_config != config:
        diffs = {
            k: (v, getattr(config, k))
            for k, v in expected_config.to_dict().items()
            if config.to_dict()[k] != v
        }
        raise CheckpointError(f"{target}: config differs from the expected one: {diffs}")

    bank_record = record.get("memory_bank", {})
    shape = tuple(bank_record.get("shape", ()))
    if len(shape) != 2 or shape[1] != config.target_embed_dimension:
        raise CheckpointError(
            f"{target}: memory bank shape {shape} does not match the recorded "
            f"target_embed_dimension {config.target_embed_dimension}"
        )

    if backbone is None:
        backbone = load_backbone(config.backbone, config.layers)
    recorded = record["backbone"]
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

    ocp, checkpointer = _checkpointer()
    # Restored replicated onto this run's devices, whatever topology wrote it.
    mesh = sharding.make_mesh() if mesh is None else mesh
    abstract = {
        "memory_bank": jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding.replicated(mesh))
    }
    try:
        restored = checkpointer.restore(
            target,
            ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)}),
        )
        memory_bank = np.asarray(restored[_STATE]["memory_bank"])
    except Exception as error:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(
            f"{target}: the memory bank cannot be read; the checkpoint is damaged or partial "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        ) from error
    if memory_bank.shape != shape or _bank_digest(memory_bank) != bank_record.get("sha256"):
        raise CheckpointError(
            f"{target}: the memory bank's contents do not match its recorded sha256; "
            "the checkpoint is damaged"
        )
    model = PatchCore(config, backbone=backbone, mesh=mesh, memory_bank=memory_bank)
    if record.get("calibration") is not None:
        from patchcore_jax.calibration import Calibration

        try:
            model.calibration = Calibration.from_dict(record["calibration"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{target}: invalid recorded calibration: {error}") from error
    return model
