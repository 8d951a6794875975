"""Ensembles of PatchCore models, combined as the authors' reference combines them.

Every member has its own backbone, layers, seed, memory bank and coreset. Their image scores are
min-max normalised per member over the scored set, and so are their anomaly maps (separately,
over all pixels of the set), then averaged across members (``combine``). The normalisation needs
the whole set, so ``Ensemble.predict`` of a batch of images normalises over that batch: the same
image scores differently in different sets, only the ranking within one set is meaningful (the
reference's behaviour, which its published ensemble numbers come from).

The model interface: ``Ensemble`` and ``PatchCore`` answer the same calls, so a caller holding
either (``patchcore_jax.load`` opens both) never asks which it has:

- ``config``: the image frame, preprocessing and batch size (an ensemble: member 0's; the frame
  is every member's); ``image_shape``; ``describe()``: the numerics, one line.
- ``members``: the PatchCore models that score (a PatchCore: ``[self]``); the ``progress``
  callbacks of ``fit`` and ``predict`` count images per member, ``len(paths) * len(members)``
  in all.
- ``fit(images, progress=, log=, coreset_progress=, calibration_progress=, spill_dir=)``;
  ``bank_size(num_images)``.
- ``predict(images, progress=)`` -> ``calibration.Prediction`` (``image_scores`` [N],
  ``anomaly_maps`` [N, H, W], and, with a calibration, ``normalized_scores`` and
  ``decisions``); ``score(images)`` yields ``scoring.ScoreResult`` per batch.
- ``calibration``: the thresholds, or None: decisions and masks only where it is not None.
  An ensemble has none: its scores are normalised over each scored set, so no fixed threshold
  applies to them (``calibrate`` says so). Its members keep their own calibrations.
- saved and opened by ``patchcore_jax.save(model, path)`` / ``patchcore_jax.load(path)``
  (``checkpoint``: both kinds in one versioned folder).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from patchcore_jax import sharding
from patchcore_jax.calibration import Prediction
from patchcore_jax.config import PatchCoreConfig
from patchcore_jax.exported import ENSEMBLE_COMBINATION, combine
from patchcore_jax.model import ImageBatches, PatchCore
from patchcore_jax.scoring import ScoreResult

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from patchcore_jax.backbones import Backbone

NORMALISATION = ENSEMBLE_COMBINATION
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


class Ensemble:
    """Several PatchCore models scored as one, with PatchCore's interface (module docstring).

    >>> ensemble = Ensemble.from_configs([PatchCoreConfig(backbone="mobilenet_v2"),
    ...                                   PatchCoreConfig(backbone="resnet18", seed=1)])
    >>> ensemble.fit(train_images)
    >>> ensemble.predict(test_images).image_scores  # normalised over this set
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

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) of the images and anomaly maps, every member's."""
        return self.members[0].image_shape

    @property
    def calibration(self) -> None:
        """Always None: the scores are normalised over each scored set, so no fixed threshold
        applies to them (the members keep their own calibrations)."""
        return None

    def describe(self) -> str:
        """The members' numerics on this platform and the combination, one line."""
        members = "; ".join(
            f"{member.config.backbone}: {member.describe()}" for member in self.members
        )
        return f"ensemble of {len(self.members)} ({NORMALISATION}): {members}"

    def bank_size(self, num_images: int) -> list[int]:
        """Per member, the bank rows ``fit`` keeps from ``num_images`` images."""
        return [member.bank_size(num_images) for member in self.members]

    def fit(
        self,
        images: ImageBatches,
        *,
        progress: Callable[[int], None] | None = None,
        log: Callable[[str], None] | None = None,
        coreset_progress: Callable[[int], None] | None = None,
        calibration_progress: Callable[[int], None] | None = None,
        spill_dir: str | os.PathLike | None = None,
    ) -> Ensemble:
        """Fits every member on ``images`` (uint8 [N, H, W, 3] or batches of them; an iterator
        is read once into host memory, as every member needs it) with ``PatchCore.fit``'s
        options. ``progress`` counts images per member (members x N in all), 0 as each starts."""
        images = _reusable(images)
        for member in self.members:
            if log is not None:
                log(f"ensemble member {member.config.backbone} {list(member.backbone.layers)}")
            if progress is not None:
                progress(0)  # this member's embedding starts (PatchCore.fit: none)
            member.fit(
                images,
                progress=progress,
                log=log,
                coreset_progress=coreset_progress,
                calibration_progress=calibration_progress,
                spill_dir=spill_dir,
            )
        return self

    def calibrate(self, images: ImageBatches, **kwargs: object) -> None:
        """Refused: an ensemble's scores are normalised over each scored set, so a threshold
        calibrated on one set does not apply to another (``calibration`` is None)."""
        raise ValueError(
            "an ensemble cannot be calibrated: its scores are min-max normalised over each "
            "scored set, so a threshold from one set does not apply to another"
        )

    def predict_members(
        self, images: ImageBatches, *, progress: Callable[[int], None] | None = None
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each member's raw ``predict``: (scores [N] per member, maps [N, H, W] per member)."""
        images = _reusable(images)
        member_scores, member_maps = [], []
        for member in self.members:
            prediction = member.predict(images, progress=progress)
            member_scores.append(prediction.image_scores)
            member_maps.append(prediction.anomaly_maps)
        return member_scores, member_maps

    def predict(
        self, images: ImageBatches, *, progress: Callable[[int], None] | None = None
    ) -> Prediction:
        """Scores ``images`` as one set: ``combine`` of the members' predictions,
        ``image_scores`` [N] and ``anomaly_maps`` [N, H, W] normalised over these N images (no
        calibration: no normalised scores or decisions). ``progress`` counts images per member
        (members x N in all)."""
        scores, maps = combine(*self.predict_members(images, progress=progress))
        return Prediction.from_scores(scores, maps, None)

    def score(self, images: ImageBatches) -> Iterator[ScoreResult]:
        """``predict``'s results as host-side ``ScoreResult`` batches of ``config.batch_size``
        images, like ``PatchCore.score``, the first only once the whole set is scored (the
        normalisation needs it). ``patch_scores`` and ``nearest_indices`` are None: the
        members' patch grids and banks differ, and the reference combines only scores and
        maps."""
        images = _reusable(images)
        if len(images) == 0:
            return
        prediction = self.predict(images)
        image_scores, anomaly_maps = prediction.image_scores, prediction.anomaly_maps
        step = self.config.batch_size
        for start in range(0, len(image_scores), step):
            yield ScoreResult(
                image_scores[start : start + step], anomaly_maps[start : start + step], None, None
            )


def _reusable(images: ImageBatches) -> ImageBatches:
    """``images`` in a form that can be iterated once per member."""
    if isinstance(images, np.ndarray | jax.Array | list | tuple):
        return images
    return list(images)
