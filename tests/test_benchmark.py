"""`patchcore-jax benchmark` (benchmark.py) on two small real categories made from MVTec bottle."""

import csv
import json
from pathlib import Path

import pytest
from conftest import BOTTLE
from test_cli import run_cli

from patchcore_jax import benchmark
from patchcore_jax.datasets.folders import few_shot_subset

MODEL = ("--backbone", "mobilenet_v2", "--coreset-fraction", "0.05", "--quiet")
FEW_SHOT = ("--train-images", "4", "--train-seed", "3")


def _link_subset(root: Path, offset: int) -> None:
    """6 train images, 2 good and 2 defective test images (with masks), from ``offset`` on."""
    links = sorted((BOTTLE / "train/good").glob("*.png"))[offset : offset + 6]
    links += sorted((BOTTLE / "test/good").glob("*.png"))[offset : offset + 2]
    for defect in ("broken_large", "contamination"):
        image = sorted((BOTTLE / "test" / defect).glob("*.png"))[offset]
        links += [image, BOTTLE / "ground_truth" / defect / f"{image.stem}_mask.png"]
    for source in links:
        target = root / source.relative_to(BOTTLE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)


@pytest.fixture(scope="module")
def benchmark_root(tmp_path_factory) -> Path:
    """bottle (a real subset), bottle_copy (another subset, renamed), a category without test
    images, and a folder that is not a category."""
    root = tmp_path_factory.mktemp("benchmark_root")
    _link_subset(root / "bottle", 0)
    _link_subset(root / "bottle_copy", 1)
    (root / "no_test/train/good").mkdir(parents=True)
    for source in sorted((BOTTLE / "train/good").glob("*.png"))[:5]:
        (root / "no_test/train/good" / source.name).symlink_to(source)
    (root / "notes").mkdir()
    (root / "notes/readme.txt").write_text("not a category\n")
    return root


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {row["Row Names"]: row for row in csv.DictReader(f)}


def test_benchmark_rows_equal_separate_fit_and_evaluate_runs_and_resume_reuses_them(
    benchmark_root, tmp_path
):
    out = tmp_path / "results"
    result = run_cli("benchmark", benchmark_root, "--out", out, *MODEL, *FEW_SHOT, check=False)
    # the category without test images fails, is reported, and the others still run
    assert result.returncode == 1, result.stderr
    assert f"skipping {benchmark_root / 'notes'}" in result.stderr
    assert "[3/3] no_test: failed:" in result.stderr and "test folder" in result.stderr
    assert "2 of 3 categories ok, 1 failed (no_test)" in result.stderr
    rows = _rows(out / "results.csv")
    assert list(rows) == ["bottle", "bottle_copy", "no_test", "Mean"]
    assert list(rows["bottle"])[:6] == ["Row Names", *benchmark.COLUMNS]
    assert "does not exist" in rows["no_test"]["error"]
    assert rows["Mean"]["error"] == "1 failed"

    compile_seconds = {}
    for category in ("bottle", "bottle_copy"):
        data = benchmark_root / category
        model = tmp_path / f"{category}_model"
        run_cli("fit", data, "--out", model, *MODEL, *FEW_SHOT)
        run_cli(
            "evaluate",
            model,
            data,
            "--out",
            tmp_path / f"{category}_eval",
            "--no-heatmaps",
            "--quiet",
        )
        expected = json.loads((tmp_path / f"{category}_eval/metrics.json").read_text())
        for column, key in benchmark.COLUMNS.items():
            assert float(rows[category][column]) == expected[key], (category, column)
        record = json.loads((out / category / "result.json").read_text())
        chosen = few_shot_subset(sorted((data / "train/good").iterdir()), 4, seed=3)
        assert record["metrics"]["train_images"] == [p.name for p in chosen]
        assert record["metrics"]["num_train"] == 4
        assert set(record["timings_s"]) == set(benchmark.PHASES)
        assert record["timings_s"]["features"] > 0
        compile_seconds[category] = record["timings_s"]["compile"]
    # The second category has the first one's shapes: it reuses the compiled programs.
    assert compile_seconds["bottle"] > 0
    assert compile_seconds["bottle_copy"] < compile_seconds["bottle"] / 4
    for column in benchmark.COLUMNS:
        mean = (float(rows["bottle"][column]) + float(rows["bottle_copy"][column])) / 2
        assert float(rows["Mean"][column]) == pytest.approx(mean, rel=1e-12)
    markdown = (out / "results.md").read_text()
    assert "| bottle |" in markdown and "Device:" in markdown and "no_test failed" in markdown
    assert (out / "timings.csv").read_text().count("\n") == 3  # header + 2 categories

    finished = {c: (out / c / "result.json").read_text() for c in ("bottle", "bottle_copy")}
    again = run_cli("benchmark", benchmark_root, "--out", out, *MODEL, *FEW_SHOT, check=False)
    assert again.returncode == 1
    assert "[1/3] bottle: done before, reused" in again.stderr
    assert "[2/3] bottle_copy: done before, reused" in again.stderr
    assert {c: (out / c / "result.json").read_text() for c in finished} == finished
    assert _rows(out / "results.csv") == rows

    # other settings into the same folder: refused, nothing recomputed
    other = run_cli(
        "benchmark", benchmark_root, "--out", out, *MODEL, "--categories", "bottle", check=False
    )
    assert other.returncode == 2 and "[1/1]" not in other.stderr
    error = other.stderr.strip().splitlines()[-1]
    assert error.startswith("patchcore-jax: error: ") and "pass --recompute" in error


def test_benchmark_of_an_empty_root_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("benchmark", tmp_path / "empty", "--out", tmp_path / "out", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"patchcore-jax: error: {tmp_path / 'empty'} holds no category folders (expected "
        "<category>/train and <category>/test, the MVTec AD layout)"
    ]


def test_find_categories_skips_other_folders_and_checks_requested_names(benchmark_root):
    folders, notes = benchmark.find_categories(benchmark_root)
    assert [f.name for f in folders] == ["bottle", "bottle_copy", "no_test"]
    assert len(notes) == 1 and "notes" in notes[0]
    folders, _ = benchmark.find_categories(benchmark_root, ["bottle_copy"])
    assert [f.name for f in folders] == ["bottle_copy"]
    with pytest.raises(ValueError, match="cable not found"):
        benchmark.find_categories(benchmark_root, ["cable"])
