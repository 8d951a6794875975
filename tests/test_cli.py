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
        (["fit", ".", "--out", "x", "--reweight-neighbors", "1"], "--reweight-neighbors"),
        (["fit", ".", "--out", "x", "--layers", "logits"], "--layers: 'logits' has no spatial"),
        (["fit", ".", "--out", "x", "--seed", str(2**63)], "--seed: expected an integer in"),
        (["fit", __file__, "--out", "x"], "test_cli.py' is a file, not a folder"),
        (["evaluate", "m", ".", "--out", __file__], "test_cli.py' is a file; expected an output"),
        (["predict", "m", "x.png", "--out", __file__], "is a file; expected an output folder"),
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


def test_fit_refuses_k_larger_than_the_bank_and_saves_nothing(subset, tmp_path):
    out = tmp_path / "model"
    result = run_cli(
        "fit", subset, "--out", out, "--backbone", "mobilenet_v2", "--sampler", "random",
        "--coreset-fraction", "0.0001", "--k", "5", "--quiet", check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [  # one line: checked before any work
        "patchcore-jax: error: num_neighbors (k, --k) = 5 exceeds the memory bank's 1 rows; "
        "lower k, or fit on more images or a larger coreset_fraction"
    ]
    assert not out.exists()


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_text("x"), "is a file, not a checkpoint folder"),
        (lambda p: (p.mkdir(), (p / "a.txt").write_text("x")), "is not a patchcore-jax checkpoint"),
    ],
)
def test_fit_checks_out_before_any_work(subset, tmp_path, make, reason):
    out = tmp_path / "out"
    make(out)
    before = sorted(out.rglob("*")) if out.is_dir() else out.read_text()
    result = run_cli("fit", subset, "--out", out, "--backbone", "mobilenet_v2", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and reason in lines[0], result.stderr
    assert (sorted(out.rglob("*")) if out.is_dir() else out.read_text()) == before


def test_fit_over_a_checkpoint_replaces_the_model_and_keeps_other_files(
    subset, model_dir, tmp_path
):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(model_dir, out)
    (out / "notes.txt").write_text("mine")
    run_cli(
        "fit", subset, "--out", out, "--backbone", "mobilenet_v2", "--sampler", "random",
        "--coreset-fraction", "0.01", "--seed", "3", "--quiet",
    )  # fmt: skip
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["CURRENT", "notes.txt", "v000002"]
    run_cli("predict", out, subset / "test/good", "--out", tmp_path / "pred", "--no-heatmaps")
    assert (tmp_path / "pred/scores.csv").read_text().count("\n") == 4


def test_weights_convert_of_a_corrupt_file_is_one_line(tmp_path):
    source = tmp_path / "corrupt.safetensors"
    source.write_bytes(b"\xff" * 64)
    result = run_cli(
        "weights", "convert", source, "--arch", "resnet18", "--out-dir", tmp_path, check=False
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{source} is not a readable .safetensors file" in lines[0]


def test_version_prints_the_package_version():
    from patchcore_jax.version import package_version

    result = run_cli("--version")
    assert result.stdout.strip() == f"patchcore-jax {package_version()}"


def test_scores_never_print_as_minus_zero():
    from patchcore_jax.cli import _format_score

    assert _format_score(-0.0) == "0" and _format_score(0.0) == "0"
    assert _format_score(float("nan")) == "nan"
    assert _format_score(1234567.0) == "1.23457e+06" and _format_score(0.5) == "0.5"


def test_predict_with_a_malformed_mask_draws_without_the_contour_and_warns(model_dir, tmp_path):
    image = sorted((BOTTLE / "test/broken_large").glob("*.png"))[0]
    (tmp_path / "data/test/broken_large").mkdir(parents=True)
    (tmp_path / "data/ground_truth/broken_large").mkdir(parents=True)
    copy = tmp_path / "data/test/broken_large" / image.name
    copy.symlink_to(image)
    mask = tmp_path / "data/ground_truth/broken_large" / f"{image.stem}_mask.png"
    mask.write_bytes(b"not a png")
    result = run_cli("predict", model_dir, copy, "--out", tmp_path / "pred", "--quiet")
    assert result.returncode == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert f"warning: heatmap of {copy} drawn without its mask contour: " in warnings[0]
    assert str(mask) in warnings[0]
    assert (tmp_path / "pred/scores.csv").read_text().count("\n") == 2
    assert len(list((tmp_path / "pred/heatmaps").glob("*.png"))) == 1
