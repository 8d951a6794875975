"""Pictures of the operating point: where the thresholds fall among the scores.

- ``save_score_distributions``: the image scores of the good images and of each defect type,
  with the calibrated and the F1-optimal thresholds (``evaluate``).
- ``save_roc``: the ROC curve of the image scores with both thresholds' operating points
  (false-positive rate, true-positive rate) marked (``evaluate``).
- ``save_calibration_scores``: the calibration images' scores and the threshold drawn from them,
  with the false-alarm rate it implies (``fit``).

The calibrated threshold (a quantile of nominal scores) needs no defect image; the F1-optimal
one is chosen on the test labels (an oracle). The pictures show the trade-off between them.
matplotlib is imported only when a picture is drawn, and only its object-oriented API (Figure +
Agg canvas): no pyplot, no global backend switch. Files are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from patchcore_jax import metrics
from patchcore_jax.files import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from patchcore_jax.calibration import Calibration

# Each threshold's colour and line style, the same in every picture.
THRESHOLD_STYLES = {
    "calibrated": {"color": "#d62728", "linestyle": "-"},
    "f1_optimal": {"color": "#2ca02c", "linestyle": "--"},
}
THRESHOLD_NAMES = {
    "calibrated": "calibrated",
    "f1_optimal": "F1-optimal on these labels (oracle)",
}
_DPI = 100


def operating_point(
    labels: np.ndarray, scores: np.ndarray, threshold: float
) -> tuple[float, float]:
    """(false-positive rate, true-positive rate) of ``scores >= threshold`` against ``labels``
    [N] 0/1; NaN where a class is absent."""
    counts = metrics.confusion_counts(labels, scores, threshold)
    negatives = counts["false_positives"] + counts["true_negatives"]
    positives = counts["true_positives"] + counts["false_negatives"]
    fpr = counts["false_positives"] / negatives if negatives else float("nan")
    tpr = counts["true_positives"] / positives if positives else float("nan")
    return fpr, tpr


def save_score_distributions(
    path: str | os.PathLike,
    scores: np.ndarray,
    defect_types: Sequence[str],
    thresholds: Mapping[str, float | None],
) -> Path:
    """One row of dots per defect type (``good`` first): each image's score, with the
    ``thresholds`` (``calibrated``, ``f1_optimal``; None: not drawn) as vertical lines.

    Args:
      scores: [N] image scores; defect_types: [N] (``good`` for nominal images).
    """
    scores = np.asarray(scores, np.float64)
    types = sorted(set(defect_types), key=lambda name: (name != "good", name))
    figure, axis = _figure(width=7.0, height=1.2 + 0.45 * len(types))
    jitter = np.random.default_rng(0).uniform(-0.18, 0.18, len(scores))  # fixed: same picture
    for row, name in enumerate(types):
        chosen = np.array([t == name for t in defect_types])
        axis.scatter(
            scores[chosen],
            row + jitter[chosen],
            s=14,
            color="#1f77b4" if name == "good" else "#ff7f0e",
            alpha=0.8,
        )
    axis.set_yticks(range(len(types)), [f"{n} ({defect_types.count(n)})" for n in types])
    axis.set_ylim(len(types) - 0.5, -0.5)
    _threshold_lines(axis, thresholds)
    axis.set_xlabel("image score")
    axis.set_title("image scores by defect type", fontsize=10)
    axis.legend(fontsize=8, loc="best")
    return _save(figure, path)


def save_roc(
    path: str | os.PathLike,
    labels: np.ndarray,
    scores: np.ndarray,
    thresholds: Mapping[str, float | None],
) -> Path:
    """The ROC curve of image ``scores`` against ``labels`` [N] 0/1 (both classes needed),
    each threshold's operating point marked and named with its rates."""
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels)
    false_positive_rates, true_positive_rates, _ = roc_curve(labels, scores)
    figure, axis = _figure(width=5.0, height=4.6)
    axis.plot(false_positive_rates, true_positive_rates, color="#1f77b4", linewidth=1.5)
    axis.plot([0, 1], [0, 1], color="#bbbbbb", linewidth=0.8, linestyle=":")
    for name, threshold in thresholds.items():
        if threshold is None:
            continue
        fpr, tpr = operating_point(labels, scores, threshold)
        style = THRESHOLD_STYLES[name]
        axis.plot(
            [fpr],
            [tpr],
            marker="o" if name == "calibrated" else "s",
            markersize=8,
            color=style["color"],
            linestyle="none",
            label=f"{THRESHOLD_NAMES[name]}: {threshold:.4g}\n"
            f"false alarms {fpr:.0%}, defects caught {tpr:.0%}",
        )
    axis.set_xlim(-0.02, 1.02)
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("false-positive rate (good images flagged)")
    axis.set_ylabel("true-positive rate (defects caught)")
    axis.set_title("ROC of the image scores", fontsize=10)
    axis.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def save_calibration_scores(path: str | os.PathLike, calibration: Calibration) -> Path:
    """A histogram of the calibration images' scores (nominal and, for a labelled validation
    set, defective) with the image threshold and the false-alarm rate it implies."""
    scores = np.asarray(calibration.image_scores, np.float64)
    labels = np.zeros(len(scores), int) if calibration.labels is None else calibration.labels
    figure, axis = _figure(width=6.0, height=3.6)
    bins = np.histogram_bin_edges(scores, bins=min(40, max(10, len(scores) // 4)))
    axis.hist(scores[labels == 0], bins=bins, color="#1f77b4", alpha=0.8, label="nominal")
    if np.any(labels == 1):
        axis.hist(scores[labels == 1], bins=bins, color="#ff7f0e", alpha=0.7, label="defective")
    _threshold_lines(axis, {"calibrated": calibration.image_threshold})
    axis.set_xlabel("image score")
    axis.set_ylabel("calibration images")
    axis.set_title(f"{calibration.describe()}\n{calibration.describe_false_alarms()}", fontsize=8)
    axis.legend(fontsize=8)
    return _save(figure, path)


def _threshold_lines(axis, thresholds: Mapping[str, float | None]) -> None:
    for name, threshold in thresholds.items():
        if threshold is not None:
            axis.axvline(
                threshold,
                linewidth=1.5,
                label=f"{THRESHOLD_NAMES[name]} threshold {threshold:.4g}",
                **THRESHOLD_STYLES[name],
            )


def _figure(width: float, height: float) -> tuple[Figure, object]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as file:
            figure.savefig(file, format="png", dpi=_DPI, metadata={"Software": None})
    return path
