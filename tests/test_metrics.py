"""metrics.py against sklearn, hand-computed PRO curves, a port of MVTec's PRO and brute force."""

from __future__ import annotations

import json
from bisect import bisect

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from patchcore_jax.metrics import (
    anomaly_pixel_auroc,
    evaluate,
    f1_optimal_threshold,
    image_auroc,
    pixel_auroc,
    pro_score,
)


def blob_masks(num_images: int, size: int, seed: int) -> np.ndarray:
    """[num_images, size, size] bool with a few random rectangles; every other image is good."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_images, size, size), dtype=bool)
    for index in range(0, num_images, 2):
        for _ in range(rng.integers(1, 4)):
            top, left = rng.integers(0, size - 8, 2)
            height, width = rng.integers(2, 9, 2)
            masks[index, top : top + height, left : left + width] = True
    return masks


def noisy_maps(masks: np.ndarray, seed: int, levels: int | None = None) -> np.ndarray:
    """Anomaly maps correlated with the masks; ``levels`` quantises them (creates ties)."""
    rng = np.random.default_rng(seed)
    maps = masks * 1.0 + rng.normal(0, 0.7, masks.shape)
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return maps.astype(np.float32)


def official_style_pro(masks, maps, fpr_limit, structure) -> float:
    """MVTec AD's compute_pro + trapezoid(x_max) algorithm, re-implemented plainly (float64)."""
    fp_change = np.zeros(masks.shape)
    pro_change = np.zeros(masks.shape)
    num_ok, num_regions = 0, 0
    for index, mask in enumerate(masks):
        labeled, count = ndimage.label(mask, structure)
        num_regions += count
        fp_change[index][labeled == 0] = 1
        num_ok += int((labeled == 0).sum())
        for k in range(1, count + 1):
            region = labeled == k
            pro_change[index][region] = 1.0 / region.sum()
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    scores = maps.ravel()[order]
    fprs = np.cumsum(fp_change.ravel()[order]) / num_ok
    pros = np.cumsum(pro_change.ravel()[order]) / num_regions
    keep = np.append(np.diff(scores) != 0, True)
    x = np.concatenate(([0.0], np.minimum(fprs[keep], 1), [1.0]))
    y = np.concatenate(([0.0], np.minimum(pros[keep], 1), [1.0]))
    correction = 0.0
    if fpr_limit not in x:
        ins = bisect(x, fpr_limit)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (fpr_limit - x[ins - 1]) / (
            x[ins] - x[ins - 1]
        )
        correction = 0.5 * (y_interp + y[ins - 1]) * (fpr_limit - x[ins - 1])
    inside = x <= fpr_limit
    x, y = x[inside], y[inside]
    return (np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction) / fpr_limit


@pytest.mark.parametrize("levels", [None, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aurocs_match_sklearn(levels, dtype):
    masks = blob_masks(10, 32, seed=1)
    maps = noisy_maps(masks, seed=2, levels=levels).astype(dtype)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, rel=1e-12)
    selected = masks.reshape(10, -1).any(axis=1)
    assert selected.sum() == 5
    expected = roc_auc_score(masks[selected].ravel(), maps[selected].ravel())
    assert anomaly_pixel_auroc(masks, maps) == pytest.approx(expected, rel=1e-12)
    labels = masks.reshape(10, -1).any(axis=1)
    scores = maps.reshape(10, -1).max(axis=1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)


def test_auroc_with_defects_in_the_majority_and_integer_scores():
    rng = np.random.default_rng(3)
    masks = rng.random((3, 20, 20)) < 0.8  # positives are the larger class
    maps = rng.integers(0, 5, masks.shape) + masks * rng.integers(0, 2, masks.shape)
    assert pixel_auroc(masks, maps) == pytest.approx(
        roc_auc_score(masks.ravel(), maps.ravel()), rel=1e-12
    )
    labels = np.array([1, 0, 1, 1, 0, 1, 1])
    scores = np.array([0.9, 0.9, 0.3, 0.5, 0.1, 0.9, 0.2])
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)
    assert image_auroc([0, 1], [0.0, 1.0]) == 1.0 and image_auroc([0, 1], [1.0, 0.0]) == 0.0
    assert image_auroc([0, 1], [0.5, 0.5]) == 0.5


def test_pro_hand_computed_step_curve():
    # One 10x10 image: region A (4 px, score 0.9), region B (2 px, score 0.5), 94 normal pixels:
    # 10 at 0.7, 84 at 0.1. Curve: (0, 1/2) -> (10/94, 1/2) -> (10/94, 1) -> (1, 1).
    mask = np.zeros((10, 10), dtype=bool)
    anomaly_map = np.full((10, 10), 0.1)
    mask[0:2, 0:2] = True
    anomaly_map[0:2, 0:2] = 0.9
    mask[5, 5:7] = True
    anomaly_map[5, 5:7] = 0.5
    anomaly_map[9, :] = 0.7
    expected = (0.5 * 10 / 94 + 1.0 * (0.3 - 10 / 94)) / 0.3
    assert pro_score(mask[None], anomaly_map[None]) == pytest.approx(expected, abs=1e-12)
    # Region B tied with the 10 normal pixels: a diagonal segment from PRO 1/2 to 1.
    anomaly_map[5, 5:7] = 0.7
    expected = (0.75 * 10 / 94 + 1.0 * (0.3 - 10 / 94)) / 0.3
    assert pro_score(mask[None], anomaly_map[None]) == pytest.approx(expected, abs=1e-12)
    # The limit inside the diagonal segment: FPR 0..10/94 spans PRO 1/2..1, cut at 0.05.
    y_cut = 0.5 + 0.5 * 0.05 / (10 / 94)
    expected = 0.5 * (0.5 + y_cut) * 0.05 / 0.05
    assert pro_score(mask[None], anomaly_map[None], fpr_limit=0.05) == pytest.approx(expected)
    assert pro_score(mask[None], anomaly_map[None], fpr_limit=1.0) == pytest.approx(
        0.75 * 10 / 94 + (1 - 10 / 94)
    )


def test_pro_regions_are_averaged_over_images_and_connectivity_matters():
    masks = np.zeros((2, 8, 8), dtype=bool)
    maps = np.zeros((2, 8, 8))
    masks[0, 1:3, 1:3] = True  # region in image 0, found at FPR 0
    maps[0, 1:3, 1:3] = 5.0
    masks[1, 4:6, 4:6] = True  # region in image 1, scored like normal pixels' lowest
    maps[1, 4:6, 4:6] = -1.0
    # Half the regions at FPR 0; the second only at FPR 1: PRO = 1/2 up to the limit.
    assert pro_score(masks, maps) == pytest.approx(0.5)
    # Two pixels touching at a corner: one region (8-connectivity, MVTec's) or two (4).
    mask = np.zeros((1, 6, 6), dtype=bool)
    mask[0, 1, 1] = mask[0, 2, 2] = True
    anomaly_map = np.zeros((1, 6, 6))
    anomaly_map[0, 1, 1] = 1.0  # one of the two pixels is found, the other is not
    anomaly_map[0, 2, 2] = -1.0
    assert pro_score(mask, anomaly_map, connectivity=8) == pytest.approx(0.5)
    assert pro_score(mask, anomaly_map, connectivity=4) == pytest.approx(0.5)
    mask[0, 1, 2] = True  # now one 3-pixel L-shape either way; 2 of 3 pixels found
    anomaly_map[0, 1, 2] = 1.0
    assert pro_score(mask, anomaly_map, connectivity=4) == pytest.approx(2 / 3)
    mask[0, 1, 2] = False  # back to two diagonal pixels; add a found third pixel apart
    anomaly_map[0, 1, 2] = 0.0
    mask[0, 4, 4] = True
    anomaly_map[0, 4, 4] = 1.0
    # 8-conn: regions {(1,1),(2,2)} half found, {(4,4)} found -> 3/4.
    # 4-conn: three regions, two found -> 2/3.
    assert pro_score(mask, anomaly_map, connectivity=8) == pytest.approx(0.75)
    assert pro_score(mask, anomaly_map, connectivity=4) == pytest.approx(2 / 3)


@pytest.mark.parametrize(("levels", "limit"), [(None, 0.3), (3, 0.3), (None, 0.05), (2, 1.0)])
def test_pro_matches_mvtec_algorithm(levels, limit):
    masks = blob_masks(8, 24, seed=4)
    maps = noisy_maps(masks, seed=5, levels=levels).astype(np.float64)
    for connectivity in (8, 4):
        structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
        expected = official_style_pro(masks, maps, limit, structure)
        assert pro_score(masks, maps, limit, connectivity) == pytest.approx(expected, abs=1e-9)


def test_pro_perfect_random_and_inverted_detectors():
    masks = blob_masks(12, 48, seed=6)
    rng = np.random.default_rng(7)
    perfect = masks + 0.5 * rng.random(masks.shape)
    assert pro_score(masks, perfect) == pytest.approx(1.0)
    assert pro_score(masks, -perfect) == pytest.approx(0.0, abs=1e-12)
    # A random detector's PRO grows like its FPR: area 0.3^2 / 2, normalised: 0.15.
    random_maps = rng.random(masks.shape)
    assert pro_score(masks, random_maps) == pytest.approx(0.15, abs=0.03)
    assert pro_score(masks, noisy_maps(masks, seed=8)) > 0.3


def brute_force_f1(labels, scores):
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        tp = np.sum(predicted & labels)
        precision = tp / predicted.sum()
        recall = tp / labels.sum()
        if tp:
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_threshold_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(40) < 0.6
    scores = np.round(labels * 0.8 + rng.normal(0, 0.6, 40), 1)  # ties included
    threshold, f1, errors = f1_optimal_threshold(labels, scores)
    assert f1 == pytest.approx(brute_force_f1(labels, scores), rel=1e-12)
    predicted = scores >= threshold
    assert errors == int(np.sum(predicted != labels))
    tp = np.sum(predicted & labels)
    assert f1 == pytest.approx(2 * tp / (predicted.sum() + labels.sum()))
    assert threshold in scores
    separable = f1_optimal_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert separable == (0.7, 1.0, 0)


def test_evaluate_returns_json_ready_metrics_consistent_with_the_parts():
    masks = blob_masks(10, 32, seed=9)
    maps = noisy_maps(masks, seed=10)
    labels = masks.reshape(10, -1).any(axis=1).astype(int)
    scores = maps.reshape(10, -1).max(axis=1)
    results = evaluate(labels, scores, masks, maps)
    json.dumps(results, allow_nan=False)
    assert results["num_images"] == 10 and results["num_defective"] == 5
    assert results["image_auroc"] == image_auroc(labels, scores)
    assert results["pixel_auroc"] == pixel_auroc(masks, maps)
    assert results["anomaly_pixel_auroc"] == anomaly_pixel_auroc(masks, maps)
    assert results["pro"] == pro_score(masks, maps)
    assert (results["f1_threshold"], results["f1"], results["num_misclassified"]) == (
        f1_optimal_threshold(labels, scores)
    )
    for key in ("image_auroc", "pixel_auroc", "anomaly_pixel_auroc", "pro", "f1", "f1_threshold"):
        assert type(results[key]) is float, key
    assert type(results["num_misclassified"]) is int

    image_only = evaluate(labels, scores)
    assert image_only["pixel_auroc"] is None and image_only["pro"] is None
    assert image_only["image_auroc"] == results["image_auroc"]
    all_good = evaluate(
        np.zeros(3, int), np.arange(3.0), np.zeros((3, 4, 4), bool), np.zeros((3, 4, 4))
    )
    json.dumps(all_good, allow_nan=False)
    assert all_good["image_auroc"] is None and all_good["f1"] is None
    assert all_good["pixel_auroc"] is None


def test_bad_inputs_are_rejected_with_clear_errors():
    masks = blob_masks(4, 16, seed=11)
    maps = noisy_maps(masks, seed=12)
    with pytest.raises(ValueError, match="maps must have shape"):
        pixel_auroc(masks, maps[:, :8])
    with pytest.raises(ValueError, match="labels must be 0/1"):
        image_auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both classes"):
        image_auroc([1, 1], [0.1, 0.2])
    nan_maps = maps.copy()
    nan_maps[1, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(masks, nan_maps)
    with pytest.raises(ValueError, match="NaN"):
        pro_score(masks, nan_maps)
    with pytest.raises(ValueError, match="no defect pixel"):
        pro_score(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="fpr_limit"):
        pro_score(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="connectivity"):
        pro_score(masks, maps, connectivity=6)
    with pytest.raises(ValueError, match="one mask per image"):
        evaluate([0, 1, 0], [0.1, 0.2, 0.3], masks, maps)
    with pytest.raises(ValueError, match="both masks and maps"):
        evaluate([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], masks, None)
