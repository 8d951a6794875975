"""Typed, immutable configuration of a PatchCore model.

Defaults are the authors' reference settings (the ones behind the published MVTec AD numbers);
the paper's variants are options. A config is plain data: it is stored inside checkpoints and
compared on restore.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

# The one copy of each choice: a Literal type for the field, its values as a tuple for checks and
# the command line (every other module imports them from here).
Sampler = Literal["approx_greedy_coreset", "random", "identity", "learned_proxies"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
CoresetMethod = Literal["auto", "pruned", "full"]
CORESET_METHODS: tuple[str, ...] = get_args(CoresetMethod)
Distance = Literal["squared_l2", "l2"]
DISTANCES: tuple[str, ...] = get_args(Distance)
ResizeMode = Literal["shorter-side", "stretch"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
Calibration = Literal["self-excluded", "held-out", "none"]
CALIBRATIONS: tuple[str, ...] = get_args(Calibration)
# How a stored calibration was made (``validation``: scored on a labelled validation set).
CalibrationMethod = Literal["self-excluded", "held-out", "validation"]
CALIBRATION_METHODS: tuple[str, ...] = get_args(CalibrationMethod)
Precision = Literal["exact", "fast"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# Backbone outputs without a spatial grid, so no patch features.
NON_SPATIAL_STAGES: tuple[str, ...] = ("logits",)
# jax.random.key keeps the low 32 bits of a seed (without jax_enable_x64): larger seeds would
# silently repeat smaller ones, and it overflows past 2**63.
SEED_LIMIT = 2**32


def _option(default: Any, help: str, *, flag: str | None = None, group: str = "model") -> Any:
    """A field that is also a command-line option of ``fit`` and ``benchmark``: ``help`` is its
    help text, ``flag`` its option name where that is not the field's (``--k`` for
    ``num_neighbors``; the field's own name is accepted too), ``group`` its help section."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "group": group})


def bank_rows(num_rows: int, sampler: str, fraction: float) -> int:
    """Memory-bank rows ``sampler`` keeps of ``num_rows`` patch features: all of them for
    ``identity``, else ``max(1, int(num_rows * fraction))`` (the one copy of this rule)."""
    if sampler == "identity":
        return num_rows
    return max(1, int(num_rows * fraction))


@dataclass(frozen=True)
class PatchCoreConfig:
    """Everything that decides what a fitted PatchCore model computes.

    Attributes:
      backbone: registered backbone name (``wide_resnet50_2``, ``resnet18``, ``resnet50``,
        ``wide_resnet101_2``, ``resnext101_32x8d``, ``mobilenet_v2``).
      layers: backbone stages whose features are aggregated; ``None`` means the backbone's
        default pair (stride 8 and 16, e.g. ``layer2``/``layer3`` for ResNets).
      resize_mode: ``shorter-side`` (the reference: the shorter side is resized to ``resize``,
        keeping the aspect ratio, then the centre ``crop`` is cut out) or ``stretch`` (the whole
        image is resized to ``crop``, aspect ratio not kept, nothing cut away; ``resize`` unused).
      resize: the shorter image side is resized to this many pixels (Pillow bilinear).
      crop: the model's input size in pixels: an int (square) or (height, width). Anomaly maps
        and masks have this size; ``image_shape`` gives it as (height, width).
      batch_norm_probe: run the reference's one-off BatchNorm probe (README) before
        fitting, as the authors' ``PatchCore.load`` does; False keeps the pristine eval-mode
        statistics. Backbones without BatchNorm statistics are unaffected.
      mask_threshold: ground-truth masks that are not 0/255 are binarised at this value
        (>= threshold is a defect) before the reference's rule; 0/255 masks are unaffected.
      patch_size: side of the local neighbourhood aggregated around each position (3 in the paper).
      patch_stride: s of the paper's Eq. 3 (the authors' ``patchstride``): a neighbourhood every
        s positions, so the patch grid (and the memory bank) shrinks about s x s times; 1 in
        the paper's main results, 2 and 3 in its ablation.
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
      seed: seeds the projection, start points and random samplers; in ``[0, 2**32)``.
      batch_size: images per backbone batch.
      bank_block_size: memory-bank rows per distance tile (bounds k-NN memory).
      query_block_size: query rows per distance tile.
      calibration: how ``fit`` calibrates the decision threshold without defect images:
        ``self-excluded`` (every training image scored against the bank without the rows that
        came from it; the bank is unchanged), ``held-out`` (a seeded ``calibration_fraction`` of
        the training images stays out of the bank and is scored) or ``none``.
      calibration_fraction: fraction of the training images held out (``held-out`` only).
      threshold_quantile: the thresholds are this quantile of the nominal calibration scores
        (image scores, and each image's maximum pixel score for the masks).
      feature_memory_budget: MB of full patch features ``fit`` keeps resident while it selects
        the coreset (``patchcore_jax.bank``): on the device if they fit, else on the
        host, else spilled to a temporary file. ``None``: a quarter of the device memory, else
        a quarter of the host memory. Changes where features are kept, never the results.
      precision: ``exact`` (float32, ``Precision.HIGHEST`` everywhere: the reference numerics)
        or ``fast``: the fastest approximation of the backend, chosen statically from the
        platform of the model's mesh devices (``PatchCore.describe()`` says which, and ``fit``
        logs it). On GPUs/TPUs the backbone runs in bfloat16 (its stage outputs are cast back
        to float32 before the patch features) and the k-NN finds candidates with bfloat16
        distance matmuls (float32 accumulation). On CPUs, where XLA runs bfloat16 no faster
        than float32, the backbone stays float32 and the k-NN finds candidates by low-rank
        distances: float32 distances in the memory bank's top ``knn.LOW_RANK_DIMS`` (128)
        principal directions, computed once per bank (a lower bound of the true distance at
        r / D of the FLOPs). Either way the ``max(4 k, 16)`` candidates are re-ranked with exact
        float32 distances; the coreset, Eq. 7 and the maps stay float32. Scores then agree with
        ``exact`` closely but not bit for bit (README "Precision").
        Checkpoints written before this field load as ``exact``.
    """

    backbone: str = _option(
        "wide_resnet50_2",
        "backbone: wide_resnet50_2 (paper; needs `weights fetch`), resnet18, resnet50, "
        "wide_resnet101_2, resnext101_32x8d, densenet201, or mobilenet_v2 (bundled, offline); "
        "several comma-separated backbones make an ensemble",
    )
    layers: tuple[str, ...] | None = _option(
        None,
        "comma-separated backbone stages to aggregate, for every ensemble member or one "
        "';'-separated group per member, e.g. 'layer2,layer3;stride8,stride16' (default: the "
        "backbone's stride-8 and stride-16 stages)",
    )
    resize_mode: ResizeMode = _option(
        "shorter-side",
        "shorter-side: resize the shorter side to --resize, then centre-crop (the reference); "
        "stretch: resize the whole image to --image-size, aspect ratio not kept, nothing cut away",
    )
    resize: int = _option(256, "shorter image side after resizing, pixels; shorter-side mode only")
    crop: int | tuple[int, int] = _option(224, "square model input (crop or stretch) size, pixels")
    batch_norm_probe: bool = _option(
        True,
        "keep the backbone's pristine eval-mode BatchNorm statistics instead of the reference's "
        "one-off train-mode probe (see README)",
    )
    mask_threshold: int = _option(
        128,
        "ground-truth masks that are not 0/255 are binarised at this value (>= is a defect)",
    )
    patch_size: int = 3
    patch_stride: int = _option(
        1,
        "s of the paper's Eq. 3: a patch neighbourhood every s feature-map positions (the "
        "authors' patchstride; the patch grid shrinks to floor((h - 1) / s) + 1 per side)",
    )
    pretrain_embed_dimension: int = _option(
        1024, "per-layer patch feature length", flag="--pretrain-dim"
    )
    target_embed_dimension: int = _option(1024, "final patch feature length", flag="--target-dim")
    sampler: Sampler = _option("approx_greedy_coreset", "memory-bank subsampling")
    coreset_fraction: float = _option(0.1, "fraction of patches kept in the memory bank")
    projection_dim: int = 128
    num_start_points: int = 10
    coreset_method: CoresetMethod = _option(
        "auto",
        "greedy coreset algorithm; all select the same rows (auto: the faster for the bank size)",
    )
    num_neighbors: int = _option(1, "nearest neighbours averaged per patch score", flag="--k")
    distance: Distance = _option("squared_l2", "patch score distance (squared_l2: the reference)")
    reweight: bool = _option(False, "apply the paper's Eq. 7 image-score reweighting")
    reweight_neighbors: int = _option(
        9,
        "b >= 2, bank neighbourhood of the reweighting; its weights use Euclidean distances "
        "whatever --distance is",
    )
    anomaly_map_sigma: float = 4.0
    seed: int = _option(0, "seed of the coreset projection, start points and random sampler")
    batch_size: int = _option(8, "images per backbone batch")
    bank_block_size: int = 4096
    query_block_size: int = 1024
    calibration: Calibration = _option(
        "self-excluded",
        "self-excluded: score each training image against the bank without its own rows (bank "
        "unchanged; the default); held-out: keep --held-out-fraction of the training images out "
        "of the bank and score them; none: no thresholds",
        group="calibration",
    )
    calibration_fraction: float = _option(
        0.1,
        "fraction of the training images held out (implies --calibration held-out)",
        flag="--held-out-fraction",
        group="calibration",
    )
    threshold_quantile: float = _option(
        0.995,
        "thresholds are this quantile of the nominal calibration scores",
        group="calibration",
    )
    feature_memory_budget: float | None = _option(
        None,
        "MB of patch features kept resident while the coreset is selected: on the device if "
        "they fit, else on the host, else spilled to a temporary file (the results do not "
        "change; default: a quarter of the device memory, else of the host memory)",
        flag="--feature-memory",
    )
    precision: Precision = _option(
        "exact",
        "exact: float32 everywhere (the reference numerics); fast: the backend's fastest "
        "approximation, k-NN candidates re-ranked in float32 (GPU/TPU: bfloat16 backbone and "
        "candidates; CPU: float32 backbone, low-rank candidates; scores agree closely, not bit "
        "for bit: README)",
    )

    def __post_init__(self) -> None:
        """Validates every field (the one place: the CLI reports these errors as they are)."""
        self._check_sizes()
        self._check_image_options()
        self._check_method_options()
        self._check_layers()

    def _check_sizes(self) -> None:
        """Positive integer sizes, the feature memory budget and b of Eq. 7."""

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"PatchCoreConfig.{name} must be a positive integer, got {value!r}"
                )

        for name in (
            "resize",
            "patch_size",
            "patch_stride",
            "pretrain_embed_dimension",
            "target_embed_dimension",
            "projection_dim",
            "num_start_points",
            "num_neighbors",
            "batch_size",
            "bank_block_size",
            "query_block_size",
        ):
            positive_int(name)
        budget = self.feature_memory_budget
        if budget is not None and (
            isinstance(budget, bool)
            or not isinstance(budget, int | float)
            or not math.isfinite(budget)
            or budget < 0
        ):
            raise ValueError(
                "PatchCoreConfig.feature_memory_budget must be None or a number of MB >= 0, "
                f"got {budget!r}"
            )
        b = self.reweight_neighbors
        if not isinstance(b, int) or isinstance(b, bool) or b < 2:
            raise ValueError(
                "PatchCoreConfig.reweight_neighbors (b of Eq. 7) must be an integer >= 2: the "
                f"neighbourhood holds m* and at least one other bank row; got {b!r}"
            )

    def _check_image_options(self) -> None:
        """Patch size, crop, resize mode and mask threshold."""
        if self.patch_size % 2 != 1:
            raise ValueError(f"PatchCoreConfig.patch_size must be odd, got {self.patch_size}")
        if isinstance(self.crop, list | tuple):
            object.__setattr__(self, "crop", tuple(self.crop))
        crop_sizes = self.crop if isinstance(self.crop, tuple) else (self.crop,)
        if len(crop_sizes) != (2 if isinstance(self.crop, tuple) else 1) or not all(
            isinstance(size, int) and not isinstance(size, bool) and size >= 1
            for size in crop_sizes
        ):
            raise ValueError(
                "PatchCoreConfig.crop must be a positive integer or (height, width) of positive "
                f"integers, got {self.crop!r}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"PatchCoreConfig.resize_mode must be one of {RESIZE_MODES}, "
                f"got {self.resize_mode!r}"
            )
        if self.resize_mode == "shorter-side" and max(crop_sizes) > self.resize:
            raise ValueError(
                f"PatchCoreConfig.crop ({self.crop}) must not exceed resize ({self.resize}) "
                "with resize_mode 'shorter-side' (the crop is cut from the resized image); use "
                "resize_mode 'stretch' to resize whole images to that size"
            )
        if not isinstance(self.batch_norm_probe, bool):
            raise ValueError(
                f"PatchCoreConfig.batch_norm_probe must be True or False, "
                f"got {self.batch_norm_probe!r}"
            )
        if (
            not isinstance(self.mask_threshold, int)
            or isinstance(self.mask_threshold, bool)
            or not 1 <= self.mask_threshold <= 255
        ):
            raise ValueError(
                f"PatchCoreConfig.mask_threshold must be an integer in 1..255, "
                f"got {self.mask_threshold!r}"
            )

    def _check_method_options(self) -> None:
        """Sampler, coreset method, distance, fractions, seed, calibration and precision."""
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
        sigma = self.anomaly_map_sigma
        if (
            not isinstance(sigma, int | float)
            or isinstance(sigma, bool)
            or not math.isfinite(sigma)
            or sigma < 0
        ):
            raise ValueError(
                f"PatchCoreConfig.anomaly_map_sigma must be a finite number >= 0, got {sigma!r}"
            )
        seed = self.seed
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"PatchCoreConfig.seed must be an integer in [0, 2**32), got {seed!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(
                f"PatchCoreConfig.calibration must be one of {CALIBRATIONS}, "
                f"got {self.calibration!r}"
            )
        if self.calibration == "self-excluded" and self.sampler == "learned_proxies":
            raise ValueError(
                "PatchCoreConfig.calibration 'self-excluded' needs bank rows taken from the "
                "training images; learned_proxies has none: use 'held-out' or 'none'"
            )
        if not 0.0 < self.calibration_fraction < 1.0:
            raise ValueError(
                "PatchCoreConfig.calibration_fraction must be in (0, 1), "
                f"got {self.calibration_fraction!r}"
            )
        if not 0.0 < self.threshold_quantile <= 1.0:
            raise ValueError(
                "PatchCoreConfig.threshold_quantile must be in (0, 1], "
                f"got {self.threshold_quantile!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"PatchCoreConfig.precision must be one of {PRECISIONS}, got {self.precision!r}"
            )

    def _check_layers(self) -> None:
        """Stage names: a sequence of spatial stages (None: the backbone's default)."""
        if self.layers is not None:
            if isinstance(self.layers, str):
                raise ValueError(
                    "PatchCoreConfig.layers must be a sequence of stage names, e.g. "
                    f"({self.layers!r},), not the string {self.layers!r}"
                )
            object.__setattr__(self, "layers", tuple(self.layers))
            if len(self.layers) < 1:
                raise ValueError("PatchCoreConfig.layers must name at least one backbone stage")
            for layer in self.layers:
                if not isinstance(layer, str):
                    raise ValueError(f"PatchCoreConfig.layers: {layer!r} is not a stage name")
                if layer in NON_SPATIAL_STAGES:
                    raise ValueError(
                        f"PatchCoreConfig.layers: {layer!r} has no spatial grid; patch features "
                        "need feature-map stages (e.g. layer2, layer3 or stride8, stride16)"
                    )

    def check_bank_size(self, num_rows: int) -> None:
        """ValueError unless a memory bank of ``num_rows`` rows serves k (and b if reweighting).

        Checked when a bank is built or loaded, so a model that cannot score is never saved.
        """
        if self.num_neighbors > num_rows:
            raise ValueError(
                f"num_neighbors (k, --k) = {self.num_neighbors} exceeds the memory bank's "
                f"{num_rows} rows; lower k, or fit on more images or a larger coreset_fraction"
            )
        if self.reweight and self.reweight_neighbors > num_rows:
            raise ValueError(
                f"reweight_neighbors (b, --reweight-neighbors) = {self.reweight_neighbors} "
                f"exceeds the memory bank's {num_rows} rows; lower b, or fit on more images or "
                "a larger coreset_fraction"
            )

    def bank_rows(self, num_rows: int) -> int:
        """Memory-bank rows this config's sampler keeps of ``num_rows`` patch features."""
        return bank_rows(num_rows, self.sampler, self.coreset_fraction)

    @property
    def image_shape(self) -> tuple[int, int]:
        """(height, width) of the model's input images, masks and anomaly maps."""
        if isinstance(self.crop, tuple):
            return self.crop[0], self.crop[1]
        return self.crop, self.crop

    def replace(self, **changes: Any) -> PatchCoreConfig:
        """Returns a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def differences(self, other: PatchCoreConfig) -> dict[str, tuple[Any, Any]]:
        """``{field: (self's value, other's value)}`` for every field whose values differ
        (``crop`` 64 and (64, 64) are the same crop)."""
        return {
            field.name: (getattr(self, field.name), getattr(other, field.name))
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != getattr(other, field.name)
            and (field.name != "crop" or self.image_shape != other.image_shape)
        }

    def check_unchanged(self, values: dict[str, Any], what: str) -> None:
        """ValueError ``what: NAME GIVEN (the model's: OWN), ...`` when any of ``values``
        (config fields) differs from this config's (e.g. model options given to ``--resume``)."""
        differing = self.differences(self.replace(**values))
        if differing:
            listed = ", ".join(
                f"PatchCoreConfig.{name} {given!r} (the model's: {own!r})"
                for name, (own, given) in differing.items()
            )
            raise ValueError(f"{what}: {listed}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form (tuples become lists)."""
        out = dataclasses.asdict(self)
        for name in ("layers", "crop"):
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchCoreConfig:
        """Inverse of ``to_dict``; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PatchCoreConfig fields: {unknown}")
        return cls(**data)  # __post_init__ turns lists back into tuples


# The paper's other settings, as named groups of config fields (README "Reproducing the paper's
# tables" lists them). Presets combine ("im320,wrn101,coreset-1"; later ones win) and explicit
# options override them. ``backbone`` may name several (an ensemble) and ``layers`` then give one
# stage list per member (``member_configs``).
PAPER_ENSEMBLE: dict[str, Any] = {
    "backbone": "wide_resnet101_2,resnext101_32x8d,densenet201",
    "layers": (("layer2", "layer3"), ("layer2", "layer3"), ("denseblock2", "denseblock3")),
    "pretrain_embed_dimension": 1024,
    "target_embed_dimension": 384,
    "num_neighbors": 1,
    "sampler": "approx_greedy_coreset",
    "coreset_fraction": 0.01,
}  # patch_size 3 and patch_stride 1: the defaults
PRESETS: dict[str, dict[str, Any]] = {
    # IM320: the paper's higher resolution (shorter side 366, centre crop 320).
    "im320": {"resize": 366, "crop": 320},
    # Feature hierarchy ablation: layers 1+2+3 (ResNet-family stage names).
    "layers123": {"layers": ("layer1", "layer2", "layer3")},
    # WideResNet-101-2 backbone (needs `patchcore-jax weights fetch wide_resnet101_2`).
    "wrn101": {"backbone": "wide_resnet101_2"},
    # PatchCore-25% / -10% / -1% of the paper's Table 1 (memory-bank coreset fractions).
    "coreset-25": {"coreset_fraction": 0.25},
    "coreset-10": {"coreset_fraction": 0.1},
    "coreset-1": {"coreset_fraction": 0.01},
    # Eq. 7 image-score reweighting (the reference does not apply it; b: --reweight-neighbors).
    "reweight": {"reweight": True},
    # The reference's ensemble runs reduce each member's patch features to 384 dimensions.
    "ensemble-d384": {"target_embed_dimension": 384},
    # The paper's best MVTec AD result (Table 4), the authors' sample_training.sh ensemble:
    # WRN-101 + ResNeXt-101 (layer2, layer3) + DenseNet-201 (denseblock2, denseblock3), 1%
    # coreset, 384-d, k = 1, at IM320 (resize 366, crop 320) or IM224 (256, 224).
    "ensemble-paper": {**PAPER_ENSEMBLE, "resize": 366, "crop": 320},
    "ensemble-paper-im224": {**PAPER_ENSEMBLE, "resize": 256, "crop": 224},
}


def preset_values(names: str | Sequence[str]) -> dict[str, Any]:
    """The config fields set by the presets ``names`` (a list or "a,b"), later ones winning.

    Raises:
      ValueError: an unknown preset name (the message lists the known ones).
    """
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    values: dict[str, Any] = {}
    for name in names:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        values.update(PRESETS[name])
    return values


def member_configs(values: dict[str, Any]) -> list[PatchCoreConfig]:
    """One config per backbone of ``values["backbone"]`` ("a", or "a,b,c": an ensemble's
    members) from config field values (e.g. ``preset_values("ensemble-paper")``; the config's
    defaults for the others). ``values["layers"]``: None, one stage list for every member, or
    one per member."""
    values = dict(values)
    backbone = values.pop("backbone", PatchCoreConfig.backbone)
    backbones = [name.strip() for name in backbone.split(",") if name.strip()]
    if not backbones:
        raise ValueError(
            "PatchCoreConfig.backbone: expected one or more comma-separated backbone names"
        )
    layers = values.pop("layers", None)
    one_list = layers is None or isinstance(layers, str) or all(isinstance(x, str) for x in layers)
    groups = [layers] if one_list else list(layers)
    if len(groups) == 1:
        groups = groups * len(backbones)
    elif len(groups) != len(backbones):
        raise ValueError(
            f"PatchCoreConfig.layers gives {len(groups)} ';'-separated groups for "
            f"{len(backbones)} backbones; give one group per backbone, or one for all"
        )
    return [
        PatchCoreConfig(backbone=name, layers=group, **values)
        for name, group in zip(backbones, groups, strict=True)
    ]
