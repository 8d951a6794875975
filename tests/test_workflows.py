"""workflows.py: fit a folder, evaluate a dataset, predict files, as library calls (README),
on conftest's subset of MVTec AD bottle (10 train, 3 good and 3 defective test images)."""

import csv
import json
import re
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

from patchcore_jax import PatchCoreConfig, benchmark, workflows
from patchcore_jax.datasets import folders

CONFIG = PatchCoreConfig(backbone="mobilenet_v2", coreset_fraction=0.05)


class Recorder:
    """A ``progress`` callback that sums the counts per stage and remembers the totals."""

    def __init__(self):
        self.counts = defaultdict(int)
        self.totals = defaultdict(set)

    def __call__(self, stage, count, total):
        self.counts[stage] += count
        self.totals[stage].add(total)


def test_readme_library_snippet_fits_evaluates_and_predicts(subset, tmp_path, monkeypatch):
    readme = (REPO_ROOT / "README.md").read_text()
    library = readme[readme.index("## Library") :]
    snippet = re.search(r"```python\n(.*?)```", library, re.S).group(1)
    assert "workflows.fit_folder" in snippet and "workflows.evaluate_dataset" in snippet
    monkeypatch.chdir(tmp_path)  # the snippet writes runs/lib/...
    namespace = {}
    exec(snippet.replace('"data/mvtec_ad_demo/bottle"', repr(str(subset))), namespace)

    report, predictions = namespace["report"], namespace["predictions"]
    out = tmp_path / "runs/lib"
    assert json.loads((out / "evaluation/metrics.json").read_text()) == json.loads(
        json.dumps(report)
    )
    assert report["num_images"] == 6 and report["image_auroc"] >= 0.8
    assert set(report["per_defect_type"]) == {"broken_large", "broken_small", "contamination"}
    with open(out / "evaluation/per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["defect_type"] for r in rows] == [
        "broken_large", "broken_small", "contamination", "good", "good", "good"
    ]  # fmt: skip
    assert all((out / "evaluation" / r["heatmap"]).is_file() for r in rows)
    assert len(predictions.image_scores) == 1 and predictions.decisions.dtype == bool
    with open(out / "predictions/scores.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["name"] == "broken_large/000.png" and (out / "predictions" / row["mask"]).is_file()
    evaluated = {r["image"]: float(r["score"]) for r in rows}
    assert float(row["score"]) == pytest.approx(evaluated[row["image"]], rel=1e-5)


def test_progress_reaches_every_stage_total_and_a_benchmark_row_is_the_evaluation(subset, tmp_path):
    recorder = Recorder()
    model = workflows.fit_folder(subset, tmp_path / "model", CONFIG, progress=recorder)
    report = workflows.evaluate_dataset(model, subset, tmp_path / "eval", progress=recorder)
    steps = model.bank_size(10)
    for stage, total in [("features", 10), ("coreset", steps), ("scoring", 6), ("heatmaps", 6)]:
        assert recorder.totals[stage] == {total} and recorder.counts[stage] == total, stage
    # The benchmark's row is the same evaluation (the same calls on the same images).
    row = benchmark.evaluate_category(subset, [CONFIG])
    for key, value in row.metrics.items():
        if key not in ("num_train", "train_images"):
            assert report[key] == value, key
    assert set(row.timings) == set(benchmark.PHASES)
    assert row.timings["calibration"] > 0  # self-excluded by default, timed on its own


def test_evaluate_model_scores_the_test_set_against_its_masks(subset):
    dataset = folders.load_dataset(subset, train=False)
    model = workflows.build_model(
        CONFIG.replace(sampler="identity", calibration="none", coreset_fraction=1.0), 3
    )
    workflows.fit_model(model, dataset.test_image_paths[3:])  # the three good test images
    masks = workflows.test_masks(dataset, model.config)
    evaluation = workflows.evaluate_model(model, dataset, masks, keep_images=True)
    assert evaluation.images.shape == (6, 224, 224, 3) and evaluation.images.dtype == np.uint8
    assert evaluation.metrics["num_defective"] == 3
    # The good images are the bank: their patches are their own nearest neighbours.
    assert evaluation.image_scores[3:].max() < evaluation.image_scores[:3].min()
    assert model.calibration is None


def test_bad_input_fails_before_any_work(subset, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises((ValueError, OSError), match="is a file"):
        workflows.fit_folder(subset, tmp_path / "file", CONFIG)
    with pytest.raises(ValueError, match="num_neighbors"):
        workflows.fit_folder(subset, tmp_path / "m", CONFIG.replace(num_neighbors=10**6))
    with pytest.raises(ValueError, match="one model, not an ensemble"):
        workflows.fit_folder(subset, tmp_path / "m", [CONFIG, CONFIG], validation=subset)
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def small_model(subset):
    """A quick uncalibrated model at 128x128 on 3 of the subset's training images."""
    config = CONFIG.replace(resize=128, crop=128, sampler="identity", calibration="none")
    model = workflows.build_model(config, 3)
    return workflows.fit_model(model, sorted((subset / "train/good").iterdir())[:3])


def damaged_copy(subset, root):
    """The subset's test side (links) plus a truncated PNG and a 10x10 image in test/good."""
    for path in [*(subset / "test").rglob("*.png"), *(subset / "ground_truth").rglob("*.png")]:
        target = root / path.relative_to(subset)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    truncated = root / "test/good/100.png"
    truncated.write_bytes((subset / "test/good/000.png").read_bytes()[:20000])
    tiny = root / "test/good/101.png"
    Image.new("RGB", (10, 10), (200, 200, 200)).save(tiny)
    return root, [truncated, tiny]


def test_an_unreadable_or_tiny_image_stops_predict_before_scoring_or_is_skipped_on_request(
    small_model, subset, tmp_path
):
    root, bad = damaged_copy(subset, tmp_path / "data")
    folders_given = [root / "test/good", root / "test/broken_large"]
    with pytest.raises(ValueError, match=r"^2 of 6 images cannot be used: ") as info:
        workflows.predict_files(small_model, folders_given, tmp_path / "refused")
    message = str(info.value)
    assert f"{bad[0]} (OSError: image file is truncated" in message
    assert f"{bad[1]} (10x10 pixels is too small" in message and "--skip-unreadable" in message
    assert not (tmp_path / "refused").exists()  # nothing half-written

    result = workflows.predict_files(
        small_model, folders_given, tmp_path / "pred", heatmaps=False, skip_unreadable=True
    )
    assert [path for path, _ in result.unreadable] == bad
    with open(tmp_path / "pred/unreadable.csv") as f:
        assert [row["image"] for row in csv.DictReader(f)] == [str(path) for path in bad]
    with open(tmp_path / "pred/scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [
        "good/000.png", "good/001.png", "good/002.png", "broken_large/000.png"
    ]  # fmt: skip
    # what was scored is what a run on the readable images alone scores
    readable = [root / "test/good" / n for n in ("000.png", "001.png", "002.png")]
    alone = workflows.predict_files(
        small_model, [*readable, root / "test/broken_large/000.png"], tmp_path / "alone",
        heatmaps=False,
    )  # fmt: skip
    np.testing.assert_array_equal(result.image_scores, alone.image_scores)


def test_an_unreadable_or_tiny_image_stops_evaluate_before_scoring_or_is_left_out_on_request(
    small_model, subset, tmp_path
):
    root, bad = damaged_copy(subset, tmp_path / "data")
    with pytest.raises(ValueError, match=r"^2 of 8 test images cannot be used: .*100.png"):
        workflows.evaluate_dataset(small_model, root, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    report = workflows.evaluate_dataset(
        small_model, root, tmp_path / "eval", heatmaps=False, skip_unreadable=True
    )
    assert [entry["image"] for entry in report["unreadable"]] == [str(path) for path in bad]
    assert any(
        note.startswith("2 unreadable test images were left out") for note in report["notes"]
    )
    assert (tmp_path / "eval/unreadable.csv").is_file()
    clean = workflows.evaluate_dataset(small_model, subset, tmp_path / "clean", heatmaps=False)
    assert clean["unreadable"] == [] and report["num_images"] == clean["num_images"] == 6
    for key in ("image_auroc", "pixel_auroc", "pro", "f1_threshold"):
        assert report[key] == clean[key], key


def test_a_second_predict_with_the_crop_cache_decodes_nothing_and_scores_the_same(
    small_model, subset, tmp_path
):
    from patchcore_jax.image_reader import ImageReader

    images = [subset / "test/good", subset / "test/broken_large"]
    plain = workflows.predict_files(small_model, images, tmp_path / "plain", heatmaps=False)
    for run, (decoded, from_cache) in enumerate([(4, 4), (0, 8)]):  # check, then scoring
        reader = ImageReader(workers=1, cache_dir=tmp_path / "cache")
        logged = []
        cached = workflows.predict_files(
            small_model, images, tmp_path / f"run{run}", heatmaps=False, reader=reader,
            log=logged.append,
        )  # fmt: skip
        assert (reader.decoded, reader.from_cache) == (decoded, from_cache), run
        assert logged == [reader.describe()]
        assert logged[0].startswith(f"crops: {from_cache} from cache, {decoded} decoded")
        np.testing.assert_array_equal(cached.image_scores, plain.image_scores)


def test_cli_predict_with_skip_unreadable_writes_a_summary_and_exits_with_status_1(
    small_model, subset, tmp_path, capsys
):
    from patchcore_jax import checkpoint, cli

    root, bad = damaged_copy(subset, tmp_path / "data")
    model = checkpoint.save(small_model, tmp_path / "model")
    images = [root / "test/good", root / "test/broken_large"]
    args = ["predict", model, *images, "--out", tmp_path / "pred", "--quiet"]
    args = [*map(str, args), "--no-heatmaps", "--compile-cache", "off"]
    assert cli.main(args) == 2
    assert not (tmp_path / "pred").exists()
    assert cli.main([*args, "--skip-unreadable"]) == 1
    err = capsys.readouterr().err
    assert f"skipped 2 unreadable images: {bad[0]} (OSError: image file is truncated" in err
    assert f"listed in {tmp_path / 'pred/unreadable.csv'}" in err and "scored 4 images" in err


def test_fit_refuses_unreadable_tiny_and_thin_training_images_before_any_work(subset, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for source in sorted((subset / "train/good").iterdir())[:2]:
        (good / source.name).symlink_to(source)
    (good / "t.png").write_bytes((subset / "train/good/000.png").read_bytes()[:20000])
    Image.new("RGB", (1, 1)).save(good / "u.png")
    Image.new("RGB", (10000, 50), (128, 128, 128)).save(good / "v.png")
    recorder = Recorder()
    with pytest.raises(ValueError, match=r"^3 of 5 training images cannot be used: ") as info:
        workflows.fit_folder(good, tmp_path / "m", CONFIG, progress=recorder)
    message = str(info.value)
    assert f"{good / 't.png'} (OSError: image file is truncated" in message
    assert f"{good / 'u.png'} (1x1 pixels is too small" in message
    assert f"{good / 'v.png'} (10000x50 pixels is too small" in message
    assert not recorder.counts and not (tmp_path / "m").exists()


def test_fit_refuses_a_validation_folder_sharing_the_training_images(subset, tmp_path):
    validation = tmp_path / "validation"
    validation.mkdir()
    train = sorted((subset / "train/good").iterdir())
    for index, source in enumerate([*train[:2], subset / "test/good/000.png"]):
        (validation / f"{index}.png").symlink_to(source)  # other names, the same files
    with pytest.raises(ValueError, match=r"^2 of 3 validation images are training images too: "):
        workflows.fit_folder(subset, tmp_path / "m", CONFIG, validation=validation)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match=f"validation folder {empty} holds no images") as info:
        workflows.fit_folder(subset, tmp_path / "m", CONFIG, validation=empty)
    assert "training" not in str(info.value)
    assert not (tmp_path / "m").exists()


def test_resume_refuses_ensembles_and_options_that_differ_from_the_model(subset, tmp_path):
    from patchcore_jax import Ensemble, checkpoint

    train = tmp_path / "train"
    train.mkdir()
    for image in sorted((subset / "train/good").glob("*.png"))[:2]:
        (train / image.name).symlink_to(image)
    small = CONFIG.replace(resize=64, crop=64)
    model = workflows.fit_folder(train, tmp_path / "model", small)
    with pytest.raises(ValueError) as error:
        workflows.extend_folder(
            train, tmp_path / "model", config_values={"num_neighbors": 3, "resize": 64}
        )
    assert str(error.value) == (
        f"{tmp_path / 'model'}: its options cannot change when resuming: "
        "PatchCoreConfig.num_neighbors 3 (the model's: 1)"
    )
    same = {"backbone": "mobilenet_v2", "resize": 64, "crop": (64, 64)}  # equal: accepted,
    (tmp_path / "empty").mkdir()  # so the next check is reached: the folder's images
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'} holds no images"):
        workflows.extend_folder(tmp_path / "empty", tmp_path / "model", config_values=same)
    checkpoint.save(Ensemble([model, model]), tmp_path / "ensemble")
    with pytest.raises(ValueError, match="holds an ensemble; ensembles cannot be resumed"):
        workflows.extend_folder(train, tmp_path / "ensemble")


def test_a_patch_stride_shrinks_the_grid_and_survives_checkpoint_export_and_resume(
    subset, tmp_path
):
    """s = 2 on 64-pixel crops: MobileNetV2's 8 x 8 stride-8 grid gives a 4 x 4 patch grid (the
    bank's rows and the maps follow it, maps still image-sized); the checkpoint keeps s, the
    export of the loaded model scores as predict does, and ``--resume`` refuses another s."""
    from test_export import assert_within_rounding

    from patchcore_jax import checkpoint, export, exported
    from patchcore_jax.preprocess import load_images

    train = tmp_path / "train"
    train.mkdir()
    for image in sorted((subset / "train/good").glob("*.png"))[:3]:
        (train / image.name).symlink_to(image)
    config = CONFIG.replace(resize=64, crop=64, patch_stride=2, sampler="identity")
    model = workflows.fit_folder(train, tmp_path / "model", config)
    assert model.grid_shape == (4, 4)
    assert model.memory_bank.shape == (3 * 16, config.target_embed_dimension)
    loaded = checkpoint.load(tmp_path / "model")
    assert loaded.config == config and loaded.grid_shape == (4, 4)
    images = load_images(sorted((subset / "test").rglob("*.png"))[:4], 64, 64)
    assert model.predict(images).anomaly_maps.shape == (4, 64, 64)
    export.export_model(loaded, tmp_path / "model.pcjx", platforms=["cpu"])
    program = exported.load(tmp_path / "model.pcjx")
    assert PatchCoreConfig.from_dict(program.metadata["config"]).patch_stride == 2
    assert_within_rounding(program(images), model, images)
    with pytest.raises(ValueError) as error:
        workflows.extend_folder(train, tmp_path / "model", config_values={"patch_stride": 3})
    assert str(error.value) == (
        f"{tmp_path / 'model'}: its options cannot change when resuming: "
        "PatchCoreConfig.patch_stride 3 (the model's: 2)"
    )


def test_the_commands_import_no_rarely_used_heavy_module():
    """What every command imports (the CLI and the workflows) leaves out the modules that only
    one rarely used step needs: optax (the learned-proxies sampler), scipy (PRO's connected
    components) and the checkpoint's orbax, which load when that step runs."""
    code = (
        "import sys, patchcore_jax.cli, patchcore_jax.workflows; "
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'optax', 'scipy', 'orbax'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert workflows.metrics.pro_score(np.eye(4, dtype=bool)[None], np.eye(4)[None]) == 1.0
