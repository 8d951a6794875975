"""Heatmap pictures for inspection: the image, the anomaly map over it, the ground truth.

matplotlib is imported only when a figure is drawn, and only its object-oriented API (Figure +
Agg canvas) is used: no pyplot, no global backend switch, safe in scripts and servers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from patchcore_jax import interrupt
from patchcore_jax.files import OUTPUT_MARKER, atomic_path

HEATMAP_CMAP = "jet"
HEATMAP_ALPHA = 0.5
# Magenta never occurs in the jet colour map, so the ground-truth outline stays visible on it.
CONTOUR_COLOR = "#ff00ff"
_PANEL_INCHES = 3.4
_DPI = 100


def save_anomaly_figure(
    path: str | os.PathLike,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    score: float | None = None,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Writes one PNG: the image | heatmap overlay (+ ground-truth outline) | ground truth.

    The overlay blends the ``jet`` colour map of ``anomaly_map`` over the image (alpha 0.5)
    with a colour bar; ``vmin``/``vmax`` fix the colour scale (pass the min and max over a
    test set so pictures are comparable), by default the map's own range. With ``mask`` the
    defect outline is drawn in magenta on the overlay and a third panel shows the ground truth.
    The file is written to a temporary file beside ``path`` and renamed, so an existing file is
    replaced only by a complete picture.

    Args:
      path: output .png file; its folder must exist.
      image: [H, W, 3] uint8, the preprocessed crop.
      anomaly_map: [H, W] real, higher = more anomalous.
      mask: [H, W] bool ground truth, or None.
      score: image score, shown in the title.
      title: text shown above the panels (e.g. the image file).
    Returns:
      ``path`` as a Path.
    """
    path = Path(path)
    image, anomaly_map, mask = _check_inputs(image, anomaly_map, mask)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    low = float(np.min(anomaly_map)) if vmin is None else float(vmin)
    high = float(np.max(anomaly_map)) if vmax is None else float(vmax)
    if high <= low:  # a constant map: any non-empty range shows it as one colour
        high = low + 1.0

    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure

    num_panels = 2 if mask is None else 3
    # Panels of equal size; the colour bar gets its own narrow column right of the overlay.
    width_ratios = [1.0, 1.0, 0.05] + ([1.0] if mask is not None else [])
    figure = Figure(
        figsize=(_PANEL_INCHES * num_panels + 0.9, _PANEL_INCHES + 0.6),
        dpi=_DPI,
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    axes = list(figure.subplots(1, len(width_ratios), width_ratios=width_ratios))
    colorbar_axis = axes.pop(2)
    norm = Normalize(vmin=low, vmax=high)
    cmap = colormaps[HEATMAP_CMAP]

    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title("image", fontsize=10)

    axes[1].imshow(image, interpolation="nearest")
    axes[1].imshow(anomaly_map, cmap=cmap, norm=norm, alpha=HEATMAP_ALPHA, interpolation="nearest")
    axes[1].set_title("anomaly map" if mask is None else "anomaly map, ground truth", fontsize=10)
    colorbar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=colorbar_axis)
    colorbar.ax.tick_params(labelsize=8)

    if mask is not None:
        _draw_outline(axes[1], mask)
        axes[2].imshow(image, interpolation="nearest")
        fill = ListedColormap([CONTOUR_COLOR])
        axes[2].imshow(
            np.ma.masked_where(~mask, mask), cmap=fill, alpha=0.35, interpolation="nearest"
        )
        _draw_outline(axes[2], mask)
        axes[2].set_title(f"ground truth ({int(mask.sum())} px)", fontsize=10)

    for axis in axes:
        axis.set_axis_off()
    heading = [title] if title else []
    if score is not None:
        heading.append(f"score {score:.4g}")
    if heading:
        figure.suptitle("   ".join(heading), fontsize=10)

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as file:
            figure.savefig(file, format="png", dpi=_DPI)
    return path


def png_names(names: Sequence[str]) -> list[str]:
    """``x.jpg`` -> ``x.png``; the full name plus ``.png`` where that would clash."""
    stems = [str(Path(name).with_suffix(".png")) for name in names]
    return [
        stem if stems.count(stem) == 1 else f"{name}.png"
        for stem, name in zip(stems, names, strict=True)
    ]


def save_heatmaps(
    out_dir: Path,
    names: Sequence[str],
    paths: Sequence[Path],
    images: np.ndarray,
    scores: np.ndarray,
    maps: np.ndarray,
    masks: Sequence[np.ndarray | None],
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """One heatmap PNG per image under ``out_dir`` (named after ``names``), colour scale shared
    over the set (min-max of all maps), each with its ``masks`` contour (None: none);
    ``progress`` counts images. Returns the paths relative to ``out_dir.parent``.

    Args:
      images: [N, H, W, 3] uint8 crops; scores: [N]; maps: [N, H, W].
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / OUTPUT_MARKER).touch()  # never read back as data, wherever it is written
    vmin, vmax = float(np.min(maps)), float(np.max(maps))
    written = []
    for index, (name, path) in enumerate(zip(png_names(names), paths, strict=True)):
        target = out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        save_anomaly_figure(
            target,
            images[index],
            maps[index],
            mask=masks[index],
            score=float(scores[index]),
            title=str(path),
            vmin=vmin,
            vmax=vmax,
        )
        written.append(target.relative_to(out_dir.parent).as_posix())
        if progress is not None:
            progress(1)
        interrupt.check()
    return written


def save_masks(out_dir: Path, names: Sequence[str], masks: np.ndarray) -> list[str]:
    """Binary defect masks [N, H, W] as PNGs (255 = defect) named like the heatmaps; returns
    their paths relative to ``out_dir.parent``."""
    from PIL import Image

    written = []
    for name, mask in zip(png_names(names), masks, strict=True):
        target = out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        written.append(target.relative_to(out_dir.parent).as_posix())
    return written


def _draw_outline(axis, mask: np.ndarray) -> None:
    if mask.any():
        axis.contour(mask.astype(np.float32), levels=[0.5], colors=CONTOUR_COLOR, linewidths=1.5)


def _check_inputs(
    image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    image = np.asarray(image)
    anomaly_map = np.asarray(anomaly_map)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
    if anomaly_map.shape != image.shape[:2]:
        raise ValueError(
            f"anomaly_map must have the image's size {image.shape[:2]}, got {anomaly_map.shape}"
        )
    if not np.isfinite(anomaly_map).all():
        raise ValueError("anomaly_map contains NaN or infinite values")
    anomaly_map = anomaly_map.astype(np.float32)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask must have the image's size {image.shape[:2]}, got {mask.shape}")
        mask = mask.astype(bool)
    return image, anomaly_map, mask
