"""reports.py: the files predict, evaluate and fit write about their results (heatmaps on a
fixed scale, per_image.csv's columns, the operating-point pictures, the calibration picture),
through the workflows that write them, on conftest's subset of MVTec AD bottle at 128x128."""

import copy
import csv
import json

import numpy as np
import pytest
from PIL import Image

from patchcore_jax import PatchCoreConfig, checkpoint, plots, reports, viz, workflows

CONFIG = PatchCoreConfig(
    backbone="mobilenet_v2", resize=128, crop=128, sampler="identity", coreset_fraction=0.05
)


@pytest.fixture(scope="module")
def calibrated_model(subset):
    """A quick self-excluded-calibrated model on 3 of the subset's training images."""
    model = workflows.build_model(CONFIG, 3)
    return workflows.fit_model(model, sorted((subset / "train/good").iterdir())[:3])


def uncalibrated(model):
    """``model`` without its calibration (the same bank): as fitted with calibration none."""
    copied = copy.copy(model)
    copied.calibration = None
    return copied


def read_rgb(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def overlay_and_image(picture, size):
    """The image panel and the overlay panel of a heatmap picture (``viz``'s layout), at the
    model's resolution (the panels enlarge each pixel by a whole factor)."""
    factor = max(1, -(-viz._MIN_PANEL // size))
    top = viz._MARGIN + viz._HEADING + viz._PANEL_TITLE
    panel = size * factor
    image = picture[top : top + panel : factor, viz._MARGIN : viz._MARGIN + panel : factor]
    left = viz._MARGIN + panel + viz._GAP
    overlay = picture[top : top + panel : factor, left : left + panel : factor]
    return image, overlay


@pytest.mark.parametrize("calibrated", [True, False], ids=["calibrated", "uncalibrated"])
def test_a_heatmap_is_the_same_file_whatever_else_predict_draws_with_it(
    calibrated, calibrated_model, subset, tmp_path
):
    model = calibrated_model if calibrated else uncalibrated(calibrated_model)
    good = subset / "test/good"
    workflows.predict_files(model, [good / "000.png"], tmp_path / "alone")
    companions = [good / "001.png", subset / "test/broken_large", good / "000.png"]
    result = workflows.predict_files(model, companions, tmp_path / "together")
    assert result.names == ["001.png", "broken_large/000.png", "000.png"]
    alone = (tmp_path / "alone/heatmaps/000.png").read_bytes()
    assert alone == (tmp_path / "together/heatmaps/000.png").read_bytes()


def test_a_lone_normal_image_is_drawn_in_the_calibrated_colours_not_at_defect_colour(
    calibrated_model, subset, tmp_path
):
    path = subset / "test/good/000.png"
    workflows.predict_files(calibrated_model, [path], tmp_path / "p")
    _, maps, _ = workflows.score_files(calibrated_model, [path], progress=lambda *a: None)
    positions = calibrated_model.calibration.normalize_maps(maps[0])
    expected = viz.colour_map_table()[np.round(positions * 255).astype(int)]
    image, overlay = overlay_and_image(read_rgb(tmp_path / "p/heatmaps/000.png"), 128)
    # overlay = round(image / 2 + colour / 2), so 2 * overlay - image is the colour +- 1.
    assert np.abs(2 * overlay - image - expected).max() <= 1
    # The old per-call min-max scale drew a lone image's maximum at 1 (full red) whatever it
    # was; the calibrated scale draws this nominal image below the threshold's colour.
    assert maps[0].max() < calibrated_model.calibration.pixel_threshold
    assert positions.max() < 0.5


def test_per_image_csv_names_the_f1_oracle_decision_apart_from_the_calibrated_one(
    calibrated_model, subset, tmp_path
):
    report = workflows.evaluate_dataset(calibrated_model, subset, tmp_path / "e", heatmaps=False)
    with open(tmp_path / "e/per_image.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == reports.PER_IMAGE_COLUMNS
    assert "predicted" not in reader.fieldnames
    threshold = calibrated_model.calibration.image_threshold
    scores = np.array([float(r["score"]) for r in rows])
    # The CSV rounds scores to 6 significant digits: decide on the ones away from a threshold.
    for column, value in (("anomalous", threshold), ("f1_optimal_oracle", report["f1_threshold"])):
        clear = np.abs(scores - value) > 1e-5 * np.abs(value)
        decided = np.array([int(r[column]) for r in rows])
        np.testing.assert_array_equal(decided[clear], (scores >= value)[clear].astype(int))


def test_evaluate_draws_the_score_distributions_and_the_roc_with_both_operating_points(
    calibrated_model, subset, tmp_path
):
    report = workflows.evaluate_dataset(calibrated_model, subset, tmp_path / "e", heatmaps=False)
    saved = json.loads((tmp_path / "e/metrics.json").read_text())
    assert (
        saved["figures"]
        == report["figures"]
        == {
            "score_distributions": "score_distributions.png",
            "roc": "roc.png",
        }
    )
    for name in report["figures"].values():
        with Image.open(tmp_path / "e" / name) as picture:
            assert picture.format == "PNG" and picture.width >= 400
    roc = read_rgb(tmp_path / "e/roc.png")
    for name in ("calibrated", "f1_optimal"):  # each operating point's marker colour is drawn
        colour = np.array(Image.new("RGB", (1, 1), plots.THRESHOLD_STYLES[name]["color"]))[0, 0]
        assert (np.abs(roc - colour).max(axis=-1) <= 8).sum() > 20, name


def test_fit_draws_the_calibration_scores_in_the_model_folder_which_still_loads(
    calibrated_model, tmp_path
):
    messages = []
    out = workflows.save_model(calibrated_model, tmp_path / "model", log=messages.append)
    figure = out / reports.CALIBRATION_FIGURE
    with Image.open(figure) as picture:
        assert picture.format == "PNG" and picture.width >= 400
    assert any(str(figure) in m and "expected false-alarm rate" in m for m in messages)
    loaded = checkpoint.load(out)
    assert loaded.calibration.image_threshold == calibrated_model.calibration.image_threshold
    # A model without calibration saved into the same folder leaves no stale picture.
    assert reports.write_calibration_figure(out, uncalibrated(calibrated_model).calibration) is None
    assert not figure.exists()
