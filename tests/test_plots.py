"""plots.py: the operating points and the pictures of the thresholds among the scores."""

import numpy as np
from PIL import Image

from patchcore_jax import calibration, plots


def colour_pixels(path, name):
    """How many pixels of the picture at ``path`` have ``name``'s threshold colour."""
    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    colour = np.array(Image.new("RGB", (1, 1), plots.THRESHOLD_STYLES[name]["color"]))[0, 0]
    return int((np.abs(pixels - colour).max(axis=-1) <= 8).sum())


def test_an_operating_point_is_the_rates_of_the_confusion_counts():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([1.0, 2.0, 3.0, 5.0, 4.0, 6.0, 7.0])
    assert plots.operating_point(labels, scores, 3.5) == (1 / 4, 3 / 3)
    assert plots.operating_point(labels, scores, 5.5) == (0 / 4, 2 / 3)
    assert np.isnan(plots.operating_point(np.ones(3, int), scores[:3], 2.0)[0])


def test_the_pictures_draw_each_given_threshold_in_its_colour(tmp_path):
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(1.0, 0.1, 20), rng.normal(2.0, 0.3, 10)])
    labels = np.repeat([0, 1], [20, 10])
    types = ["good"] * 20 + ["crack"] * 10
    both = {"calibrated": 1.3, "f1_optimal": 1.5}
    plots.save_score_distributions(tmp_path / "d.png", scores, types, both)
    plots.save_roc(tmp_path / "r.png", labels, scores, both)
    plots.save_score_distributions(tmp_path / "one.png", scores, types, {"calibrated": 1.3})
    for path in ("d.png", "r.png"):
        assert colour_pixels(tmp_path / path, "calibrated") > 20, path
        assert colour_pixels(tmp_path / path, "f1_optimal") > 20, path
    assert colour_pixels(tmp_path / "one.png", "f1_optimal") == 0
    fitted = calibration.calibrate(
        scores[:20], np.zeros((20, 2, 2)), method="self-excluded", quantile=0.995
    )
    plots.save_calibration_scores(tmp_path / "c.png", fitted)
    assert colour_pixels(tmp_path / "c.png", "calibrated") > 20
