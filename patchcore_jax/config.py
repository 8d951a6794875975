"""Typed, immutable configuration of a PatchCore model.

Defaults are the authors' reference settings (the ones behind the published MVTec AD numbers);
the paper's variants are options. A config is plain data: it is stored inside checkpoints and
compared on restore.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Sampler = Literal["approx_greedy_coreset", "random", "identity", "learned_proxies"]
Distance = Literal["squared_l2", "l2"]

SAMPLERS: tuple[str, ...] = ("approx_greedy_coreset", "random", "identity", "learned_proxies")
CoresetMethod = Literal["auto", "pruned", "full"]
CORESET_METHODS: tuple[str, ...] = ("auto", "pruned", "full")
DISTANCES: tuple[str, ...] = ("squared_l2", "l2")


@dataclass(frozen=True)
class PatchCoreConfig:
    """Everything that decides what a fitted PatchCore model computes.

    Attributes:
      backbone: registered backbone name (``wide_resnet50_2``, ``resnet18``, ``resnet50``,
        ``wide_resnet101_2``, ``mobilenet_v2``).
      layers: backbone stages whose features are aggregated; ``None`` means the backbone's
        default pair (stride 8 and 16, e.g. ``layer2``/``layer3`` for ResNets).
      resize: the shorter image side is resized to this many pixels (Pillow bilinear).
      crop: centre-crop size in pixels; anomaly maps have this size.
      patch_size: side of the local neighbourhood aggregated around each position (3 in the paper).
      pretrain_embed_dimension: per-layer feature length after adaptive average pooling.
      target_embed_dimension: final patch feature length.
      sampler: how the memory bank is subsampled.
      coreset_fraction: fraction of patches kept by ``approx_greedy_coreset``, ``random`` and
        ``learned_proxies``.
      projection_dim: random-projection size used to pick the greedy coreset.
      num_start_points: random starting points of the approximate greedy coreset.
      coreset_method: greedy coreset algorithm, ``pruned`` (skips rows a step cannot change),
        ``full`` or ``auto`` (the faster for the bank size); all select the same rows.
      num_neighbors: k of the k-NN; a patch score is the mean of its k distances.
      distance: ``squared_l2`` (the reference's faiss output) or ``l2`` (Euclidean).
      reweight: apply the paper's Eq. 7 image-score reweighting.
      reweight_neighbors: b, the bank neighbourhood size used by the reweighting.
      anomaly_map_sigma: Gaussian blur sigma (pixels) of anomaly maps.
      seed: seeds the projection, start points and random samplers.
      batch_size: images per backbone batch.
      bank_block_size: memory-bank rows per distance tile (bounds k-NN memory).
      query_block_size: query rows per distance tile.
    """

    backbone: str = "wide_resnet50_2"
    layers: tuple[str, ...] | None = None
    resize: int = 256
    crop: int = 224
    patch_size: int = 3
    pretrain_embed_dimension: int = 1024
    target_embed_dimension: int = 1024
    sampler: Sampler = "approx_greedy_coreset"
    coreset_fraction: float = 0.1
    projection_dim: int = 128
    num_start_points: int = 10
    coreset_method: CoresetMethod = "auto"
    num_neighbors: int = 1
    distance: Distance = "squared_l2"
    reweight: bool = False
    reweight_neighbors: int = 9
    anomaly_map_sigma: float = 4.0
    seed: int = 0
    batch_size: int = 8
    bank_block_size: int = 4096
    query_block_size: int = 1024

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"PatchCoreConfig.{name} must be a positive integer, got {value!r}"
                )

        for name in (
            "resize",
            "crop",
            "patch_size",
            "pretrain_embed_dimension",
            "target_embed_dimension",
            "projection_dim",
            "num_start_points",
            "num_neighbors",
            "reweight_neighbors",
            "batch_size",
            "bank_block_size",
            "query_block_size",
        ):
            positive_int(name)
        if self.patch_size % 2 != 1:
            raise ValueError(f"PatchCoreConfig.patch_size must be odd, got {self.patch_size}")
        if self.crop > self.resize:
            raise ValueError(
                f"PatchCoreConfig.crop ({self.crop}) must not exceed resize ({self.resize})"
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(
                f"PatchCoreConfig.sampler must be one of {SAMPLERS}, got {self.sampler!r}"
            )
        if self.coreset_method not in CORESET_METHODS:
            raise ValueError(
                f"PatchCoreConfig.coreset_method must be one of {CORESET_METHODS}, "
                f"got {self.coreset_method!r}"
            )
        if self.distance not in DISTANCES:
            raise ValueError(
                f"PatchCoreConfig.distance must be one of {DISTANCES}, got {self.distance!r}"
            )
        if not 0.0 < self.coreset_fraction <= 1.0:
            raise ValueError(
                f"PatchCoreConfig.coreset_fraction must be in (0, 1], got {self.coreset_fraction!r}"
            )
        if not self.anomaly_map_sigma >= 0.0:
            raise ValueError(
                f"PatchCoreConfig.anomaly_map_sigma must be >= 0, got {self.anomaly_map_sigma!r}"
            )
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
            if len(self.layers) < 1:
                raise ValueError("PatchCoreConfig.layers must name at least one backbone stage")

    def replace(self, **changes: Any) -> PatchCoreConfig:
        """Returns a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form (tuples become lists)."""
        out = dataclasses.asdict(self)
        if out["layers"] is not None:
            out["layers"] = list(out["layers"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchCoreConfig:
        """Inverse of ``to_dict``; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PatchCoreConfig fields: {unknown}")
        data = dict(data)
        if data.get("layers") is not None:
            data["layers"] = tuple(data["layers"])
        return cls(**data)
