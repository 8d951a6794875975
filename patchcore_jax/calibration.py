"""Decision thresholds from nominal scores, and scores normalised so that the threshold is 0.5.

PatchCore is fitted on defect-free images only, so its thresholds come from nominal scores that
the bank has not memorised. By default (``self-excluded``) every training image is scored
against the fitted bank with the bank rows taken from that same image left out: a held-out-like
nominal score at the cost of one scoring pass, with the bank (and so every reported number)
untouched. ``held-out`` keeps a seeded fraction of the training images out of the bank instead,
and a user-given validation set (nominal or labelled) can be used after fitting.

An image without a finite calibration score is left out of the thresholds and ranges, and the
calibration says how many were (``left_out``): in self-excluded calibration an image has no
score when the bank holds no row of any other image (identical images, a bank of a few rows).
Fewer than ``MIN_SCORED_IMAGES`` scored images is an error, and a ``Calibration`` never holds a
non-finite threshold or range, so none is saved, loaded, applied or exported.

Thresholds are a quantile of the nominal scores, or F1-optimal on a labelled validation set.
Normalised scores follow anomalib: ``clip((s - threshold) / (max - min) + 0.5, 0, 1)`` with min
and max of the calibration scores, so the threshold maps to 0.5.

This module is host code: the self-excluded scores themselves are ``scoring.score_patch_features``
with ``image_ids`` and ``bank_source_images`` (a k-NN that skips each image's own bank rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from patchcore_jax.config import CALIBRATION_METHODS
from patchcore_jax.exported import normalize  # one normalisation: fit, predict and exports

NUM_PIXEL_QUANTILES = 101  # the stored pixel-score distribution: its 0th..100th percentiles
# Scored images a calibration needs once images without a finite score are left out: a
# self-excluded one as many as it needs training images (each image is scored against the
# others'), the others one (a held-out fraction or a validation set may be a single image).
MIN_SCORED_IMAGES = {"self-excluded": 2, "held-out": 1, "validation": 1}
_NO_SCORE_CAUSE = {
    "self-excluded": "the memory bank holds no row of any other image (identical images, or a "
    "bank of very few rows); fit on more distinct images, with a larger "
    "PatchCoreConfig.coreset_fraction, or with calibration 'none'",
    "held-out": "their patch features are not finite",
    "validation": "their patch features are not finite",
}


def held_out_images(num_images: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted indices of a seeded ``fraction`` of ``num_images`` training images (>= 1).

    Raises:
      ValueError: if holding them out leaves no training image for the bank.
    """
    count = max(1, round(num_images * fraction))
    if count >= num_images:
        raise ValueError(
            f"held-out calibration fraction {fraction} of {num_images} training image(s) leaves "
            "no training images for the memory bank; use more images or a smaller fraction"
        )
    order = np.random.default_rng(seed).permutation(num_images)
    return np.sort(order[:count]).astype(np.int64)


def fit_held_out(method: str, num_images: int, fraction: float, seed: int) -> np.ndarray | None:
    """The training images a fit's ``method`` calibration keeps out of the bank and scores
    (``held-out``: ``held_out_images``); None where it keeps none out (``self-excluded`` scores
    every image against the others' bank rows, ``none`` scores none).

    Raises:
      ValueError: ``held_out_images``'s, or ``self-excluded`` with fewer than 2 images.
    """
    if method == "held-out":
        return held_out_images(num_images, fraction, seed)
    if method == "self-excluded" and num_images < 2:
        raise ValueError(
            "self-excluded calibration needs at least 2 training images (each is scored "
            "against the others' bank rows), got 1; use calibration='none'"
        )
    return None


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibrated thresholds of a fitted model and the score distributions they came from.

    Attributes:
      method: ``self-excluded``, ``held-out`` or ``validation``.
      rule: ``quantile`` (of the nominal scores) or ``f1`` (F1-optimal on labelled images).
      quantile: the quantile used by the ``quantile`` rule.
      image_threshold: images with ``score >= image_threshold`` are anomalous.
      image_min, image_max: range of the calibration image scores (for normalisation).
      pixel_threshold: pixels with ``map >= pixel_threshold`` belong to the defect mask.
      pixel_min, pixel_max: range of the calibration anomaly-map values.
      image_scores: ``[N] float32``, the calibration images' scores.
      pixel_maxima: ``[N] float32``, each calibration image's largest map value.
      pixel_quantiles: ``[101] float32``, percentiles 0..100 of all calibration map values.
      labels: ``[N]`` 0/1 for a labelled validation set, else None.
      images: training-image indices that were held out (``held-out``), else None.
      left_out: calibration images without a finite score, left out of all the above.

    Raises:
      ValueError: a non-finite threshold, range or score distribution (no path can save,
        load, apply or export one).
    """

    method: str
    rule: str
    quantile: float
    image_threshold: float
    image_min: float
    image_max: float
    pixel_threshold: float
    pixel_min: float
    pixel_max: float
    image_scores: np.ndarray
    pixel_maxima: np.ndarray
    pixel_quantiles: np.ndarray
    labels: np.ndarray | None = None
    images: tuple[int, ...] | None = None
    left_out: int = 0

    def __post_init__(self) -> None:
        for name in _FINITE_FIELDS:
            if not np.all(np.isfinite(np.asarray(getattr(self, name), np.float64))):
                value = getattr(self, name)
                shown = f"{value:g}" if np.ndim(value) == 0 else "not all finite"
                raise ValueError(
                    f"calibration {name} is {shown}; thresholds and normalisation ranges must "
                    "be finite numbers"
                )

    def normalize_image_scores(self, image_scores: Any) -> Any:
        """``[N]`` scores -> ``[N]`` float32 in [0, 1], the threshold at 0.5."""
        return normalize(image_scores, self.image_threshold, self.image_min, self.image_max)

    def normalize_maps(self, anomaly_maps: Any) -> Any:
        """``[N, H, W]`` maps -> float32 in [0, 1], the pixel threshold at 0.5."""
        return normalize(anomaly_maps, self.pixel_threshold, self.pixel_min, self.pixel_max)

    def decisions(self, image_scores: np.ndarray) -> np.ndarray:
        """``[N]`` bool: True for anomalous images."""
        return np.asarray(image_scores) >= self.image_threshold

    def defect_masks(self, anomaly_maps: np.ndarray) -> np.ndarray:
        """``[N, H, W]`` bool defect masks at the pixel threshold."""
        return np.asarray(anomaly_maps) >= self.pixel_threshold

    def false_alarms(self) -> tuple[int, int]:
        """(nominal calibration images scoring at or above the threshold, nominal calibration
        images): the false alarms the threshold makes on the scores it came from."""
        scores = np.asarray(self.image_scores, np.float32)
        nominal = scores if self.labels is None else scores[np.asarray(self.labels) == 0]
        return int(np.count_nonzero(self.decisions(nominal))), len(nominal)

    def expected_false_alarm_rate(self) -> float | None:
        """The share of new nominal images expected at or above the threshold (None: no
        nominal calibration image).

        A quantile ``q`` of N nominal scores (linear interpolation) lies at rank
        ``h = (N - 1) q`` among them; a new nominal score, exchangeable with them, exceeds it
        with probability about ``(N - h) / (N + 1)`` (``1 - q`` for large N, more for few
        images). An F1-optimal threshold: the share of the nominal validation images above it.
        """
        flagged, nominal = self.false_alarms()
        if not nominal:
            return None
        if self.rule == "quantile":
            return (nominal - (nominal - 1) * self.quantile) / (nominal + 1)
        return flagged / nominal

    def describe_false_alarms(self) -> str:
        """One line: the false-alarm rate to expect on nominal images at this threshold."""
        rate = self.expected_false_alarm_rate()
        if rate is None:
            return "expected false-alarm rate unknown (no nominal calibration image)"
        flagged, nominal = self.false_alarms()
        return (
            f"expected false-alarm rate {rate:.2%} ({flagged} of {nominal} nominal calibration "
            "images at or above the threshold)"
        )

    def describe(self) -> str:
        """One line: where the threshold came from."""
        how = "F1-optimal on" if self.rule == "f1" else f"{self.quantile:g} quantile of"
        source = {
            "self-excluded": "self-excluded training scores",
            "held-out": "held-out training images",
            "validation": "validation images",
        }[self.method]
        left_out = f"; {self.left_out} image(s) without a score left out" if self.left_out else ""
        return (
            f"threshold {self.image_threshold:.6g} ({how} {len(self.image_scores)} {source}"
            f"{left_out})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (arrays become lists of floats); ``left_out`` only when not 0, so the
        records of calibrations that scored every image are the same as before it existed."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "left_out" and not value:
                continue
            if isinstance(value, np.ndarray):
                value = value.tolist()
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Inverse of ``to_dict``."""
        values = dict(data)
        for name in ("image_scores", "pixel_maxima", "pixel_quantiles"):
            values[name] = np.asarray(values[name], np.float32)
        if values.get("labels") is not None:
            values["labels"] = np.asarray(values["labels"], np.int64)
        if values.get("images") is not None:
            values["images"] = tuple(int(i) for i in values["images"])
        if values["method"] not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {values['method']!r}")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What ``PatchCore.predict`` / ``Ensemble.predict`` return for N images: the raw scores and
    maps, and what the calibration decides (the keys of an exported model's outputs).

    Attributes:
      image_scores: ``[N] float32`` raw image scores (distances to the memory bank).
      anomaly_maps: ``[N, H, W] float32`` raw anomaly maps in the crop's frame.
      normalized_scores: ``[N] float32`` in [0, 1] with the threshold at 0.5
        (``Calibration.normalize_image_scores``); None without a calibration.
      decisions: ``[N] bool``, True for anomalous images (score >= the image threshold); None
        without a calibration (``calibration none``, an older model, an ensemble).
      calibration: the ``Calibration`` applied, or None.
    """

    image_scores: np.ndarray
    anomaly_maps: np.ndarray
    normalized_scores: np.ndarray | None
    decisions: np.ndarray | None
    calibration: Calibration | None

    @classmethod
    def from_scores(
        cls, image_scores: np.ndarray, anomaly_maps: np.ndarray, calibration: Calibration | None
    ) -> Prediction:
        """Raw ``image_scores`` [N] and ``anomaly_maps`` [N, H, W] with ``calibration``'s
        normalised scores and decisions (None without one)."""
        if calibration is None:
            return cls(image_scores, anomaly_maps, None, None, None)
        return cls(
            image_scores,
            anomaly_maps,
            calibration.normalize_image_scores(image_scores),
            calibration.decisions(image_scores),
            calibration,
        )


_FINITE_FIELDS = (
    "quantile",
    "image_threshold",
    "image_min",
    "image_max",
    "pixel_threshold",
    "pixel_min",
    "pixel_max",
    "image_scores",
    "pixel_maxima",
    "pixel_quantiles",
)


def calibrate(
    image_scores: np.ndarray,
    anomaly_maps: np.ndarray,
    *,
    method: str,
    quantile: float,
    labels: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    images: Any = None,
) -> Calibration:
    """Thresholds and normalisation ranges from calibration scores.

    Without defect images (``labels`` None or all 0) the image threshold is the ``quantile`` of
    the image scores and the pixel threshold the ``quantile`` of each image's maximum map value
    (so a nominal image gets an empty mask about as often as a nominal decision). With labelled
    defect images the image threshold is F1-optimal; with ``masks`` too, so is the pixel one.
    Images whose score or map is not finite are left out (``Calibration.left_out``).

    Args:
      image_scores: ``[N]``; anomaly_maps: ``[N, H, W]``; labels: ``[N]`` 0/1;
      masks: ``[N, H, W]`` bool ground truth (labelled sets only).
    Raises:
      ValueError: bad arguments, or fewer than ``MIN_SCORED_IMAGES[method]`` scored images.
    """
    from patchcore_jax import metrics

    image_scores = np.asarray(image_scores, np.float32)
    anomaly_maps = np.asarray(anomaly_maps, np.float32)
    if image_scores.ndim != 1 or len(image_scores) < 1:
        raise ValueError("calibration needs at least one image score")
    if anomaly_maps.shape[:1] != image_scores.shape:
        raise ValueError(
            f"calibration: {len(image_scores)} image scores but maps of shape {anomaly_maps.shape}"
        )
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"threshold quantile must be in (0, 1], got {quantile!r}")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if labels is not None:
        labels = np.asarray(labels, np.int64)
        if labels.shape != image_scores.shape:
            raise ValueError(f"calibration: {len(image_scores)} scores but {len(labels)} labels")
    scored = _scored_images(image_scores, anomaly_maps, method)
    left_out = len(image_scores) - int(scored.sum())
    if left_out:
        image_scores, anomaly_maps = image_scores[scored], anomaly_maps[scored]
        labels = None if labels is None else labels[scored]
        masks = None if masks is None else np.asarray(masks)[scored]
    pixel_maxima = anomaly_maps.reshape(len(anomaly_maps), -1).max(axis=1)
    defective = labels is not None and bool(np.any(labels))
    if defective:
        image_threshold, _, _ = metrics.f1_optimal_threshold(labels, image_scores)
        if masks is not None and np.any(masks):
            pixel_threshold, _, _ = metrics.f1_optimal_threshold(
                np.asarray(masks, bool).ravel(), anomaly_maps.ravel()
            )
        else:
            nominal = pixel_maxima[labels == 0] if np.any(labels == 0) else pixel_maxima
            pixel_threshold = float(np.quantile(nominal, quantile))
    else:
        image_threshold = float(np.quantile(image_scores, quantile))
        pixel_threshold = float(np.quantile(pixel_maxima, quantile))
    return Calibration(
        method=method,
        rule="f1" if defective else "quantile",
        quantile=float(quantile),
        image_threshold=float(image_threshold),
        image_min=float(image_scores.min()),
        image_max=float(image_scores.max()),
        pixel_threshold=float(pixel_threshold),
        pixel_min=float(anomaly_maps.min()),
        pixel_max=float(anomaly_maps.max()),
        image_scores=image_scores,
        pixel_maxima=pixel_maxima,
        pixel_quantiles=np.quantile(anomaly_maps, np.linspace(0, 1, NUM_PIXEL_QUANTILES)).astype(
            np.float32
        ),
        labels=labels if labels is not None else None,
        images=None if images is None else tuple(int(i) for i in images),
        left_out=left_out,
    )


def _scored_images(image_scores: np.ndarray, anomaly_maps: np.ndarray, method: str) -> np.ndarray:
    """``[N]`` bool: the images with a finite score and map. ValueError (one line, the cause)
    if fewer than ``MIN_SCORED_IMAGES[method]`` are."""
    finite_maps = np.isfinite(anomaly_maps.reshape(len(anomaly_maps), -1)).all(axis=1)
    scored = np.isfinite(image_scores) & finite_maps
    count, needed = int(scored.sum()), MIN_SCORED_IMAGES[method]
    if count < needed:
        raise ValueError(
            f"{method} calibration: {len(scored) - count} of {len(scored)} image(s) have no "
            f"finite score, leaving {count} (at least {needed} needed for a threshold): "
            f"{_NO_SCORE_CAUSE[method]}"
        )
    return scored
