"""The files a workflow writes about its results: ``scores.csv`` (predict), ``per_image.csv``
and the operating-point pictures (evaluate), ``calibration.png`` (fit), with the heatmaps and
masks they name. The columns of every CSV are listed in the README ("Output files").

Host code after scoring: arrays and paths in, files out (``workflows`` calls it on process 0).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from patchcore_jax import plots, preprocess, viz
from patchcore_jax.calibration import Calibration
from patchcore_jax.config import PatchCoreConfig
from patchcore_jax.datasets import folders
from patchcore_jax.ensemble import Ensemble
from patchcore_jax.files import write_csv
from patchcore_jax.model import PatchCore

# per_image.csv: ``anomalous`` is the calibrated decision (what a deployed model decides);
# ``f1_optimal_oracle`` the decision at the F1-optimal threshold chosen on these very labels,
# which no deployed model knows: an upper bound, never a result to report.
PER_IMAGE_COLUMNS = (
    "image", "defect_type", "label", "score", "anomalous", "f1_optimal_oracle", "heatmap"
)  # fmt: skip
SCORE_DISTRIBUTIONS = "score_distributions.png"  # evaluate: scores by defect type
ROC = "roc.png"  # evaluate: the ROC curve with the operating points
CALIBRATION_FIGURE = "calibration.png"  # fit: in the model folder


def format_score(score: float) -> str:
    """A score as text: six significant digits; -0 prints as 0 (a score is never negative),
    NaN as nan."""
    return f"{float(score) + 0.0:.6g}"


def contour_mask(path: Path, config: PatchCoreConfig) -> np.ndarray | None:
    """The ground truth beside an MVTec-layout image, for a heatmap's contour only: a mask
    that cannot be used costs the contour and a warning, never the run."""
    try:
        mask_path = folders.find_mask(path)
        if mask_path is None:
            return None
        return preprocess.load_mask(
            mask_path,
            **preprocess.image_options(config),
            image_path=path,
            threshold=config.mask_threshold,
        )
    except (ValueError, OSError) as error:
        warnings.warn(
            f"heatmap of {path} drawn without its ground-truth contour: {error}", stacklevel=2
        )
        return None


def write_predictions(
    out_dir: Path,
    model: PatchCore | Ensemble,
    paths: list[Path],
    names: list[str],
    scores: np.ndarray,
    maps: np.ndarray,
    crops: np.ndarray | None,
    masks: bool,
    progress: Callable[[int], None],
) -> None:
    """``predict``'s files: heatmaps (if ``crops``), masks, ``scores.csv``; ``progress``
    counts heatmaps.

    Args:
      scores: [N]; maps: [N, H, W]; crops: [N, H, W, 3] uint8 or None.
    """
    thresholds = model.calibration
    heatmap_files = [""] * len(paths)
    if crops is not None:
        contours = [contour_mask(path, model.config) for path in paths]
        heatmap_files = viz.save_heatmaps(
            out_dir / "heatmaps",
            names,
            paths,
            crops,
            scores,
            maps,
            contours,
            progress,
            calibration=thresholds,
        )
    mask_files = normalized = anomalous = [""] * len(paths)
    if thresholds is not None:
        normalized = [format_score(s) for s in thresholds.normalize_image_scores(scores)]
        anomalous = [int(d) for d in thresholds.decisions(scores)]
        if masks:
            mask_files = viz.save_masks(out_dir / "masks", names, thresholds.defect_masks(maps))
    columns = zip(
        paths, names, scores, normalized, anomalous, heatmap_files, mask_files, strict=True
    )
    write_csv(
        out_dir / "scores.csv",
        ["image", "name", "score", "normalized_score", "anomalous", "heatmap", "mask"],
        [[str(path), name, format_score(score), *rest] for path, name, score, *rest in columns],
    )


def write_per_image(
    out_dir: Path,
    samples: Sequence[folders.Sample],
    scores: np.ndarray,
    maps: np.ndarray,
    images: np.ndarray | None,
    masks: np.ndarray,
    f1_threshold: float | None,
    thresholds: Calibration | None,
    progress: Callable[[int], None],
) -> None:
    """``evaluate``'s ``per_image.csv`` and the heatmaps it names (if ``images``);
    ``progress`` counts heatmaps.

    Args:
      samples: the test samples scored; scores: [N]; maps: [N, H, W]; masks: [N, H, W] bool;
      images: [N, H, W, 3] uint8 crops or None (no heatmaps).
      f1_threshold: the F1-optimal threshold on these labels (None: undefined).
    """
    heatmap_files = [""] * len(samples)
    if images is not None:
        heatmap_files = viz.save_heatmaps(
            out_dir / "heatmaps",
            [f"{s.defect_type}/{s.image_path.name}" for s in samples],
            [s.image_path for s in samples],
            images,
            scores,
            maps,
            masks,
            progress,
            calibration=thresholds,
        )
    write_csv(
        out_dir / "per_image.csv",
        PER_IMAGE_COLUMNS,
        [
            [
                str(s.image_path),
                s.defect_type,
                s.label,
                format_score(score),
                "" if thresholds is None else int(score >= thresholds.image_threshold),
                "" if f1_threshold is None else int(score >= f1_threshold),
                heatmap,
            ]
            for s, score, heatmap in zip(samples, scores, heatmap_files, strict=True)
        ],
    )


def score_figures(labels: Sequence[int]) -> dict[str, str | None]:
    """metrics.json's ``figures``: the pictures ``write_score_figures`` draws, relative to the
    evaluation folder (``roc``: None when the test set lacks a class)."""
    both_classes = 0 < int(np.sum(labels)) < len(labels)
    return {"score_distributions": SCORE_DISTRIBUTIONS, "roc": ROC if both_classes else None}


def write_score_figures(
    out_dir: Path,
    figures: dict[str, str | None],
    samples: Sequence[folders.Sample],
    scores: np.ndarray,
    confusion: dict[str, dict | None],
) -> None:
    """The ``figures`` (``score_figures``) of an evaluation: the score distributions per defect
    type and the ROC curve, with the thresholds of ``confusion`` (metrics.json's: calibrated
    and F1-optimal, None where there is none).

    Args:
      samples: the test samples scored; scores: [N] their image scores.
    """
    thresholds = {name: None if c is None else c["threshold"] for name, c in confusion.items()}
    defect_types = [s.defect_type for s in samples]
    plots.save_score_distributions(
        out_dir / figures["score_distributions"], scores, defect_types, thresholds
    )
    if figures["roc"] is not None:
        labels = np.array([s.label for s in samples])
        plots.save_roc(out_dir / figures["roc"], labels, scores, thresholds)


def write_calibration_figure(model_folder: Path, thresholds: Calibration | None) -> Path | None:
    """``calibration.png`` in a saved model's folder: the calibration scores and the threshold
    (``plots.save_calibration_scores``); for a model without calibration, a picture left by an
    earlier model saved there is removed. Checkpoints ignore files they did not write, so the
    model loads as before. Returns the picture's path, or None."""
    path = Path(model_folder) / CALIBRATION_FIGURE
    if thresholds is None:
        path.unlink(missing_ok=True)
        return None
    return plots.save_calibration_scores(path, thresholds)
