"""Ensembles of PatchCore models, combined as the authors' reference combines them.

Every member has its own backbone, layers, seed, memory bank and coreset. Their image scores are
min-max normalised per member over the scored set, and so are their anomaly maps (separately,
over all pixels of the set), then averaged across members (``combine``). The normalisation needs
the whole set, so ``Ensemble.predict`` of a batch of images normalises over that batch: the same
image scores differently in different sets, only the ranking within one set is meaningful (the
reference's behaviour, which its published ensemble numbers come from).

Checkpoint layout (the same versioned scheme as ``checkpoint``)::

    MODEL/CURRENT                  names the version folder
    MODEL/v000001/ensemble.json    {"format", "members": ["member0", ...], "normalisation"}
    MODEL/v000001/member0/         a complete single-model checkpoint (``checkpoint.save``)

Saving writes the whole new version (every member and the record) into a staging folder, renames
it, then switches ``CURRENT`` in one ``os.replace``: a kill at any moment leaves the previous
model (single or ensemble) or the new ensemble loadable, never a mix. One process only.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from patchcore_jax import checkpoint, sharding
from patchcore_jax.checkpoint import CheckpointError
from patchcore_jax.config import PatchCoreConfig
from patchcore_jax.files import atomic_write_text
from patchcore_jax.model import ImageBatches, PatchCore

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from patchcore_jax.backbones import Backbone

FORMAT = "patchcore-jax-ensemble/1"
RECORD = "ensemble.json"
NORMALISATION = "per member min-max over the scored set (scores and maps separately), then mean"
# Fields that fix the image frame: members must agree, so their maps line up pixel by pixel.
SHARED_FIELDS = ("resize_mode", "resize", "crop", "mask_threshold")


def check_members(configs: Sequence[PatchCoreConfig]) -> None:
    """ValueError (one line) unless ``configs`` can form one model: at least one, and all with
    the same image frame (``SHARED_FIELDS``)."""
    if not configs:
        raise ValueError("an ensemble needs at least one member configuration")
    first = configs[0]
    for index, config in enumerate(configs[1:], start=1):
        for name in SHARED_FIELDS:
            if getattr(config, name) != getattr(first, name):
                raise ValueError(
                    f"ensemble members must share {name}: member 0 ({first.backbone}) has "
                    f"{getattr(first, name)!r}, member {index} ({config.backbone}) has "
                    f"{getattr(config, name)!r}"
                )


def _min_max(values: np.ndarray) -> np.ndarray:
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
    member_scores: Sequence[np.ndarray], member_maps: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's ensemble combination.

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
    scores = np.mean([_min_max(s) for s in member_scores], axis=0)
    maps = np.mean([_min_max(m) for m in member_maps], axis=0)
    return scores.astype(np.float32), maps.astype(np.float32)


class Ensemble:
    """Several PatchCore models scored as one (module docstring).

    >>> ensemble = Ensemble.from_configs([PatchCoreConfig(backbone="mobilenet_v2"),
    ...                                   PatchCoreConfig(backbone="resnet18", seed=1)])
    >>> ensemble.fit(train_images)
    >>> image_scores, anomaly_maps = ensemble.predict(test_images)  # normalised over this set
    """

    def __init__(self, members: Sequence[PatchCore]) -> None:
        check_members([member.config for member in members])
        self.members: list[PatchCore] = list(members)

    @classmethod
    def from_configs(
        cls,
        configs: Sequence[PatchCoreConfig],
        *,
        backbones: Sequence[Backbone | None] | None = None,
        mesh: Mesh | None = None,
    ) -> Ensemble:
        """Unfitted members, one per config (``backbones[i]`` for member i, default loaded)."""
        check_members(configs)
        mesh = sharding.make_mesh() if mesh is None else mesh
        backbones = [None] * len(configs) if backbones is None else backbones
        if len(backbones) != len(configs):
            raise ValueError(f"{len(configs)} configs but {len(backbones)} backbones")
        return cls(
            [
                PatchCore(config, backbone=backbone, mesh=mesh)
                for config, backbone in zip(configs, backbones, strict=True)
            ]
        )

    @property
    def configs(self) -> list[PatchCoreConfig]:
        return [member.config for member in self.members]

    @property
    def config(self) -> PatchCoreConfig:
        """Member 0's config; the image frame (``SHARED_FIELDS``) is every member's."""
        return self.members[0].config

    def bank_size(self, num_images: int) -> list[int]:
        """Per member, the bank rows ``fit`` keeps from ``num_images`` images."""
        return [member.bank_size(num_images) for member in self.members]

    def fit(
        self,
        images: ImageBatches,
        *,
        progress: Callable[[int], None] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> Ensemble:
        """Fits every member on ``images`` (uint8 [N, H, W, 3] or batches of them; an iterator
        is read once into host memory, as every member needs it). ``progress`` counts images
        per member (members x N in all)."""
        images = _reusable(images)
        for member in self.members:
            if log is not None:
                log(f"ensemble member {member.config.backbone} {list(member.backbone.layers)}")
            member.fit(images, progress=progress, log=log)
        return self

    def predict_members(
        self, images: ImageBatches, *, progress: Callable[[int], None] | None = None
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each member's raw ``predict``: (scores [N] per member, maps [N, H, W] per member)."""
        images = _reusable(images)
        member_scores, member_maps = [], []
        for member in self.members:
            scores, maps = [], []
            for result in member.score(images):
                scores.append(result.image_scores)
                maps.append(result.anomaly_maps)
                if progress is not None:
                    progress(len(result.image_scores))
            if not scores:
                raise ValueError("predict() received no images")
            member_scores.append(np.concatenate(scores))
            member_maps.append(np.concatenate(maps))
        return member_scores, member_maps

    def predict(
        self, images: ImageBatches, *, progress: Callable[[int], None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores ``images`` as one set: ``combine`` of the members' predictions,
        (image_scores [N], anomaly_maps [N, H, W]), normalised over these N images."""
        return combine(*self.predict_members(images, progress=progress))

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Writes every member and the ensemble record as one new version (module docstring);
        returns the absolute path."""
        if jax.process_count() > 1:
            raise NotImplementedError("Ensemble.save runs in one process only")
        if any(member.memory_bank is None for member in self.members):
            raise CheckpointError("cannot save an unfitted ensemble: call fit() first")
        target = checkpoint.check_destination(path, overwrite=overwrite)
        created = not target.exists()
        target.mkdir(parents=True, exist_ok=True)
        # The versioned layout's steps, shared with checkpoint.save.
        checkpoint._remove_leftovers(target)
        current = checkpoint._current_version(target)
        name = f"v{(int(current[1:]) if current else 0) + 1:06d}"
        staging = target / f".{name}.saving"
        try:
            staging.mkdir()
            names = [f"member{index}" for index in range(len(self.members))]
            for member, member_name in zip(self.members, names, strict=True):
                checkpoint.save(member, staging / member_name)
            record = {"format": FORMAT, "members": names, "normalisation": NORMALISATION}
            atomic_write_text(staging / RECORD, json.dumps(record, indent=2) + "\n")
            os.rename(staging, target / name)
            checkpoint._fsync_dir(target)
            checkpoint._write_pointer(target, name)
            checkpoint._remove_leftovers(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if created and target.is_dir() and not any(target.iterdir()):
                target.rmdir()
            raise
        return target

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        backbones: Sequence[Backbone | None] | None = None,
        mesh: Mesh | None = None,
    ) -> Ensemble:
        """Restores an ensemble written by ``save`` (each member checked by
        ``checkpoint.load``; ``backbones[i]`` for member i, default loaded by name)."""
        target = Path(path).absolute()
        version = checkpoint._resolve(target)
        record = _read_record(target, version)
        if record is None:
            raise CheckpointError(
                f"{target} holds a single model, not an ensemble; load it with PatchCore.load"
            )
        members = record["members"]
        backbones = [None] * len(members) if backbones is None else backbones
        if len(backbones) != len(members):
            raise ValueError(f"{target} has {len(members)} members but {len(backbones)} backbones")
        mesh = sharding.make_mesh() if mesh is None else mesh
        return cls(
            [
                checkpoint.load(version / name, backbone=backbone, mesh=mesh)
                for name, backbone in zip(members, backbones, strict=True)
            ]
        )


def _reusable(images: ImageBatches) -> ImageBatches:
    """``images`` in a form that can be iterated once per member."""
    if isinstance(images, np.ndarray | jax.Array | list | tuple):
        return images
    return list(images)


def _read_record(target: Path, version: Path) -> dict[str, Any] | None:
    """The ensemble record of a resolved checkpoint version, or None for a single model."""
    path = version / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{target}: the ensemble record cannot be read: {error}") from error
    members = record.get("members") if isinstance(record, dict) else None
    if record.get("format") != FORMAT or not isinstance(members, list) or not members:
        raise CheckpointError(f"{target}: not a {FORMAT} ensemble record")
    return record


def load_model(path: str | os.PathLike, *, mesh: Mesh | None = None) -> PatchCore | Ensemble:
    """A single model or an ensemble, whichever ``path`` holds (what the CLI loads)."""
    target = Path(path).absolute()
    if _read_record(target, checkpoint._resolve(target)) is not None:
        return Ensemble.load(target, mesh=mesh)
    return checkpoint.load(target, mesh=mesh)
