"""Heatmap pictures for inspection: the image, the anomaly map over it, the ground truth.

Drawn with numpy and Pillow (a colour-map lookup table, a blend, a few lines of text), not one
matplotlib figure per image: a heatmap costs milliseconds, so drawing them all stays a small
part of ``evaluate`` and ``predict`` (``benchmarks/results/heatmaps.md``).

The colour of a pixel depends on that pixel's map value and the model only, never on the other
images drawn in the same call, so one image's heatmap is the same file in every call:

- a calibrated model: the calibration's map normalisation (``Calibration.normalize_maps``,
  ``clip((value - pixel_threshold) / (pixel_max - pixel_min) + 0.5, 0, 1)``): the middle of the
  colour bar (0.5, marked ``threshold``) is the pixel threshold of the defect masks; blue is
  nominal, red far above the threshold.
- an uncalibrated model (fitted with calibration ``none``, or an ensemble): the image's own map
  range in raw units (its minimum blue, its maximum red), stated on the bar: it shows where the
  image is most anomalous, not whether it is (there is no threshold to compare with). An
  ensemble's maps are themselves normalised over the scored set (``ensemble``), so its
  pictures still change with the other images.

Each picture's heading gives the image, its score and, when calibrated, its normalised score
and decision.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from patchcore_jax import interrupt
from patchcore_jax.files import OUTPUT_MARKER, atomic_path

if TYPE_CHECKING:
    from patchcore_jax.calibration import Calibration

HEATMAP_ALPHA = 0.5
# matplotlib's ``jet`` (its segment data), sampled at 256 levels as matplotlib samples it.
_JET = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}
# Magenta never occurs in the jet colour map, so the ground-truth outline stays visible on it.
CONTOUR_COLOR = (255, 0, 255)
_GROUND_TRUTH_ALPHA = 0.35
_MIN_PANEL = 200  # smaller images are enlarged (nearest neighbour) by a whole factor
_MARGIN, _GAP, _BAR_WIDTH, _BAR_LABELS = 10, 10, 14, 86
_HEADING, _PANEL_TITLE, _CAPTION = 40, 18, 20
_FONT_SIZE = 12
# zlib level 1: a heatmap encodes 2-3x faster than at Pillow's default 6, ~7% larger.
_PNG_COMPRESSION = 1


def colour_map_table() -> np.ndarray:
    """[256, 3] uint8: matplotlib's ``jet`` colour map (blue 0 -> red 1)."""
    levels = np.linspace(0.0, 1.0, 256)
    channels = [np.interp(levels, *np.array(_JET[name]).T) for name in ("red", "green", "blue")]
    return np.round(np.stack(channels, axis=-1) * 255).astype(np.uint8)


_TABLE = colour_map_table()


@dataclass(frozen=True)
class ColourScale:
    """How map values become colours: ``positions`` in [0, 1] (0 blue, 1 red) and what the
    colour bar says about them (``ticks``: (position, label) pairs; ``caption``)."""

    positions: np.ndarray  # [H, W] float32 in [0, 1]
    ticks: tuple[tuple[float, str], ...]
    caption: str


def colour_scale(
    anomaly_map: np.ndarray,
    calibration: Calibration | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> ColourScale:
    """The colours of ``anomaly_map`` [H, W]: the calibration's normalisation (threshold at
    0.5), or raw values from ``vmin`` to ``vmax`` (default: the map's own range)."""
    if calibration is not None:
        if vmin is not None or vmax is not None:
            raise ValueError("vmin / vmax are for uncalibrated maps; a calibration fixes colours")
        positions = np.asarray(calibration.normalize_maps(anomaly_map), np.float32)
        ticks = ((0.0, "0"), (0.5, "0.5 threshold"), (1.0, "1"))
        caption = (
            f"colour: normalised anomaly; 0.5 = pixel threshold "
            f"{calibration.pixel_threshold:.4g} (raw)"
        )
        return ColourScale(positions, ticks, caption)
    low = float(np.min(anomaly_map)) if vmin is None else float(vmin)
    high = float(np.max(anomaly_map)) if vmax is None else float(vmax)
    span = high - low if high > low else 1.0  # a constant map: any range shows one colour
    positions = np.clip((anomaly_map - low) / span, 0.0, 1.0).astype(np.float32)
    whose = "this image's own range" if vmin is None and vmax is None else "a given range"
    caption = f"colour: raw anomaly, {whose} (uncalibrated: no threshold)"
    return ColourScale(positions, ((0.0, f"{low:.4g}"), (1.0, f"{high:.4g}")), caption)


def heading(title: str | None, score: float | None, calibration: Calibration | None) -> list[str]:
    """The lines above a heatmap: ``title``; the score and, when calibrated, the normalised
    score and the decision."""
    lines = [title] if title else []
    if score is not None:
        parts = [f"score {score:.6g}"]
        if calibration is None:
            parts.append("uncalibrated: no decision")
        else:
            normalised = float(calibration.normalize_image_scores(np.float32(score)))
            anomalous = bool(calibration.decisions(np.asarray([score], np.float32))[0])
            parts += [f"normalised {normalised:.3f}", "anomalous" if anomalous else "normal"]
        lines.append("   ".join(parts))
    return lines


def save_anomaly_figure(
    path: str | os.PathLike,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    score: float | None = None,
    title: str | None = None,
    calibration: Calibration | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Writes one PNG: the image | heatmap overlay (+ ground-truth outline) and colour bar |
    ground truth.

    The overlay blends the ``jet`` colour of each map value over the image (alpha 0.5); the
    colours follow ``colour_scale`` (``calibration``'s normalisation, else raw values from
    ``vmin`` to ``vmax``, by default the map's own range). With ``mask`` the defect outline is
    drawn in magenta on the overlay and a third panel shows the ground truth. The heading says
    ``title`` and ``heading``'s score line. Written to a temporary file beside ``path`` and
    renamed, so an existing file is replaced only by a complete picture.

    Args:
      path: output .png file; its folder must exist.
      image: [H, W, 3] uint8, the preprocessed crop.
      anomaly_map: [H, W] real, higher = more anomalous.
      mask: [H, W] bool ground truth, or None.
    Returns:
      ``path`` as a Path.
    """
    path = Path(path)
    image, anomaly_map, mask = _check_inputs(image, anomaly_map, mask)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    scale = colour_scale(anomaly_map, calibration, vmin, vmax)
    picture = _compose(image, scale, mask, heading(title, score, calibration))
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG", compress_level=_PNG_COMPRESSION)
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
    *,
    calibration: Calibration | None,
) -> list[str]:
    """One heatmap PNG per image under ``out_dir`` (named after ``names``), each drawn on its
    own (``save_anomaly_figure`` with ``calibration``, None for an uncalibrated model), with
    its ``masks`` contour (None: none); ``progress`` counts images. Returns the paths relative
    to ``out_dir.parent``.

    Args:
      images: [N, H, W, 3] uint8 crops; scores: [N]; maps: [N, H, W].
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / OUTPUT_MARKER).touch()  # never read back as data, wherever it is written
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
            calibration=calibration,
        )
        written.append(target.relative_to(out_dir.parent).as_posix())
        if progress is not None:
            progress(1)
        interrupt.check()
    return written


def save_masks(out_dir: Path, names: Sequence[str], masks: np.ndarray) -> list[str]:
    """Binary defect masks [N, H, W] as PNGs (255 = defect) named like the heatmaps; returns
    their paths relative to ``out_dir.parent``."""
    written = []
    for name, mask in zip(png_names(names), masks, strict=True):
        target = out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        written.append(target.relative_to(out_dir.parent).as_posix())
    return written


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=_FONT_SIZE)


def _blend(base: np.ndarray, colour: np.ndarray, alpha: float | np.ndarray) -> np.ndarray:
    """``(1 - alpha) * base + alpha * colour``, rounded to uint8."""
    mixed = (1.0 - alpha) * base.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.round(mixed).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """[H, W] bool: the pixels of ``mask`` next to a pixel outside it, two pixels thick."""
    padded = np.pad(mask, 2, constant_values=False)
    inner = mask.copy()
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1), (-2, 0), (2, 0), (0, -2), (0, 2)):
        inner &= padded[2 + dy : 2 + dy + mask.shape[0], 2 + dx : 2 + dx + mask.shape[1]]
    return mask & ~inner


def _panels(
    image: np.ndarray, positions: np.ndarray, mask: np.ndarray | None
) -> list[tuple[str, np.ndarray]]:
    """(title, [h, w, 3] uint8) panels at display size: image, overlay, ground truth."""
    factor = max(1, -(-_MIN_PANEL // max(image.shape[:2])))  # a whole factor, nearest
    defect_pixels = 0 if mask is None else int(mask.sum())
    if factor > 1:
        image = image.repeat(factor, axis=0).repeat(factor, axis=1)
        positions = positions.repeat(factor, axis=0).repeat(factor, axis=1)
        mask = None if mask is None else mask.repeat(factor, axis=0).repeat(factor, axis=1)
    colours = _TABLE[np.round(positions * 255).astype(np.intp)]
    overlay = _blend(image, colours, HEATMAP_ALPHA)
    if mask is None:
        return [("image", image), ("anomaly map", overlay)]
    outline = _outline(mask)
    overlay[outline] = CONTOUR_COLOR
    truth = image.copy()
    truth[mask] = _blend(image[mask], np.array(CONTOUR_COLOR), _GROUND_TRUTH_ALPHA)
    truth[outline] = CONTOUR_COLOR
    return [
        ("image", image),
        ("anomaly map, ground truth", overlay),
        (f"ground truth ({defect_pixels} px)", truth),
    ]


def _compose(
    image: np.ndarray, scale: ColourScale, mask: np.ndarray | None, lines: list[str]
) -> Image.Image:
    """The picture: heading, panels (the colour bar right of the overlay), caption."""
    panels = _panels(image, scale.positions, mask)
    font = _font()
    height, width = panels[0][1].shape[:2]
    bar_space = _BAR_WIDTH + _BAR_LABELS
    lefts, left = [], _MARGIN
    for index in range(len(panels)):
        lefts.append(left)
        left += width + _GAP + (bar_space if index == 1 else 0)
    text_width = max([font.getlength(line) for line in [*lines, scale.caption]] + [0.0])
    canvas_width = max(left - _GAP + _MARGIN, int(text_width) + 2 * _MARGIN)
    top = _MARGIN + _HEADING + _PANEL_TITLE
    canvas = Image.new("RGB", (canvas_width, top + height + _CAPTION + _MARGIN), "white")
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((_MARGIN, _MARGIN + row * (_FONT_SIZE + 6)), line, fill="black", font=font)
    for (name, pixels), x in zip(panels, lefts, strict=True):
        canvas.paste(Image.fromarray(pixels), (x, top))
        draw.text((x, top - _PANEL_TITLE + 2), name, fill="black", font=font)
    _draw_colour_bar(draw, lefts[1] + width + 6, top, height, scale, font)
    draw.text((_MARGIN, top + height + 5), scale.caption, fill="black", font=font)
    return canvas


def _draw_colour_bar(
    draw: ImageDraw.ImageDraw, left: int, top: int, height: int, scale: ColourScale, font
) -> None:
    """The colour bar (1 at the top) with its tick labels; a line across it at each tick."""
    rows = np.linspace(1.0, 0.0, height)
    for row, position in enumerate(rows):
        colour = tuple(int(c) for c in _TABLE[int(round(position * 255))])
        draw.line([(left, top + row), (left + _BAR_WIDTH - 1, top + row)], fill=colour)
    for position, label in scale.ticks:
        y = top + round((1.0 - position) * (height - 1))
        draw.line([(left, y), (left + _BAR_WIDTH + 3, y)], fill="black")
        text_top = min(max(y - _FONT_SIZE // 2, top - 4), top + height - _FONT_SIZE)
        draw.text((left + _BAR_WIDTH + 6, text_top), label, fill="black", font=font)


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
