"""viz.py: the PNG shows the heatmap where the map is high, the mask outline, and is atomic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore_jax import viz

SIZE = 64


def gray_image() -> np.ndarray:
    return np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)


def hot_square(top: int, left: int) -> np.ndarray:
    """[SIZE, SIZE] map, 0 everywhere except 1 on a quarter-size square."""
    anomaly_map = np.zeros((SIZE, SIZE), dtype=np.float32)
    anomaly_map[top : top + SIZE // 2, left : left + SIZE // 2] = 1.0
    return anomaly_map


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def reddish(pixels: np.ndarray) -> np.ndarray:
    """Pixels dominated by red: jet's top end blended over gray."""
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return (red > green + 50) & (red > blue + 50)


def bluish(pixels: np.ndarray) -> np.ndarray:
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return (blue > red + 40) & (blue > green + 40)


def test_overlay_is_red_where_the_map_is_high(tmp_path):
    top_left = viz.save_anomaly_figure(
        tmp_path / "a.png",
        gray_image(),
        hot_square(0, 0),
        score=3.25,
        title="part 7",
        vmin=0.0,
        vmax=1.0,
    )
    bottom_right = viz.save_anomaly_figure(
        tmp_path / "b.png", gray_image(), hot_square(SIZE // 2, SIZE // 2), vmin=0.0, vmax=1.0
    )
    assert top_left == tmp_path / "a.png"
    first, second = read_rgb(top_left), read_rgb(bottom_right)
    assert first.shape == second.shape
    height, width, _ = first.shape
    assert 300 <= height <= 600 and 600 <= width <= 1000  # two panels side by side
    # Pixels red in one picture only belong to the overlay (the colour bar is the same).
    only_first = reddish(first) & ~reddish(second)
    only_second = reddish(second) & ~reddish(first)
    assert only_first.sum() > 2000 and only_second.sum() > 2000
    rows_first, cols_first = np.nonzero(only_first)
    rows_second, cols_second = np.nonzero(only_second)
    assert rows_first.mean() < rows_second.mean() - 50
    assert cols_first.mean() < cols_second.mean() - 50
    # The hot square of one is the cold (blue) area of the other.
    assert bluish(second)[only_first].mean() > 0.9
    assert bluish(first)[only_second].mean() > 0.9
    # The overlay is in the second panel: right of the image panel, left of the colour bar.
    assert width / 2 - 150 < cols_first.mean() < width / 2 + 150


def test_mask_outline_and_panel_are_drawn(tmp_path):
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[20:44, 10:30] = True
    anomaly_map = hot_square(0, 0)
    without = read_rgb(viz.save_anomaly_figure(tmp_path / "plain.png", gray_image(), anomaly_map))
    path = viz.save_anomaly_figure(
        tmp_path / "mask.png", gray_image(), anomaly_map, mask=mask, score=0.5
    )
    with_mask = read_rgb(path)
    assert with_mask.shape[1] > without.shape[1] + 200  # a third, ground-truth panel
    magenta = np.array([255, 0, 255])
    outline = (np.abs(with_mask - magenta) <= 40).all(axis=-1)
    assert not (np.abs(without - magenta) <= 40).all(axis=-1).any()
    assert outline.sum() > 100
    columns = np.nonzero(outline.any(axis=0))[0]
    middle = with_mask.shape[1] / 2
    assert columns.min() < middle < columns.max()  # on the overlay and on the mask panel


def test_constant_map_and_bad_inputs(tmp_path):
    path = viz.save_anomaly_figure(tmp_path / "flat.png", gray_image(), np.zeros((SIZE, SIZE)))
    assert read_rgb(path).shape[0] > 100
    with pytest.raises(ValueError, match="uint8"):
        viz.save_anomaly_figure(tmp_path / "x.png", gray_image().astype(float), hot_square(0, 0))
    with pytest.raises(ValueError, match="anomaly_map"):
        viz.save_anomaly_figure(tmp_path / "x.png", gray_image(), np.zeros((SIZE, SIZE + 1)))
    with pytest.raises(ValueError, match="mask"):
        viz.save_anomaly_figure(
            tmp_path / "x.png", gray_image(), hot_square(0, 0), mask=np.zeros((3, 3), bool)
        )
    with pytest.raises(ValueError, match="NaN"):
        viz.save_anomaly_figure(tmp_path / "x.png", gray_image(), np.full((SIZE, SIZE), np.nan))
    assert not (tmp_path / "x.png").exists()


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        viz.save_anomaly_figure(tmp_path / "no_such_dir" / "a.png", gray_image(), hot_square(0, 0))


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "heatmap.png"
    path.write_bytes(b"previous picture")

    def failing_save(self, file, **kwargs):
        Path(file).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        viz.save_anomaly_figure(path, gray_image(), hot_square(0, 0))
    assert path.read_bytes() == b"previous picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heatmap.png"]  # no temp file left
    monkeypatch.undo()
    viz.save_anomaly_figure(path, gray_image(), hot_square(0, 0))
    assert read_rgb(path).shape[0] > 100  # replaced by a complete picture


def small_calibration():
    """A calibration from 20 nominal images: image threshold 0.995 quantile of their scores,
    pixel threshold that of their maps' maxima."""
    from patchcore_jax.calibration import calibrate

    rng = np.random.default_rng(0)
    scores = rng.uniform(1.0, 2.0, 20).astype(np.float32)
    maps = rng.uniform(0.0, 1.0, (20, SIZE, SIZE)).astype(np.float32)
    return calibrate(scores, maps, method="self-excluded", quantile=0.995)


def test_calibrated_colours_are_the_calibration_normalisation_with_the_threshold_at_the_middle():
    calibration = small_calibration()
    anomaly_map = np.linspace(-1.0, 3.0, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    scale = viz.colour_scale(anomaly_map, calibration)
    np.testing.assert_array_equal(scale.positions, calibration.normalize_maps(anomaly_map))
    assert (0.5, "0.5 threshold") in scale.ticks and "threshold" in scale.caption
    # the same value has the same colour whatever the map around it
    assert viz.colour_scale(anomaly_map[:8], calibration).positions[3, 5] == scale.positions[3, 5]
    with pytest.raises(ValueError, match="vmin"):
        viz.colour_scale(anomaly_map, calibration, vmin=0.0)
    # uncalibrated: the image's own range, stated on the bar
    own = viz.colour_scale(anomaly_map)
    assert own.positions.min() == 0.0 and own.positions.max() == 1.0
    assert own.ticks == ((0.0, "-1"), (1.0, "3")) and "own range" in own.caption


def test_the_heading_states_score_normalised_score_and_decision():
    calibration = small_calibration()
    threshold = calibration.image_threshold
    for score in (float(np.float32(threshold * 0.9)), float(np.float32(threshold * 1.1))):
        (title, line) = viz.heading("part.png", score, calibration)
        normalised = float(calibration.normalize_image_scores(np.float32(score)))
        decision = "anomalous" if score >= threshold else "normal"
        assert title == "part.png"
        assert line.split() == [
            "score",
            f"{score:.6g}",
            "normalised",
            f"{normalised:.3f}",
            decision,
        ]
    assert viz.heading(None, 2.0, None) == ["score 2   uncalibrated: no decision"]


def test_the_colour_table_is_matplotlibs_jet():
    from matplotlib import colormaps

    reference = colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3]
    # both sample the same piecewise-linear segments; ours rounds once to uint8
    assert np.abs(viz.colour_map_table() - reference * 255).max() <= 0.5 + 1e-9
