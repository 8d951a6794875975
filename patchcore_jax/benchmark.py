"""The whole-benchmark runner: fit and evaluate every category of an MVTec AD root.

Each category is fitted and evaluated by the workflow calls behind ``patchcore-jax fit`` and
``evaluate`` (``workflows.fit_model``, the bounded-memory fit, and ``workflows.evaluate_model``),
so a category's row equals a separate ``fit`` + ``evaluate`` of it by construction. Output::

    OUT/results.csv         the authors' layout: Row Names, instance_auroc, full_pixel_auroc,
                            full_pro, anomaly_pixel_auroc, anomaly_pro (+ error), then Mean
    OUT/results.md          the same as a Markdown table, with timings and the device
    OUT/timings.csv         per category: features, coreset, calibration, predict per image,
                            compile (seconds)
    OUT/<category>/result.json   everything about one category (metrics, timings, settings)

A category whose ``result.json`` exists with the same settings is not computed again (resume);
``recompute=True`` redoes it. A failing category (bad data, too few images, ...) is recorded
with its error and the others still run.

Timings are wall times of each phase, which end with results on the host (device work
finished): ``features``, ``coreset`` and ``calibration`` are the fit's phases
(``PatchCore.fit_timings``: decode + embed the training images, subsample the bank, the
config's calibration, 0 with ``calibration="none"``), ``predict_per_image`` decodes, embeds and
scores the test set (divided by its size); ``compile`` is the XLA compilation time inside those
phases (JAX's compile events), already included in them; programs found in a persistent
compilation cache (the CLI's ``--compile-cache``) are not compiled again and do not count.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from patchcore_jax import ensemble, errors, sharding, workflows
from patchcore_jax.backbones import RANDOM_INIT
from patchcore_jax.config import PatchCoreConfig
from patchcore_jax.datasets import folders
from patchcore_jax.files import atomic_write_text, write_csv
from patchcore_jax.image_reader import ImageReader, log_counts
from patchcore_jax.progress import compile_time

# The authors' results.csv columns, and where each comes from in ``metrics.evaluate``.
COLUMNS: dict[str, str] = {
    "instance_auroc": "image_auroc",
    "full_pixel_auroc": "pixel_auroc",
    "full_pro": "pro",
    "anomaly_pixel_auroc": "anomaly_pixel_auroc",
    "anomaly_pro": "anomaly_pro",
}
RESULT_FILE = "result.json"
PHASES = ("features", "coreset", "calibration", "predict_per_image", "compile")


@dataclass
class CategoryResult:
    """One category's outcome: ``metrics`` (``metrics.evaluate`` plus anomaly_pro) or ``error``."""

    name: str
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    reused: bool = False

    @property
    def row(self) -> list[float | None]:
        """The authors' five numbers (None where undefined or failed)."""
        return [self.metrics.get(source) for source in COLUMNS.values()]


def find_categories(
    root: str | os.PathLike, names: Sequence[str] | None = None
) -> tuple[list[Path], list[str]]:
    """The category folders of ``root`` (sorted) and one note per folder that was skipped.

    A category folder holds ``train/`` or ``test/`` (one missing is reported when it runs);
    other folders, hidden ones and patchcore-jax output folders are skipped with a note.

    Raises:
      ValueError: ``root`` holds no category folder, or a name in ``names`` is not one.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark root {root} does not exist")
    categories, notes = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folders.is_tool_output(folder):
            continue
        if (folder / "train").is_dir() or (folder / "test").is_dir():
            categories.append(folder)
        else:
            notes.append(f"skipping {folder}: not a category folder (no train/ or test/)")
    if names is not None:
        by_name = {folder.name: folder for folder in categories}
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise ValueError(
                f"--categories: {', '.join(unknown)} not found in {root} "
                f"(categories there: {', '.join(by_name) or 'none'})"
            )
        categories = [by_name[name] for name in names]
    if not categories:
        raise ValueError(
            f"{root} holds no category folders (expected <category>/train and <category>/test, "
            "the MVTec AD layout)"
        )
    return categories, notes


def device_description() -> str:
    """E.g. ``8 x cpu (cpu)`` or ``1 x NVIDIA H200 (gpu)``."""
    import jax

    devices = jax.devices()
    return f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"


def evaluate_category(
    category: str | os.PathLike,
    configs: Sequence[PatchCoreConfig],
    *,
    train_images: int | None = None,
    train_seed: int = 0,
    backbones: Sequence[Any] | None = None,
    mesh: Any = None,
    reader: ImageReader | None = None,
    progress: workflows.Progress | None = None,
) -> CategoryResult:
    """Fits ``configs`` (one model, or the members of an ensemble) on a category's training
    images (``train_images`` of them, drawn by ``folders.few_shot_subset``) and evaluates them on
    its test set, timing each phase: ``workflows.fit_model`` (the bounded-memory fit) and
    ``workflows.evaluate_model``, the calls behind ``fit`` and ``evaluate``.

    Args:
      reader: how images are read (``workflows.fit_folder``); default: threads, no cache.
      progress: ``progress(stage, count, total)`` (``workflows``), stages prefixed with the
        category's name; default none.
    Raises:
      ValueError / OSError for bad data (before any fitting) or an unfit configuration.
    """
    category = Path(category)
    report = progress or (lambda stage, count, total: None)

    def stage_progress(stage: str, count: int, total: int) -> None:
        report(f"{category.name} {stage}", count, total)

    with sharding.agreed():  # every process's reads pass, or every process stops here
        ensemble.check_members(configs)
        dataset = folders.load_dataset(category)
        folders.validate_masks(dataset)
        train_paths = list(dataset.train_paths)
        if train_images is not None:
            train_paths = folders.few_shot_subset(train_paths, train_images, train_seed)
        masks = workflows.test_masks(dataset, configs[0])
        workflows.check_usable(train_paths, configs[0], "training images", reader)  # first
        workflows.check_usable(dataset.test_image_paths, configs[0], "test images", reader)
        model = workflows.build_model(configs, len(train_paths), backbones=backbones, mesh=mesh)
    with compile_time() as compiled:
        workflows.fit_model(model, train_paths, reader=reader, progress=stage_progress)
        evaluation = workflows.evaluate_model(
            model, dataset, masks, reader=reader, progress=stage_progress
        )
    timings = {
        **workflows.fit_timings(model),
        "predict_per_image": evaluation.scoring_seconds / len(dataset.test_samples),
        "compile": compiled[0],
    }
    results = dict(evaluation.metrics)
    results["num_train"] = len(train_paths)
    results["train_images"] = [path.name for path in train_paths]
    return CategoryResult(category.name, metrics=results, timings=timings)


def settings_record(
    configs: Sequence[PatchCoreConfig],
    train_images: int | None,
    train_seed: int,
    backbones: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """What decides a category's numbers; a stored result is reused only if it matches.
    ``backbones`` with random-init weights are recorded (``random_init_backbones``), so that a
    run with the real weights never reuses their results."""
    record = {
        "configs": [config.to_dict() for config in configs],
        "train_images": train_images,
        "train_seed": train_seed if train_images is not None else None,
    }
    random_init = [b.name for b in backbones or () if b and b.weights_sha256 == RANDOM_INIT]
    if random_init:
        record["random_init_backbones"] = random_init
    return record


def settings_warnings(settings: dict[str, Any]) -> list[str]:
    """What the log and results.md must say about ``settings``: random-init weights."""
    names = settings.get("random_init_backbones")
    if not names:
        return []
    return [
        f"random-init weights for {', '.join(names)} (their weights are absent): these numbers "
        "mean nothing"
    ]


def run_benchmark(
    root: str | os.PathLike,
    out: str | os.PathLike,
    configs: Sequence[PatchCoreConfig],
    *,
    categories: Sequence[str] | None = None,
    train_images: int | None = None,
    train_seed: int = 0,
    recompute: bool = False,
    backbones: Sequence[Any] | None = None,
    mesh: Any = None,
    reader: ImageReader | None = None,
    log: Callable[[str], None] = lambda message: None,
    progress: workflows.Progress | None = None,
) -> list[CategoryResult]:
    """Runs ``evaluate_category`` on every category of ``root`` and writes ``out`` (module
    docstring). Returns the results in category order; failed ones carry ``error``.
    ``reader``: how images are read (``evaluate_category``); its counts are logged at the end.

    With several processes (``workflows``) process 0 alone writes ``out``.

    Raises:
      ValueError / OSError before any work: no categories, an unknown category, ``out`` not
      usable, or a stored result computed with other settings (without ``recompute``).
    """
    folders, notes = find_categories(root, categories)
    for note in notes:
        log(note)
    settings = settings_record(configs, train_images, train_seed, backbones)
    warnings = settings_warnings(settings)
    for warning in warnings:
        log(f"note: {warning}")
    device = device_description()
    results: list[CategoryResult] = []
    inputs = {"backbones": backbones, "mesh": mesh, "reader": reader, "progress": progress}
    with contextlib.ExitStack() as stack:
        with sharding.agreed():
            out_dir = stack.enter_context(workflows.primary_output_folder(out, resume=True))
            stored = {
                folder.name: _stored_result(out_dir / folder.name, settings) for folder in folders
            }
        for position, folder in enumerate(folders, start=1):
            prefix = f"[{position}/{len(folders)}] {folder.name}"
            previous = stored[folder.name]
            if previous is not None and not recompute:
                results.append(previous)
                log(f"{prefix}: done before, reused (pass --recompute to redo)")
                continue
            start = time.perf_counter()
            try:
                result = evaluate_category(
                    folder, configs, train_images=train_images, train_seed=train_seed, **inputs
                )
            except errors.USER_ERRORS as error:  # a category's bad input; Ctrl-C ends the run
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                result = CategoryResult(folder.name, error=message)
            record = {
                "category": folder.name,
                "dataset": str(folder),
                "status": "failed" if result.error else "ok",
                "error": result.error,
                "settings": settings,
                "device": device,
                "timings_s": result.timings,
                "metrics": result.metrics,
            }
            with sharding.agreed():
                if sharding.is_primary_process():
                    (out_dir / folder.name).mkdir(exist_ok=True)
                    text = json.dumps(record, indent=2) + "\n"
                    atomic_write_text(out_dir / folder.name / RESULT_FILE, text)
            results.append(result)
            if result.error:
                log(f"{prefix}: failed: {result.error}")
            else:
                numbers = " ".join(
                    f"{name} {_number(value)}"
                    for name, value in zip(COLUMNS, result.row, strict=True)
                )
                log(f"{prefix}: {numbers} ({time.perf_counter() - start:.1f} s)")
        with sharding.agreed():
            if sharding.is_primary_process():
                write_tables(out_dir, results, device, warnings)
    log_counts(reader, log)
    return results


def _stored_result(category_dir: Path, settings: dict[str, Any]) -> CategoryResult | None:
    """The finished result in ``category_dir`` (None if absent or failed); ValueError if it was
    computed with other settings."""
    path = category_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        status, stored_settings = record["status"], record["settings"]
    except (ValueError, KeyError, TypeError):
        return None  # damaged: computed again
    if status != "ok":
        return None
    if stored_settings != settings:
        raise ValueError(
            f"{path} was computed with other settings; pass --recompute to replace it, or "
            "choose another --out"
        )
    return CategoryResult(
        record["category"], metrics=record["metrics"], timings=record["timings_s"], reused=True
    )


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _cell(value: Any) -> Any:
    """A results.csv cell: floats in full (repr), None empty."""
    return "" if value is None else (repr(value) if isinstance(value, float) else value)


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(present)) if present else None


def write_tables(
    out_dir: Path, results: Sequence[CategoryResult], device: str, notes: Sequence[str] = ()
) -> None:
    """results.csv (the authors' layout + error), results.md (with ``notes``, e.g. random-init
    weights) and timings.csv.

    The mean row averages the categories that have the value (failed ones are left out).
    """
    names = list(COLUMNS)
    rows = [[r.name, *r.row, r.error or ""] for r in results]
    means = [_mean([r.row[i] for r in results if not r.error]) for i in range(len(names))]
    failed = sum(1 for r in results if r.error)
    mean_row = ["Mean", *(_cell(v) for v in means), f"{failed} failed" if failed else ""]
    write_csv(
        out_dir / "results.csv",
        ["Row Names", *names, "error"],
        [*([_cell(v) for v in row] for row in rows), mean_row],
    )
    write_csv(
        out_dir / "timings.csv",
        ["category", *(f"{phase}_s" for phase in PHASES), "num_train", "num_test"],
        [
            [
                r.name,
                *(f"{r.timings.get(phase, 0.0):.6g}" for phase in PHASES),
                r.metrics.get("num_train", ""),
                r.metrics.get("num_images", ""),
            ]
            for r in results
            if not r.error
        ],
    )

    lines = [
        "| Category | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for r in results:
        cells = ["failed"] * len(names) if r.error else [_number(v) for v in r.row]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    lines.append("| **Mean** | " + " | ".join(_number(v) for v in means) + " |")
    lines += [*(f"\n**Note: {note}.**" for note in notes), "", f"Device: {device}", ""]
    lines.append("| Category | " + " | ".join(PHASES) + " (s) |")
    lines.append("|---|" + "---:|" * len(PHASES))
    for r in results:
        if not r.error:
            cells = [f"{r.timings.get(phase, 0.0):.4g}" for phase in PHASES]
            lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    for r in results:
        if r.error:
            lines.append(f"\n{r.name} failed: {r.error}")
    atomic_write_text(out_dir / "results.md", "\n".join(lines) + "\n")
