"""The patchcore-jax command, run as a subprocess on a small real subset of MVTec AD bottle."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BOTTLE

from patchcore_jax.cli import build_parser


def run_cli(*args, check=True):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device: fastest here
    result = subprocess.run(
        [sys.executable, "-m", "patchcore_jax.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """MVTec layout with 10 train images, 3 good and 3 defective test images (with masks)."""
    root = tmp_path_factory.mktemp("bottle_subset")
    links = list(sorted((BOTTLE / "train/good").glob("*.png"))[:10])
    links += sorted((BOTTLE / "test/good").glob("*.png"))[:3]
    for defect in ("broken_large", "broken_small", "contamination"):
        image = sorted((BOTTLE / "test" / defect).glob("*.png"))[0]
        links += [image, BOTTLE / "ground_truth" / defect / f"{image.stem}_mask.png"]
    for source in links:
        target = root / source.relative_to(BOTTLE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)
    return root


@pytest.fixture(scope="module")
def model_dir(subset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "model"
    result = run_cli(
        "fit",
        subset,
        "--out",
        out,
        "--backbone",
        "mobilenet_v2",
        "--coreset-fraction",
        "0.05",
        "--quiet",
    )
    assert "saved model" in result.stderr
    return out


def test_fit_evaluate_predict_write_what_they_promise(subset, model_dir, tmp_path):
    result = run_cli("evaluate", model_dir, subset, "--out", tmp_path / "eval", "--quiet")
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "anomaly_pixel_auroc", "pro", "f1_threshold"):
        assert key in metrics, key
    assert metrics["num_images"] == 6
    assert metrics["image_auroc"] >= 0.8
    assert "image_auroc" in result.stdout
    with open(tmp_path / "eval/per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and sum(int(r["label"]) for r in rows) == 3
    assert len(list((tmp_path / "eval/heatmaps").glob("*.png"))) == 6

    images = [subset / "test/good", subset / "test/broken_large"]
    run_cli("predict", model_dir, *images, "--out", tmp_path / "pred", "--quiet")
    with open(tmp_path / "pred/scores.csv") as f:
        scores = {Path(r["image"]).parent.name: float(r["score"]) for r in csv.DictReader(f)}
    assert len(list((tmp_path / "pred/heatmaps").glob("*.png"))) == 4
    # The defective image scores above every good one, as in `evaluate`.
    evaluated = {Path(r["image"]).name + r["defect_type"]: float(r["score"]) for r in rows}
    assert scores["broken_large"] == pytest.approx(evaluated["000.pngbroken_large"], rel=1e-5)


@pytest.mark.parametrize(
    "args, reason",
    [
        (["fit", "/no/such/folder", "--out", "x"], "does not exist"),
        (["fit", ".", "--out", "x", "--coreset-fraction", "2"], "coreset-fraction"),
        (["fit", ".", "--out", "x", "--sampler", "kmeans"], "sampler"),
        (["evaluate", "/no/such/model", "."], "no checkpoint"),
        (["predict", "/no/such/model", "x.png", "--out", "o"], "no checkpoint"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(args, reason, tmp_path):
    result = run_cli(*args, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], result.stderr


def test_fit_on_a_folder_without_train_images_names_it(tmp_path):
    (tmp_path / "train").mkdir()
    result = run_cli(
        "fit", tmp_path, "--out", tmp_path / "m", "--backbone", "mobilenet_v2", check=False
    )
    assert result.returncode == 2 and str(tmp_path / "train") in result.stderr


def test_help_documents_every_option():
    parser = build_parser()
    fit = parser._subparsers._group_actions[0].choices["fit"]
    for action in fit._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings


def test_split_then_stretch_fit_and_evaluate_a_non_square_dataset_with_soft_masks(tmp_path):
    """A Magnetic-Tile-like set: no split, 283x105 tiles, anti-aliased masks, holes at the ends."""
    from synthetic_data import make_magnetic_tiles

    source = make_magnetic_tiles(tmp_path / "source")
    root = tmp_path / "tiles"
    result = run_cli(
        "split",
        "--good",
        source / "MT_Free/Imgs",
        "--defect",
        source / "MT_Blowhole/Imgs",
        "--out",
        root,
    )
    assert "train/good 8, test/good 2, defects: MT_Blowhole 4" in result.stderr
    fit_args = ["--backbone", "mobilenet_v2", "--quiet", "--resize-mode", "stretch"]
    run_cli("fit", root, "--out", tmp_path / "model", *fit_args, "--image-size", "96,256")
    result = run_cli("evaluate", tmp_path / "model", root, "--out", tmp_path / "eval", "--quiet")
    assert "warning: 4 of 4 masks are not 0/255" in result.stderr
    assert "binarised at >= 128" in result.stderr
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["config"]["resize_mode"] == "stretch"
    assert metrics["config"]["crop"] == [96, 256]
    assert metrics["num_defective"] == 4
    # The whole tile is seen, so the holes at its ends are found and localised.
    assert metrics["image_auroc"] == 1.0
    assert metrics["anomaly_pixel_auroc"] > 0.95


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--resize-mode", "squash"], "--resize-mode: invalid choice: 'squash'"),
        (["--image-size", "0,5"], "--image-size: expected H,W"),
        (["--image-size", "a,b"], "--image-size: expected H,W"),
        (["--image-size", "300,200"], "--image-size (300, 200) must not exceed --resize 256"),
        (["--crop", "300"], "--crop 300 must not exceed --resize 256"),
        (["--crop", "200", "--image-size", "9,9"], "not allowed with argument --crop"),
        (["--mask-threshold", "0"], "--mask-threshold: expected an integer in 1..255"),
        (["--mask-threshold", "256"], "--mask-threshold: expected an integer in 1..255"),
    ],
)
def test_geometry_and_mask_options_are_validated_before_any_work(args, reason, tmp_path):
    result = run_cli("fit", BOTTLE, "--out", tmp_path / "m", *args, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], result.stderr
    assert not (tmp_path / "m").exists()


def test_split_bad_input_is_one_line(tmp_path):
    result = run_cli("split", "--good", tmp_path, "--out", tmp_path / "o", check=False)
    assert result.returncode == 2 and "no images in the good-image folders" in result.stderr
    result = run_cli(
        "split", "--good", tmp_path, "--defect", "x=/no/such", "--out", "o", check=False
    )
    assert result.returncode == 2 and "--defect 'x=/no/such'" in result.stderr
    result = run_cli(
        "split", "--good", tmp_path, "--train-fraction", "0", "--out", "o", check=False
    )
    assert result.returncode == 2 and "--train-fraction" in result.stderr
