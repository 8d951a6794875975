"""workflows.py: fit a folder, evaluate a dataset, predict files, as library calls (README),
on conftest's subset of MVTec AD bottle (10 train, 3 good and 3 defective test images)."""

import csv
import json
import re
from collections import defaultdict

import numpy as np
import pytest
from conftest import REPO_ROOT

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
