"""The patchcore-jax command, run as a subprocess on a small real subset of MVTec AD bottle."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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


def run_cli_timed(*args) -> tuple[list[tuple[float, str]], float]:
    """``run_cli`` with stderr read line by line as it comes (not a terminal): ``([(seconds
    since the start when the line arrived, line)], wall seconds of the run)``."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    command = [sys.executable, "-m", "patchcore_jax.cli", *map(str, args)]
    start = time.monotonic()
    with subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    ) as process:  # binary: lines split at "\n" only, a "\r" stays in its line
        lines = [(time.monotonic() - start, line.decode()) for line in process.stderr]
    wall = time.monotonic() - start
    text = "".join(line for _, line in lines)
    assert process.returncode == 0, f"exit {process.returncode}\n{text}"
    return lines, wall


@pytest.fixture(scope="module")
def fit_log(subset, tmp_path_factory) -> tuple[Path, list[tuple[float, str]], float]:
    """A fit with its progress on (stderr not a terminal): ``(model folder, timed stderr
    lines, wall seconds)``."""
    out = tmp_path_factory.mktemp("cli") / "model"
    args = ["fit", subset, "--out", out, "--backbone", "mobilenet_v2", "--coreset-fraction", "0.05"]
    lines, wall = run_cli_timed(*args)
    assert any("saved model" in line for _, line in lines[-3:]), lines[-3:]
    return out, lines, wall


@pytest.fixture(scope="module")
def model_dir(fit_log) -> Path:
    return fit_log[0]


def test_progress_off_a_terminal_is_plain_lines_one_per_stage_start_and_end(fit_log):
    """Piped stderr gets no carriage returns or escape codes (tqdm's bars wrote both), each
    stage one start and one end line, and the seconds an end line gives are the time between
    the two lines as the reader saw them arrive (bounded by how late a line can be read)."""
    _, lines, wall = fit_log
    text = "".join(line for _, line in lines)
    assert "\r" not in text and "\x1b" not in text, text
    seconds = {}
    for stage, unit in [("features", "images"), ("coreset", "steps"), ("calibration", "images")]:
        starts = [(t, line) for t, line in lines if line.startswith(f"{stage}: started, 0/")]
        ends = [
            (t, re.fullmatch(rf"{stage}: (\d+)/(\d+) {unit} in ([\d.]+) s.*\n", line))
            for t, line in lines
        ]
        ends = [(t, match) for t, match in ends if match]
        assert len(starts) == 1 and len(ends) == 1, (stage, text)
        (started, _), (ended, match) = starts[0], ends[0]
        done, total, reported = int(match[1]), int(match[2]), float(match[3])
        assert done == total > 0, (stage, text)
        # Rounded to 0.1 s; a line may reach the reader late (a loaded machine): up to 1 s.
        assert abs(reported - (ended - started)) <= 0.05 + 1.0, (stage, reported, text)
        seconds[stage] = reported
    assert sum(seconds.values()) <= wall


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
    assert {r["heatmap"] for r in rows} == {
        f"heatmaps/{s}/000.png" for s in ("good", "broken_large", "broken_small", "contamination")
    } | {"heatmaps/good/001.png", "heatmaps/good/002.png"}
    assert all((tmp_path / "eval" / r["heatmap"]).is_file() for r in rows)
    assert set(metrics["per_defect_type"]) == {"broken_large", "broken_small", "contamination"}
    for values in metrics["per_defect_type"].values():  # 3 good + 1 of the type
        assert values["num_images"] == 4 and values["num_defective"] == 1
    assert "broken_large" in result.stdout

    images = [subset / "test/good", subset / "test/broken_large"]
    result = run_cli("predict", model_dir, *images, "--out", tmp_path / "pred", "--quiet")
    with open(tmp_path / "pred/scores.csv") as f:
        predicted = list(csv.DictReader(f))
    names = [r["name"] for r in predicted]
    assert names == ["good/000.png", "good/001.png", "good/002.png", "broken_large/000.png"]
    assert [r["heatmap"] for r in predicted] == [f"heatmaps/{name}" for name in names]
    assert all((tmp_path / "pred" / r["heatmap"]).is_file() for r in predicted)
    assert "scored 4 images" in result.stderr and "4 heatmaps" in result.stderr
    assert "expected false-alarm rate" in result.stderr  # of the threshold in use
    scores = {Path(r["image"]).parent.name: float(r["score"]) for r in predicted}
    # The defective image scores above every good one, as in `evaluate`.
    evaluated = {Path(r["image"]).name + r["defect_type"]: float(r["score"]) for r in rows}
    assert scores["broken_large"] == pytest.approx(evaluated["000.pngbroken_large"], rel=1e-5)


def test_workers_and_cache_dir_options_make_the_image_reader_every_reading_command_gets(
    tmp_path, capsys
):
    from patchcore_jax import cli, options
    from patchcore_jax.workflows import no_log

    commands = {
        "fit": ["fit", str(tmp_path), "--out", "m"],
        "predict": ["predict", "m", "x", "--out", "o"],
        "evaluate": ["evaluate", "m", str(tmp_path)],
        "benchmark": ["benchmark", str(tmp_path), "--out", "o"],
    }
    for name, command in commands.items():
        args = build_parser().parse_args(command)
        run = cli._run(args)
        assert run["reader"].workers == options.default_workers(), name
        assert run["reader"].cache_dir is None and run["log"] not in (None, no_log), name
        given = [*command, "--workers", "0", "--cache-dir", str(tmp_path / "cache")]
        reader = cli._run(build_parser().parse_args(given))["reader"]
        assert (reader.workers, reader.cache_dir) == (0, tmp_path / "cache"), name
    with pytest.raises(SystemExit, match="2"):
        build_parser().parse_args([*commands["predict"], "--workers", "-1"])
    assert "--workers: expected an integer >= 0" in capsys.readouterr().err


def test_predict_output_folders_are_never_mixed_or_lost(subset, model_dir, tmp_path):
    """Reused --out is refused; --overwrite replaces the whole previous run; concurrent runs
    into one folder fail clearly; results written under test/ are never read back as data."""
    good = subset / "test/good"
    out = subset / "test" / "predictions"  # inside the dataset, as users do
    run_cli("predict", model_dir, good, "--out", out, "--quiet")
    assert len(list((out / "heatmaps/good").glob("*.png"))) == 3
    again = run_cli("predict", model_dir, good / "000.png", "--out", out, check=False)
    assert (
        again.returncode == 2 and "is not empty" in again.stderr and "--overwrite" in again.stderr
    )
    run_cli("predict", model_dir, good / "000.png", "--out", out, "--overwrite", "--quiet")
    assert sorted(p.name for p in (out / "heatmaps").iterdir() if p.suffix) == ["000.png"]
    assert len((out / "scores.csv").read_text().splitlines()) == 2  # header + one image
    # the folder, its heatmaps and the dataset stay apart
    from patchcore_jax.datasets.folders import load_dataset

    assert "predictions" not in {s.defect_type for s in load_dataset(subset).test_samples}
    shutil.rmtree(out)  # the subset is shared with other tests
    # a folder that patchcore-jax did not write is never cleared
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = run_cli("predict", model_dir, good, "--out", foreign, "--overwrite", check=False)
    assert result.returncode == 2 and "did not write" in result.stderr
    assert (foreign / "notes.txt").read_text() == "mine"
    # a run holding the folder makes a second one fail at once
    import fcntl

    busy = tmp_path / "busy"
    busy.mkdir()
    with open(busy / ".patchcore-jax.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = run_cli("predict", model_dir, good, "--out", busy, check=False)
    assert result.returncode == 2 and "in use by another patchcore-jax run" in result.stderr
    file_out = tmp_path / "file.txt"
    file_out.write_text("x")
    result = run_cli("evaluate", model_dir, subset, "--out", file_out, check=False)
    assert result.returncode == 2 and "is a file" in result.stderr


def test_predict_names_outputs_by_relative_path_and_recurses_on_request(
    subset, model_dir, tmp_path
):
    test = subset / "test"
    flat = run_cli("predict", model_dir, test, "--out", tmp_path / "flat", check=False)
    assert flat.returncode == 2 and "contains no image files" in flat.stderr
    run_cli("predict", model_dir, test, "--recursive", "--out", tmp_path / "deep", "--quiet")
    with open(tmp_path / "deep/scores.csv") as f:
        names = [r["name"] for r in csv.DictReader(f)]
    assert len(names) == 6 and "test/broken_small/000.png" in names
    # the same folder name twice: the argument's position keeps the names apart
    twice = [test / "good", subset / "test" / "good" / ".." / "good"]
    run_cli("predict", model_dir, *twice, "--no-heatmaps", "--out", tmp_path / "twice", "--quiet")
    with open(tmp_path / "twice/scores.csv") as f:
        names = [r["name"] for r in csv.DictReader(f)]
    assert names[0] == "1/good/000.png" and names[3] == "2/good/000.png"


def test_predict_draws_without_a_malformed_contour_mask_and_warns(subset, model_dir, tmp_path):
    broken = tmp_path / "cat"
    for part in ("test/broken_large", "ground_truth/broken_large"):
        (broken / part).mkdir(parents=True)
    image = subset / "test/broken_large/000.png"
    (broken / "test/broken_large/000.png").symlink_to(image)
    (broken / "ground_truth/broken_large/000_mask.png").write_bytes(b"not a png")
    result = run_cli("predict", model_dir, broken / "test/broken_large", "--out", tmp_path / "o")
    assert (
        "warning: heatmap of" in result.stderr
        and "without its ground-truth contour" in result.stderr
    )
    assert (tmp_path / "o/heatmaps/broken_large/000.png").is_file()


def test_evaluate_allows_missing_masks_only_when_asked(model_dir, subset, tmp_path):
    root = tmp_path / "cat"
    root.mkdir()
    for source in (subset / "train", subset / "test", subset / "ground_truth"):
        (root / source.name).symlink_to(source, target_is_directory=True)
    (root / "ground_truth").unlink()
    (root / "ground_truth").mkdir()
    for defect in ("broken_large", "broken_small"):
        (root / "ground_truth" / defect).symlink_to(subset / "ground_truth" / defect)
    (root / "ground_truth" / ".ipynb_checkpoints").mkdir()  # hidden: ignored
    refused = run_cli("evaluate", model_dir, root, "--out", tmp_path / "e1", check=False)
    assert refused.returncode == 2 and "1 defective test images have no mask" in refused.stderr
    assert "--allow-missing-masks" in refused.stderr
    result = run_cli(
        "evaluate", model_dir, root, "--allow-missing-masks", "--out", tmp_path / "e2", "--quiet"
    )
    assert "1 defective images without masks are left out of the pixel metrics" in result.stderr
    metrics = json.loads((tmp_path / "e2/metrics.json").read_text())
    assert metrics["num_without_masks"] == 1 and metrics["num_defective"] == 3
    assert metrics["pixel_auroc"] is not None


def test_evaluate_without_defect_images_says_why_metrics_are_missing(model_dir, subset, tmp_path):
    root = tmp_path / "good_only"
    (root / "test").mkdir(parents=True)
    (root / "test/good").symlink_to(subset / "test/good")
    result = run_cli("evaluate", model_dir, root, "--out", tmp_path / "e", "--quiet")
    assert "note: image AUROC needs good and defective test images; found 3 good and 0" in (
        result.stderr
    )
    assert "note: pixel metrics need ground-truth masks" in result.stderr


def test_fit_reads_only_training_images(tmp_path):
    plain = tmp_path / "good_images"
    plain.mkdir()
    for image in sorted((BOTTLE / "train/good").glob("*.png"))[:3]:
        (plain / image.name).symlink_to(image)
    args = ["--backbone", "mobilenet_v2", "--quiet", "--sampler", "identity"]
    result = run_cli("fit", plain, "--out", tmp_path / "m", *args)
    assert "fitting mobilenet_v2 on 3 images" in result.stderr


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


def test_fit_usage_shows_out_as_needed_and_weights_fetch_lists_what_it_fetches(capsys):
    from patchcore_jax.backbones import fetchable_backbones

    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "fit DATA --out DIR [options]" in usage and "--resume MODEL [--out DIR]" in usage
    with pytest.raises(SystemExit):
        build_parser().parse_args(["weights", "fetch", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"architecture: {', '.join(fetchable_backbones())}" in help_text
    assert "wide_resnet50_2" in fetchable_backbones()


def test_weights_fetch_of_an_unknown_name_lists_the_known_ones_in_one_line(capsys):
    from patchcore_jax import cli
    from patchcore_jax.backbones import fetchable_backbones

    assert cli.main(["weights", "fetch", "vgg16"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("patchcore-jax: error: no download for 'vgg16'")
    assert str(fetchable_backbones()) in line


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


def test_a_second_fit_in_a_new_process_compiles_nothing(subset, tmp_path):
    """Every program of `fit` comes from the persistent compilation cache the second time."""
    cache = tmp_path / "xla"
    args = ["--backbone", "mobilenet_v2", "--quiet", "--coreset-fraction", "0.05"]
    run_cli("fit", subset, "--out", tmp_path / "a", "--compile-cache", cache, *args)
    first = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit_") for name in first)
    run_cli("fit", subset, "--out", tmp_path / "b", "--compile-cache", cache, *args)
    assert sorted(p.name for p in cache.iterdir()) == first  # no new program compiled


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
        (lambda p: (p.mkdir(), (p / "CURRENT").write_bytes(b"\xff\xfe\x00\x81")), "is damaged"),
        (lambda p: (p.mkdir(), (p / "CURRENT").write_bytes(b"")), "CURRENT is damaged"),
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
    names = ["CURRENT", "calibration.png", "notes.txt", "v000002"]  # the fit's picture too
    assert sorted(p.name for p in out.iterdir()) == names
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


def test_weights_convert_without_torch_is_one_line(tmp_path, capsys, monkeypatch):
    from patchcore_jax import cli

    source = tmp_path / "x.pth"
    source.write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    argv = ["weights", "convert", source, "--arch", "resnet18", "--out-dir", tmp_path]
    assert cli.main([str(arg) for arg in argv]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("patchcore-jax: error: reading x.pth needs PyTorch: pip install"), line


@pytest.mark.parametrize("error", [TypeError("a bug"), ImportError("No module named 'flax'")])
def test_an_unexpected_error_keeps_its_traceback(tmp_path, monkeypatch, error):
    from patchcore_jax import cli

    def broken(args):
        raise error

    monkeypatch.setitem(cli.HANDLERS, "split", broken)
    with pytest.raises(type(error)) as raised:
        cli.main(["split", "--good", str(tmp_path), "--out", str(tmp_path / "out")])
    assert raised.value is error


@pytest.mark.parametrize("resume", [False, True])
def test_fit_checks_spill_dir_before_any_work(subset, tmp_path, capsys, resume):
    from patchcore_jax import cli

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    model = tmp_path / "model"
    target = ["--resume", model] if resume else ["--out", model, "--backbone", "mobilenet_v2"]
    for spill_dir, reason in (
        (a_file, f"--spill-dir {a_file} is a file; expected a folder"),
        (a_file / "sub", f"--spill-dir {a_file / 'sub'} cannot be created: {a_file} is a file"),
    ):
        argv = ["fit", subset, *target, "--spill-dir", spill_dir, "--compile-cache", "off"]
        assert cli.main([str(arg) for arg in argv]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == f"patchcore-jax: error: {reason}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_version_prints_the_package_version():
    from patchcore_jax.version import package_version

    result = run_cli("--version")
    assert result.stdout.strip() == f"patchcore-jax {package_version()}"


def test_scores_never_print_as_minus_zero():
    from patchcore_jax.reports import format_score

    assert format_score(-0.0) == "0" and format_score(0.0) == "0"
    assert format_score(float("nan")) == "nan"
    assert format_score(1234567.0) == "1.23457e+06" and format_score(0.5) == "0.5"


def test_evaluate_reads_every_mask_before_scoring_any_image(model_dir, subset, tmp_path):
    root = tmp_path / "cat"
    (root / "ground_truth").mkdir(parents=True)
    (root / "test").symlink_to(subset / "test", target_is_directory=True)
    for defect in ("broken_large", "broken_small", "contamination"):
        (root / "ground_truth" / defect).symlink_to(subset / "ground_truth" / defect)
    damaged = root / "ground_truth" / "broken_small"
    damaged.unlink()
    damaged.mkdir()
    original = subset / "ground_truth/broken_small/000_mask.png"
    (damaged / original.name).write_bytes(original.read_bytes()[:200])  # header fine, data cut
    result = run_cli("evaluate", model_dir, root, "--out", tmp_path / "e", check=False)
    assert result.returncode == 2 and str(damaged / original.name) in result.stderr
    assert "scoring" not in result.stderr  # no image was scored
    assert not (tmp_path / "e").exists()


def test_predict_writes_normalised_scores_decisions_masks_and_a_summary(
    subset, model_dir, tmp_path
):
    from PIL import Image

    from patchcore_jax import checkpoint
    from patchcore_jax.preprocess import load_images

    out = tmp_path / "pred"
    result = run_cli(
        "predict", model_dir, subset / "test", "--recursive", "--masks", "--no-heatmaps",
        "--out", out, "--quiet",
    )  # fmt: skip
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    model = checkpoint.load(model_dir)
    calibration = model.calibration
    assert calibration.method == "self-excluded" and len(calibration.image_scores) == 10
    prediction = model.predict(load_images([r["image"] for r in rows]))
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    expected_normalised = np.clip(
        (scores - calibration.image_threshold) / (calibration.image_max - calibration.image_min)
        + 0.5,
        0,
        1,
    )
    for row, score, normalised, anomaly_map in zip(
        rows, scores, expected_normalised, maps, strict=True
    ):
        assert float(row["score"]) == pytest.approx(score, rel=1e-5)
        assert float(row["normalized_score"]) == pytest.approx(normalised, rel=1e-5, abs=1e-6)
        assert row["anomalous"] == str(int(score >= calibration.image_threshold))
        mask = np.asarray(Image.open(out / row["mask"]))
        np.testing.assert_array_equal(mask, (anomaly_map >= calibration.pixel_threshold) * 255)
    num_anomalous = sum(int(r["anomalous"]) for r in rows)
    assert f"{num_anomalous} of 6 images anomalous" in result.stderr
    assert num_anomalous >= 3  # every defect image is flagged at the nominal 99.5% quantile


def test_evaluate_reports_confusion_counts_at_the_calibrated_and_f1_thresholds(
    subset, model_dir, tmp_path
):
    from patchcore_jax.checkpoint import read_record

    result = run_cli("evaluate", model_dir, subset, "--out", tmp_path / "eval", "--quiet")
    results = json.loads((tmp_path / "eval/metrics.json").read_text())
    with open(tmp_path / "eval/per_image.csv") as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    threshold = read_record(model_dir)["calibration"]["image_threshold"]
    expected = {"calibrated": threshold, "f1_optimal": results["f1_threshold"]}
    for name, value in expected.items():
        counts = results["confusion"][name]
        assert counts["threshold"] == value
        predicted = scores >= value * (1 - 1e-6)  # the CSV rounds scores to 6 digits
        assert counts["true_positives"] == np.sum(predicted & (labels == 1))
        assert counts["false_positives"] == np.sum(predicted & (labels == 0))
        assert counts["false_negatives"] == np.sum(~predicted & (labels == 1))
        assert counts["true_negatives"] == np.sum(~predicted & (labels == 0))
        assert f"{name} threshold" in result.stdout
    assert [int(r["anomalous"]) for r in rows] == list((scores >= threshold * (1 - 1e-6)) * 1)


def test_uncalibrated_models_say_so_instead_of_deciding(tmp_path):
    plain = tmp_path / "good_images"
    plain.mkdir()
    for image in sorted((BOTTLE / "train/good").glob("*.png"))[:2]:
        (plain / image.name).symlink_to(image)
    model = tmp_path / "m"
    args = ["--backbone", "mobilenet_v2", "--quiet", "--sampler", "identity"]
    run_cli("fit", plain, "--out", model, "--calibration", "none", *args)
    result = run_cli("predict", model, plain, "--out", tmp_path / "p", "--no-heatmaps")
    assert "has no calibration" in result.stderr
    with open(tmp_path / "p/scores.csv") as f:
        assert {r["anomalous"] for r in csv.DictReader(f)} == {""}
    masks = run_cli("predict", model, plain, "--out", tmp_path / "q", "--masks", check=False)
    assert masks.returncode == 2 and len(masks.stderr.strip().splitlines()) == 1
    assert "--masks needs a calibrated model" in masks.stderr
    # A held-out fraction that leaves no training image is refused before any work.
    one = tmp_path / "one"
    one.mkdir()
    (one / "000.png").symlink_to(sorted((BOTTLE / "train/good").glob("*.png"))[0])
    held = run_cli(
        "fit", one, "--out", tmp_path / "h", "--held-out-fraction", "0.5", *args, check=False
    )
    assert held.returncode == 2 and len(held.stderr.strip().splitlines()) == 1
    assert "--held-out-fraction" in held.stderr and "no training images" in held.stderr


def test_fit_with_a_labelled_validation_folder_stores_the_f1_optimal_threshold(subset, tmp_path):
    model = tmp_path / "m"
    args = ["--backbone", "mobilenet_v2", "--coreset-fraction", "0.05", "--quiet"]
    result = run_cli("fit", subset, "--out", model, "--validation", subset, *args)
    assert "F1-optimal on 6 validation images" in result.stderr
    run_cli("evaluate", model, subset, "--out", tmp_path / "eval", "--no-heatmaps", "--quiet")
    results = json.loads((tmp_path / "eval/metrics.json").read_text())
    calibrated = results["confusion"]["calibrated"]
    assert calibrated["threshold"] == pytest.approx(results["f1_threshold"], rel=1e-6)
    assert (
        calibrated["false_positives"] + calibrated["false_negatives"]
        == (results["num_misclassified"])
    )


def test_presets_set_defaults_that_explicit_options_override():
    from patchcore_jax.options import configs_from_args, preset_defaults

    def configs(*argv):
        args = build_parser().parse_args(["fit", ".", "--out", "m", *argv])
        if args.preset:
            args = build_parser(preset_defaults(args.preset)).parse_args(
                ["fit", ".", "--out", "m", *argv]
            )
        return configs_from_args(args)

    (config,) = configs("--preset", "im320,layers123,reweight")
    assert (config.resize, config.crop, config.reweight) == (366, 320, True)
    assert config.layers == ("layer1", "layer2", "layer3")
    (config,) = configs("--preset", "im320,wrn101", "--crop", "288", "--backbone", "resnet18")
    assert (config.resize, config.crop, config.backbone) == (366, 288, "resnet18")
    members = configs("--backbone", "mobilenet_v2,resnet18", "--layers", "stride16;layer2")
    assert [(c.backbone, c.layers) for c in members] == [
        ("mobilenet_v2", ("stride16",)),
        ("resnet18", ("layer2",)),
    ]


def test_patch_stride_option_reaches_every_member_and_is_checked_in_option_words(capsys):
    from patchcore_jax.options import configs_from_args, in_option_words

    def configs(*argv):
        return configs_from_args(build_parser().parse_args(["fit", ".", "--out", "m", *argv]))

    assert [c.patch_stride for c in configs()] == [1]
    members = configs("--backbone", "mobilenet_v2,resnet18", "--patch-stride", "2")
    assert [c.patch_stride for c in members] == [2, 2]
    args = build_parser().parse_args(["fit", ".", "--out", "m", "--patch-stride", "0"])
    with pytest.raises(ValueError) as error:
        configs_from_args(args)
    assert in_option_words(str(error.value), args) == (
        "--patch-stride: expected a positive integer, got 0"
    )


def test_precision_option_reaches_every_config_and_defaults_to_exact(capsys, tmp_path):
    from patchcore_jax.options import configs_from_args

    def configs(*argv):
        return configs_from_args(build_parser().parse_args(["fit", ".", "--out", "m", *argv]))

    assert [c.precision for c in configs()] == ["exact"]
    members = configs("--backbone", "mobilenet_v2,resnet18", "--precision", "fast")
    assert [c.precision for c in members] == ["fast", "fast"]
    argv = ["benchmark", str(tmp_path), "--out", str(tmp_path / "out"), "--precision", "fast"]
    args = build_parser().parse_args(argv)
    assert args.precision == "fast"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", ".", "--out", "m", "--precision", "half"])
    assert "--precision: invalid choice: 'half'" in capsys.readouterr().err


def test_mismatched_ensemble_options_are_one_line_errors(subset, tmp_path):
    result = run_cli(
        "fit",
        subset,
        "--out",
        tmp_path / "m",
        "--backbone",
        "mobilenet_v2,mobilenet_v2",
        "--layers",
        "stride8;stride16;stride8",
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "patchcore-jax: error: --layers gives 3 ';'-separated groups for 2 backbones; give one "
        "group per backbone, or one for all"
    ]
    result = run_cli("fit", subset, "--out", tmp_path / "m", "--preset", "im999", check=False)
    assert result.returncode == 2 and "unknown preset 'im999'" in result.stderr
    result = run_cli(
        "fit",
        subset,
        "--out",
        tmp_path / "m",
        "--backbone",
        "mobilenet_v2",
        "--train-images",
        "11",
        check=False,
    )
    assert result.returncode == 2
    assert "11 training images requested (--train-images), but only 10 exist" in result.stderr


def test_fit_of_several_backbones_saves_an_ensemble_that_evaluate_and_predict_load(
    subset, tmp_path
):
    import patchcore_jax
    from patchcore_jax import ensemble

    model = tmp_path / "ensemble"
    run_cli(
        "fit",
        subset,
        "--out",
        model,
        "--backbone",
        "mobilenet_v2,mobilenet_v2",
        "--layers",
        "stride8,stride16;stride16",
        "--sampler",
        "random",
        "--coreset-fraction",
        "0.05",
        "--train-images",
        "5",
        "--quiet",
    )
    loaded = patchcore_jax.load(model)
    assert isinstance(loaded, ensemble.Ensemble)
    assert [m.config.layers for m in loaded.members] == [("stride8", "stride16"), ("stride16",)]
    run_cli("evaluate", model, subset, "--out", tmp_path / "eval", "--no-heatmaps", "--quiet")
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert len(metrics["members"]) == 2 and metrics["num_images"] == 6
    with open(tmp_path / "eval/per_image.csv") as f:
        scores = [float(r["score"]) for r in csv.DictReader(f)]
    assert all(0.0 <= s <= 1.0 for s in scores)  # normalised over the set, then averaged


def test_fit_resume_adds_nominal_images_to_a_fitted_model(subset, tmp_path):
    from patchcore_jax import checkpoint

    halves = [tmp_path / "first", tmp_path / "second"]
    images = sorted((subset / "train/good").glob("*.png"))
    for folder, part in zip(halves, (images[:5], images[5:]), strict=True):
        folder.mkdir()
        for image in part:
            (folder / image.name).symlink_to(image)
    model = tmp_path / "model"
    args = ["--backbone", "mobilenet_v2", "--quiet", "--coreset-fraction", "0.05"]
    run_cli("fit", halves[0], "--out", model, *args)
    assert checkpoint.read_record(model)["memory_bank"]["shape"] == [196, 1024]  # 5 x 784 x 5%
    result = run_cli("fit", halves[1], "--resume", model, "--quiet")
    assert "memory bank: 196 + 196 of 3920 new patches -> 392" in result.stderr
    assert "warning: the decision thresholds stay calibrated on the original" in result.stderr
    assert checkpoint.read_record(model)["memory_bank"]["shape"] == [392, 1024]
    run_cli("predict", model, subset / "test/good", "--out", tmp_path / "pred", "--quiet")
    missing = run_cli("fit", halves[1], "--resume", tmp_path / "nothing", check=False)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    no_out = run_cli("fit", halves[1], check=False)
    assert no_out.returncode == 2 and "fit needs --out" in no_out.stderr


def test_a_second_fit_into_a_folder_being_saved_fails_at_once_in_one_line(subset, tmp_path):
    from patchcore_jax.files import exclusive_lock

    out = tmp_path / "model"
    out.mkdir()
    with exclusive_lock(out, "the test's run"):  # as a run saving into it holds it
        result = run_cli("fit", subset, "--out", out, "--backbone", "mobilenet_v2", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"patchcore-jax: error: checkpoint folder {out} is in use by another patchcore-jax run"
    ]
    assert list(out.iterdir()) == []


def test_resume_refuses_model_options_that_differ_from_the_model(subset, model_dir, tmp_path):
    from patchcore_jax import options

    args = build_parser().parse_args(
        ["fit", str(subset), "--resume", "m", "--k", "3", "--image-size", "64", "--seed", "0"]
    )
    assert options.resume_values(args) == {"num_neighbors": 3, "crop": (64, 64), "seed": 0}
    same = ["--backbone", "mobilenet_v2", "--coreset-fraction", "0.05", "--seed", "0"]
    args = build_parser().parse_args(["fit", str(subset), "--resume", "m", *same])
    assert options.resume_values(args) == {
        "backbone": "mobilenet_v2",
        "coreset_fraction": 0.05,
        "seed": 0,
    }
    result = run_cli(
        "fit", subset, "--resume", model_dir, "--out", tmp_path / "m", *same, "--k", "2",
        "--reweight", check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"patchcore-jax: error: {model_dir}: its options cannot change when resuming: --k 2 "
        "(the model's: 1), --reweight True (the model's: False)"
    ]
    assert not (tmp_path / "m").exists()


def test_the_paper_ensemble_preset_gives_three_members_and_options_override_it(capsys):
    from patchcore_jax.options import configs_from_args, preset_defaults

    argv = ["fit", ".", "--out", "m", "--preset", "ensemble-paper", "--image-size", "64"]
    args = build_parser(preset_defaults("ensemble-paper")).parse_args([*argv, "--resize", "72"])
    members = configs_from_args(args)
    assert [(m.backbone, m.layers) for m in members] == [
        ("wide_resnet101_2", ("layer2", "layer3")),
        ("resnext101_32x8d", ("layer2", "layer3")),
        ("densenet201", ("denseblock2", "denseblock3")),
    ]
    assert {(m.target_embed_dimension, m.coreset_fraction, m.image_shape) for m in members} == {
        (384, 0.01, (64, 64))
    }
    args = build_parser(preset_defaults("ensemble-paper")).parse_args(argv[:6])
    assert {(m.resize, m.image_shape) for m in configs_from_args(args)} == {(366, (320, 320))}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["benchmark", "--help"])
    assert "ensemble-paper, ensemble-paper-im224" in " ".join(capsys.readouterr().out.split())


def test_random_init_missing_fits_reloads_and_benchmarks_where_weights_are_absent(
    subset, tmp_path, monkeypatch, capsys
):
    """Without weights a fit fails naming them; with --random-init-missing it uses random-init
    weights and says the results mean nothing, its checkpoint reloads them (saying so again),
    and a benchmark records them in result.json and results.md."""
    from patchcore_jax import checkpoint, cli

    monkeypatch.setenv("PATCHCORE_WEIGHTS", str(tmp_path / "no-weights"))
    small = ["--backbone", "resnet18", "--image-size", "64", "--resize", "72", "--quiet"]
    small += ["--pretrain-dim", "32", "--target-dim", "16", "--train-images", "3"]
    small += ["--no-batch-norm-probe"]  # the probe runs eagerly: seconds per model
    fit = ["fit", str(subset), "--out", str(tmp_path / "m"), *small]
    assert cli.main(fit) == 2
    assert "error: no weights for resnet18 in" in capsys.readouterr().err
    assert cli.main([*fit, "--random-init-missing"]) == 0
    note = "using random-init weights instead; scores and metrics computed with them mean nothing"
    assert note in capsys.readouterr().err
    with pytest.warns(UserWarning, match="fitted with random-init resnet18 weights"):
        assert checkpoint.load(tmp_path / "m").backbone.weights_sha256 == "random-init"
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "bottle").symlink_to(subset)
    bench = ["benchmark", str(tmp_path / "root"), "--out", str(tmp_path / "b"), *small]
    assert cli.main([*bench, "--random-init-missing"]) == 0
    result = json.loads((tmp_path / "b" / "bottle" / "result.json").read_text())
    assert result["status"] == "ok"
    assert result["settings"]["random_init_backbones"] == ["resnet18"]
    assert "random-init weights for resnet18" in (tmp_path / "b" / "results.md").read_text()


@pytest.mark.parametrize("image_size", [64, pytest.param(None, marks=pytest.mark.slow)])
def test_fit_of_the_paper_ensemble_preset_trains_three_members_evaluates_loads_and_exports(
    subset, tmp_path, monkeypatch, capsys, image_size
):
    """``--preset ensemble-paper`` (random-init weights: theirs are not on test machines) trains
    WRN-101, ResNeXt-101 and DenseNet-201 members on 3 training images (one held out to
    calibrate) and evaluates from the checkpoint, which loads as that ensemble; a member
    exports. CI: 64 px crops without the eager BatchNorm probe (about 2.5 minutes on a loaded
    2-core CPU: six compilations of 100-200-layer networks); the full recipe (320 px, probed)
    is the slow variant, which also exports and runs the whole ensemble (16 min and a peak of
    about 15 GB of memory on the loaded 2-core machine: the three networks' weights are the
    program's constants)."""
    import patchcore_jax
    from patchcore_jax import cli, exported
    from patchcore_jax.preprocess import load_images

    monkeypatch.setenv("PATCHCORE_WEIGHTS", str(tmp_path / "no-weights"))
    small = [] if image_size is None else ["--image-size", image_size, "--resize", image_size]
    small += [] if image_size is None else ["--no-batch-norm-probe"]
    model = tmp_path / "paper"
    fit = [
        "fit", subset, "--out", model, "--preset", "ensemble-paper", *small,
        "--random-init-missing", "--train-images", "3", "--held-out-fraction", "0.34",
    ]  # fmt: skip
    assert cli.main([*map(str, fit), "--quiet", "--compile-cache", "off"]) == 0
    assert capsys.readouterr().err.count("using random-init weights instead") == 3
    with pytest.warns(UserWarning, match="random-init"):
        loaded = patchcore_jax.load(model)
    members = [(m.config.backbone, m.config.layers) for m in loaded.members]
    assert members == [
        ("wide_resnet101_2", ("layer2", "layer3")),
        ("resnext101_32x8d", ("layer2", "layer3")),
        ("densenet201", ("denseblock2", "denseblock3")),
    ]
    for member in loaded.members:  # 2 images in the bank, 1 % of their patches
        rows = member.config.bank_rows(2 * int(np.prod(member.grid_shape)))
        assert member.memory_bank.shape == (rows, 384)
        assert (member.config.coreset_fraction, member.config.num_neighbors) == (0.01, 1)
    evaluate = ["evaluate", model, subset, "--out", tmp_path / "eval", "--no-heatmaps"]
    assert cli.main([*map(str, evaluate), "--quiet", "--compile-cache", "off"]) == 0
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert len(metrics["members"]) == 3 and metrics["num_images"] == 6
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    densenet = next(model.glob("v*/member2"))  # each member is a complete checkpoint
    export = ["export", densenet, "--out", tmp_path / "densenet.pcjx", "--platforms", "cpu"]
    assert cli.main([str(arg) for arg in export]) == 0
    program = exported.load(tmp_path / "densenet.pcjx")
    assert program.metadata["config"]["backbone"] == "densenet201"
    if image_size is None:  # the whole ensemble in one program (~0.5 GB of weights): slow only
        whole = tmp_path / "paper.pcjx"
        export = ["export", model, "--out", whole, "--platforms", "cpu"]
        assert cli.main([str(arg) for arg in export]) == 0
        crops = load_images(sorted(Path(subset).glob("test/*/*.png"))[:2], 366, 320)
        outputs = exported.load(whole)(crops)
        member_scores = outputs["member_scores"]  # combined over this batch, as predict does
        assert member_scores.shape == (3, 2) and outputs["decisions"] is None
        combined = np.mean([exported.min_max(scores) for scores in member_scores], axis=0)
        np.testing.assert_array_equal(outputs["image_scores"], combined.astype(np.float32))
