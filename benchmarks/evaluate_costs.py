"""``patchcore-jax evaluate`` end to end, this tree against another checkout (e.g. a ``git
worktree`` of the previous main), and where its seconds go.

Every run is a fresh process (``python -m patchcore_jax evaluate MODEL DATA --no-heatmaps``,
with ``PYTHONPATH`` at the tree measured) timed by this script from start to exit; the trees
alternate (A, B, A, B, ...) so that load from other jobs falls on both alike. Two cache states:

  cold  an empty persistent compilation cache folder (a user's first run: every program
        compiles, and is written to the cache);
  warm  the folder a previous run of the same tree filled (a user's later runs).

Inside the process the run also reports its phases (wall seconds, wrapped where the tree has
the function): imports, the model load (of which the BatchNorm probe and the scoring bank's
arrays), the test images' check (one decode), the masks, scoring (decoding, compilation and
the scoring program; ``decode`` is the time the scoring loop waited for decoded batches),
metrics, the figures and CSV, and JAX's own compile events (tracing, lowering, backend
compilation or cache retrieval).

    python benchmarks/evaluate_costs.py --baseline /work/wt-base5 --model MODEL --data DATA
        [--baseline-model MODEL] [--rounds 3] [--out benchmarks/results/evaluate_costs.md]

MODEL is a ``fit`` checkpoint both trees load (e.g. ``fit DATA --backbone wide_resnet50_2
--random-init-missing --precision fast``), or, with ``--baseline-model``, the same model as each
tree's ``fit`` writes it (this tree's load of the baseline's checkpoint, saved again). The
metrics of every run must be the same (checked: a difference stops the benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO_ROOT, RESULTS, cpu_model, write_results

# (label, module, attribute): wrapped in the measured process when the tree has it. A
# function looked up through its module at call time is timed wherever it is called from.
PHASES = (
    ("model load", "patchcore_jax.workflows", "_load"),
    ("probe", "patchcore_jax.backbones", "probe_batch_norm"),
    ("bank arrays", "patchcore_jax.programs", "scoring_bank"),
    ("check images", "patchcore_jax.workflows", "check_usable"),
    ("masks", "patchcore_jax.workflows", "test_masks"),
    ("scoring", "patchcore_jax.workflows", "score_files"),
    ("scoring + metrics", "patchcore_jax.workflows", "evaluate_model"),
    ("per-type metrics", "patchcore_jax.workflows", "evaluation_report"),
    ("figures", "patchcore_jax.reports", "write_score_figures"),
    ("per_image.csv", "patchcore_jax.reports", "write_per_image"),
    ("scores.csv, heatmaps", "patchcore_jax.reports", "write_predictions"),  # predict
)
COMPILE_EVENTS = {
    "trace": "/jax/core/compile/jaxpr_trace_duration",
    "lower": "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "compile": "/jax/core/compile/backend_compile_duration",
}


def worker(arguments: list[str]) -> None:
    """Runs in the measured tree: the CLI in this process, printing its phases as JSON."""
    start = time.perf_counter()
    import importlib

    seconds: dict[str, float] = {}

    def timed(label, function):
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - begin

        return wrapper

    from jax import monitoring

    def record(event, duration, **kwargs):
        for label, name in COMPILE_EVENTS.items():
            if event == name:
                seconds[f"jax {label}"] = seconds.get(f"jax {label}", 0.0) + duration

    monitoring.register_event_duration_secs_listener(record)
    from patchcore_jax import cli, preprocess, workflows  # noqa: F401  (the evaluate imports)

    seconds["imports"] = time.perf_counter() - start
    for label, module_name, attribute in PHASES:
        module = importlib.import_module(module_name)
        if hasattr(module, attribute):
            setattr(module, attribute, timed(label, getattr(module, attribute)))
    batches = preprocess.iter_image_batches

    def waited_batches(*args, **kwargs):
        iterator = batches(*args, **kwargs)
        while True:
            begin = time.perf_counter()
            batch = next(iterator, None)
            seconds["decode"] = seconds.get("decode", 0.0) + time.perf_counter() - begin
            if batch is None:
                return
            yield batch

    preprocess.iter_image_batches = waited_batches
    status = cli.main(arguments)
    seconds["in process"] = time.perf_counter() - start
    print(json.dumps({"status": status, "seconds": seconds}))


def run_once(tree: Path, model: str, data: str, cache: Path, out: Path) -> dict:
    """One evaluate in a fresh process of ``tree``: wall seconds and the phases it reported."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "evaluate",
        model,
        data,
        "--out",
        str(out),
        "--no-heatmaps",
        "--overwrite",
        "--quiet",
        "--compile-cache",
        str(cache),
    ]
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    begin = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tree)
    wall = time.perf_counter() - begin
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: evaluate failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    report = json.loads((out / "metrics.json").read_text())
    metrics = {key: value for key, value in report.items() if isinstance(value, float | int)}
    return {"wall": wall, **result["seconds"], "metrics": metrics}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def table(runs: dict[tuple[str, str], list[dict]], trees: list[str]) -> list[str]:
    """Median seconds per phase (min in brackets) of each tree and cache state."""
    columns = [(tree, cache) for cache in ("cold", "warm") for tree in trees]
    labels = ["wall", "in process", "imports"] + [label for label, _, _ in PHASES]
    labels += ["decode", *(f"jax {label}" for label in COMPILE_EVENTS)]
    lines = [
        "| phase | " + " | ".join(f"{tree} {cache}" for tree, cache in columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for label in labels:
        cells = []
        for column in columns:
            values = [run[label] for run in runs[column] if label in run]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f})" if values else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, type=Path, help="the other checkout")
    parser.add_argument("--model", required=True, help="a fitted checkpoint folder")
    parser.add_argument(
        "--baseline-model", help="the checkpoint the baseline loads (default: --model)"
    )
    parser.add_argument("--data", required=True, help="MVTec AD category folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "evaluate_costs.md")
    args = parser.parse_args()
    trees = {"baseline": args.baseline.resolve(), "this": REPO_ROOT}
    models = {"baseline": args.baseline_model or args.model, "this": args.model}
    runs: dict[tuple[str, str], list[dict]] = {
        (name, cache): [] for name in trees for cache in ("cold", "warm")
    }
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="evaluate-costs-") as scratch:
        scratch = Path(scratch)
        warm = {name: scratch / f"warm-{name}" for name in trees}
        for name, tree in trees.items():  # fills each tree's warm cache (untimed)
            run_once(tree, models[name], args.data, warm[name], scratch / "out")
        for index in range(args.rounds):
            for name, tree in trees.items():
                cold = scratch / f"cold-{name}-{index}"
                for cache, folder in (("cold", cold), ("warm", warm[name])):
                    run = run_once(tree, models[name], args.data, folder, scratch / "out")
                    runs[name, cache].append(run)
                    first = runs["baseline", "cold"][0]["metrics"]
                    if run["metrics"] != first:
                        raise SystemExit(f"{name}: metrics differ: {run['metrics']} != {first}")
                    print(f"round {index} {name} {cache}: {run['wall']:.1f} s", flush=True)
    load_after = loadavg()
    speedups = []
    for cache in ("cold", "warm"):
        base = statistics.median(run["wall"] for run in runs["baseline", cache])
        this = statistics.median(run["wall"] for run in runs["this", cache])
        speedups.append(f"{cache} cache: {base:.1f} s -> {this:.1f} s ({base / this:.2f}x)")
    model = (
        args.model
        if args.baseline_model is None
        else f"{args.model} (baseline: {args.baseline_model})"
    )
    body = [
        f"`evaluate {model} {args.data} --no-heatmaps`, fresh processes alternating "
        f"baseline ({trees['baseline']}) and this tree ({REPO_ROOT}), {args.rounds} rounds; "
        "median seconds (min in brackets). Phases nest: the probe and the bank arrays are "
        "part of the model load, decoding and compilation part of scoring. Every run's "
        "metrics (AUROCs, PRO, F1, ...) are the same.",
        "",
        "End to end (median wall): " + "; ".join(speedups) + ".",
        "",
        *table(runs, list(trees)),
    ]
    notes = [f"Load average: {load_before} before, {load_after} after (shared machine)"]
    machine_line = f"{cpu_model()}, {os.cpu_count()} cores (XLA CPU)"
    text = write_results(args.out, "evaluate end to end: fixed costs", machine_line, notes, body)
    print(text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main()
