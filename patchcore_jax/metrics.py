"""MVTec AD evaluation metrics (the paper's protocol), exact and memory-bounded, on the host.

- AUROCs are computed exactly as the Mann-Whitney statistic (ties count one half), which equals
  the trapezoidal area under the ROC curve that ``sklearn.metrics.roc_auc_score`` returns. Only
  the smaller class is sorted; the larger one is streamed image by image, so a full MVTec test
  set needs a few bytes per defect pixel instead of copies of every pixel.
- PRO follows MVTec AD's official evaluation code: connected components of the ground truth
  (``scipy.ndimage.label`` with the official 3x3 structure of ones, i.e. 8-connectivity;
  4-connectivity is an option), the per-region overlap averaged over all regions of all images
  against the false-positive rate over all normal pixels, one curve point per distinct score,
  trapezoid integration up to ``fpr_limit`` with linear interpolation at the limit, divided by
  ``fpr_limit``. It is exact (no threshold grid); memory is one copy of the normal pixels'
  scores plus the distinct values inside the top ``fpr_limit`` of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# Values per searchsorted call when streaming the larger class (bounds temporary memory).
_CHUNK = 1 << 20


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores.

    Args:
      labels: [N] 0/1 or bool, 1 = defective.
      scores: [N] real, higher = more anomalous.
    """
    labels = _binary(labels, "labels", ndim=1)
    scores = _real(scores, "scores", labels.shape)
    return _auroc(labels[None], scores[None])


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Full pixel AUROC over every pixel of every image.

    Args:
      masks: [N, H, W] bool, True = defect pixel.
      maps: [N, H, W] real anomaly maps.
    """
    masks, maps = _masks_and_maps(masks, maps)
    return _auroc(masks, maps)


def anomaly_pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel AUROC over the images that have at least one defect pixel (the reference's)."""
    masks, maps = _masks_and_maps(masks, maps)
    selected = masks.reshape(len(masks), -1).any(axis=1)
    return _auroc(masks[selected], maps[selected])


def pro_score(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, connectivity: int = 8
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD's AU-PRO).

    Args:
      masks: [N, H, W] bool ground truth; its connected components are the defect regions.
      maps: [N, H, W] real anomaly maps.
      fpr_limit: upper end of the false-positive-rate range, in (0, 1].
      connectivity: 8 (MVTec's official structure, the default) or 4.
    Returns:
      AU-PRO in [0, 1]; a random detector gets about ``fpr_limit / 2``.
    """
    masks, maps = _masks_and_maps(masks, maps)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    from scipy import ndimage  # a quarter second of imports that only PRO needs

    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)

    num_normal = masks.size - int(np.count_nonzero(masks))
    if num_normal == 0:
        raise ValueError("PRO needs normal pixels; every pixel of masks is a defect")
    normal_scores = np.empty(num_normal, dtype=maps.dtype)
    defect_scores, defect_weights = [], []
    num_regions, filled = 0, 0
    for mask, anomaly_map in zip(masks, maps, strict=True):
        regions, count = ndimage.label(mask, structure)
        normal = anomaly_map[~mask]
        normal_scores[filled : filled + normal.size] = normal
        filled += normal.size
        if count:
            region_of_pixel = regions[mask]
            region_sizes = np.bincount(region_of_pixel, minlength=count + 1)
            defect_scores.append(anomaly_map[mask])
            defect_weights.append(1.0 / region_sizes[region_of_pixel])
            num_regions += count
    if num_regions == 0:
        raise ValueError("PRO needs ground-truth defect regions; masks has no defect pixel")

    scores = np.concatenate(defect_scores)
    order = np.argsort(scores, kind="stable")
    defect_sorted = scores[order]
    if np.isnan(normal_scores).any() or np.isnan(defect_sorted[-1]):
        raise ValueError("maps contains NaN")
    # overlap_from[i]: summed region overlap of the defect pixels defect_sorted[i:], / regions.
    weights = np.concatenate(defect_weights)[order]
    overlap_from = np.zeros(len(weights) + 1)
    overlap_from[:-1] = np.cumsum(weights[::-1])[::-1] / num_regions

    # Normal pixels are added to the positives from the highest score down; only those until
    # the FPR first exceeds fpr_limit matter. Ties form one curve point (a diagonal segment).
    # Only the top ``needed`` normal scores (and the ties of the lowest) are sorted.
    needed = min(num_normal, math.floor(fpr_limit * num_normal) + 1)
    boundary = np.partition(normal_scores, num_normal - needed)[num_normal - needed]
    top = np.sort(normal_scores[normal_scores >= boundary])[::-1]
    starts = np.flatnonzero(np.concatenate(([True], top[1:] != top[:-1])))
    values, counts = top[starts], np.diff(np.append(starts, top.size))
    fpr_end = np.cumsum(counts) / num_normal
    fpr_start = np.concatenate(([0.0], fpr_end[:-1]))
    # Along the segment of value v the PRO goes from PRO(score > v) to PRO(score >= v).
    pro_start = overlap_from[np.searchsorted(defect_sorted, values, side="right")]
    pro_end = overlap_from[np.searchsorted(defect_sorted, values, side="left")]

    inside = fpr_end <= fpr_limit
    area = float(
        np.sum(0.5 * (pro_start[inside] + pro_end[inside]) * (fpr_end - fpr_start)[inside])
    )
    if not inside.all():
        cut = int(np.argmin(inside))  # the segment that crosses fpr_limit
        x0, x1 = fpr_start[cut], fpr_end[cut]
        y0, y1 = pro_start[cut], pro_end[cut]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_limit) * (fpr_limit - x0)
    return float(area / fpr_limit)


def anomaly_pro_score(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, connectivity: int = 8
) -> float:
    """AU-PRO over the images that have at least one defect pixel (the reference's
    ``anomaly_pro``; ``pro_score`` over all images is its ``full_pro``)."""
    masks, maps = _masks_and_maps(masks, maps)
    selected = masks.reshape(len(masks), -1).any(axis=1)
    return pro_score(masks[selected], maps[selected], fpr_limit, connectivity)


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float, int]:
    """The image-score threshold with the best F1, and the errors made at it (paper Table 1).

    Images with ``score >= threshold`` are predicted defective. Among equally good thresholds
    the lowest is returned (the first maximum of ``precision_recall_curve``).

    Args:
      labels: [N] 0/1 or bool.
      scores: [N] real.
    Returns:
      (threshold, f1, num_misclassified).
    """
    from sklearn.metrics import precision_recall_curve

    labels = _binary(labels, "labels", ndim=1)
    scores = _real(scores, "scores", labels.shape)
    if not labels.any():
        raise ValueError("F1 needs at least one defective image (label 1)")
    if np.isnan(scores).any():
        raise ValueError("scores contains NaN")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    best = int(np.argmax(f1))
    threshold = thresholds[best]
    num_misclassified = int(np.count_nonzero((scores >= threshold) != labels))
    return float(threshold), float(f1[best]), num_misclassified


def confusion_counts(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, int]:
    """Counts of ``scores >= threshold`` (predicted defective) against ``labels`` (1 = defect).

    Returns:
      {"true_positives", "false_positives", "true_negatives", "false_negatives"}.
    """
    labels = _binary(labels, "labels", ndim=1).astype(bool)
    predicted = _real(scores, "scores", labels.shape) >= threshold
    return {
        "true_positives": int(np.count_nonzero(predicted & labels)),
        "false_positives": int(np.count_nonzero(predicted & ~labels)),
        "true_negatives": int(np.count_nonzero(~predicted & ~labels)),
        "false_negatives": int(np.count_nonzero(~predicted & labels)),
    }


def evaluate(
    labels: np.ndarray,
    image_scores: np.ndarray,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
    *,
    pixel_images: np.ndarray | None = None,
    fpr_limit: float = 0.3,
    connectivity: int = 8,
) -> dict[str, Any]:
    """All MVTec AD metrics as plain floats/ints (JSON-ready); undefined ones are None.

    Args:
      labels: [N] 0/1 image labels.
      image_scores: [N] real.
      masks: [N, H, W] bool ground truth, or None (image metrics only).
      maps: [N, H, W] real anomaly maps, given together with ``masks``.
      pixel_images: [N] bool, the images whose pixels enter the pixel metrics (default all;
        False for defect images without a mask, whose pixels are unknown).
    Returns:
      {num_images, num_defective, image_auroc, f1_threshold, f1, num_misclassified,
       pixel_auroc, anomaly_pixel_auroc, pro, anomaly_pro}: ``pro`` over all images (the
      reference's full_pro), ``anomaly_pro`` over the images with defects; the pixel metrics
      are None without masks or without defect pixels, the image metrics None when only one
      class is present.
    """
    labels = _binary(labels, "labels", ndim=1)
    image_scores = _real(image_scores, "image_scores", labels.shape)
    num_defective = int(np.count_nonzero(labels))
    both_classes = 0 < num_defective < len(labels)
    results: dict[str, Any] = {
        "num_images": len(labels),
        "num_defective": num_defective,
        "image_auroc": image_auroc(labels, image_scores) if both_classes else None,
        "f1_threshold": None,
        "f1": None,
        "num_misclassified": None,
        "pixel_auroc": None,
        "anomaly_pixel_auroc": None,
        "pro": None,
        "anomaly_pro": None,
    }
    if num_defective:
        threshold, f1, errors = f1_optimal_threshold(labels, image_scores)
        results.update(f1_threshold=threshold, f1=f1, num_misclassified=errors)
    if (masks is None) != (maps is None):
        raise ValueError("evaluate: give both masks and maps, or neither")
    if masks is not None:
        masks, maps = _masks_and_maps(masks, maps)
        if len(masks) != len(labels):
            raise ValueError(
                f"evaluate: {len(labels)} labels but {len(masks)} masks; one mask per image"
            )
        if pixel_images is not None:
            pixel_images = _binary(pixel_images, "pixel_images", ndim=1).astype(bool)
            if pixel_images.shape != labels.shape:
                raise ValueError(f"evaluate: pixel_images must be [{len(labels)}] booleans")
            masks, maps = masks[pixel_images], maps[pixel_images]
        num_defect_pixels = int(np.count_nonzero(masks))
        if 0 < num_defect_pixels < masks.size:
            results.update(
                pixel_auroc=pixel_auroc(masks, maps),
                anomaly_pixel_auroc=anomaly_pixel_auroc(masks, maps),
                pro=pro_score(masks, maps, fpr_limit, connectivity),
                anomaly_pro=anomaly_pro_score(masks, maps, fpr_limit, connectivity),
            )
    return results


def missing_metric_reasons(results: dict[str, Any]) -> list[str]:
    """Why the metrics that ``evaluate`` left as None are undefined, one sentence each."""
    reasons = []
    num_good = results["num_images"] - results["num_defective"]
    if results["image_auroc"] is None:
        reasons.append(
            "image AUROC needs good and defective test images; found "
            f"{num_good} good and {results['num_defective']} defective"
        )
    if results["pixel_auroc"] is None:
        reasons.append(
            "pixel metrics need ground-truth masks with defect pixels and defect-free pixels"
        )
    return reasons


def _auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Exact AUROC of ``scores`` [R, ...] with classes ``positive`` [R, ...], row by row.

    Sorts the smaller class; for each value v of the larger class counts the smaller-class
    values below v (twice) and equal to v (once), which sums to twice the Mann-Whitney count.
    """
    num_positive = int(np.count_nonzero(positive))
    num_negative = positive.size - num_positive
    if num_positive == 0 or num_negative == 0:
        raise ValueError(
            f"AUROC needs both classes; got {num_positive} positive and {num_negative} negative"
        )
    small_is_positive = num_positive <= num_negative
    small = np.empty(min(num_positive, num_negative), dtype=scores.dtype)
    filled = 0
    for row_class, row_scores in zip(positive, scores, strict=True):
        values = row_scores[row_class == small_is_positive]
        small[filled : filled + values.size] = values
        filled += values.size
    small.sort()
    if np.isnan(small[-1]):
        raise ValueError("scores contain NaN")
    twice_count_below = 0  # sum over larger-class v of 2 * #(small < v) + #(small == v)
    for row_class, row_scores in zip(positive, scores, strict=True):
        values = row_scores[row_class != small_is_positive]
        for start in range(0, values.size, _CHUNK):
            # Sorted, the binary searches walk ``small`` in order: several times faster.
            chunk = np.sort(values[start : start + _CHUNK])
            if np.isnan(chunk[-1]):  # NaN sorts last
                raise ValueError("scores contain NaN")
            twice_count_below += int(np.searchsorted(small, chunk, side="left").sum())
            twice_count_below += int(np.searchsorted(small, chunk, side="right").sum())
    twice_pairs = 2 * num_positive * num_negative
    if small_is_positive:  # counted positives below negatives: the complement of the AUROC
        return (twice_pairs - twice_count_below) / twice_pairs
    return twice_count_below / twice_pairs


def _binary(labels: Any, name: str, ndim: int) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must be 0/1 or bool, got values {np.unique(array)[:5]}")
        array = array.astype(bool)
    return array


def _real(values: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(values)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must be real numbers, got dtype {array.dtype}")
    return array


def _masks_and_maps(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    masks = _binary(masks, "masks", ndim=3)
    maps = _real(maps, "maps", masks.shape)
    return masks, maps


def report_lines(report: dict[str, Any]) -> list[str]:
    """An evaluation report as aligned text lines: the numbers, the confusion counts at each
    threshold, the image AUROC per defect type (what ``patchcore-jax evaluate`` prints)."""
    lines = [
        f"{key:>28s}: {value:.4f}" if isinstance(value, float) else f"{key:>28s}: {value}"
        for key, value in report.items()
        if isinstance(value, float | int) and not isinstance(value, bool)
    ]
    for name, counts in report["confusion"].items():
        if counts is not None:
            lines.append(
                f"{name + ' threshold':>28s}: {counts['threshold']:.6g}  "
                f"TP {counts['true_positives']}  FP {counts['false_positives']}  "
                f"TN {counts['true_negatives']}  FN {counts['false_negatives']}"
            )
    if report["per_defect_type"]:
        lines.append(f"{'image AUROC by defect type':>28s}:")
        for defect_type, values in report["per_defect_type"].items():
            auroc = values["image_auroc"]
            lines.append(f"{defect_type:>28s}: " + ("n/a" if auroc is None else f"{auroc:.4f}"))
    return lines


def evaluate_per_defect_type(
    defect_types: Sequence[str],
    labels: np.ndarray,
    image_scores: np.ndarray,
    masks: np.ndarray,
    anomaly_maps: np.ndarray,
    pixel_images: np.ndarray,
) -> dict[str, dict[str, Any]]:
    """``evaluate`` of each defect type (of the defective images, labels 1) against the good
    images: ``{type: metrics}``, types sorted."""
    kinds = np.asarray(defect_types)
    names = sorted({kind for kind, label in zip(defect_types, labels, strict=True) if label})
    results = {}
    for name in names:
        subset = (labels == 0) | (kinds == name)
        results[name] = evaluate(
            labels[subset],
            image_scores[subset],
            masks[subset],
            anomaly_maps[subset],
            pixel_images=pixel_images[subset],
        )
    return results
