"""Fit and predict of this tree against another checkout (e.g. a ``git worktree`` of the
previous main), side by side in one run.

Every measurement runs in a fresh process (so compilation is included, as for a user's first
``fit``, and no persistent compilation cache is used), with ``PYTHONPATH`` pointing at the tree
being measured; the two trees alternate (A, B, A, B, ...) so that load from other jobs on the
shared machine falls on both alike, and the best of ``--rounds`` is kept.

  fit       ``PatchCore(config, backbone).fit(iter_image_batches(train paths))``: decoding,
            backbone, features, coreset and calibration, end to end (model construction and the
            BatchNorm probe included), plus the phase times the model logs;
  evaluate  ``workflows.evaluate_dataset`` of the fitted model on the test set (decoding,
            the scoring program's compilation, scoring, metrics, ``per_image.csv``; no
            heatmaps), end to end in the same fresh process right after the fit;
  predict   ``model.predict`` over the test images repeated to ``--predict-images`` (decoded
            once beforehand), after one warm-up batch: steady-state images/s (library,
            compilation excluded).

Where the tree has them (``PatchCore.knn_counts``), the certified k-NN's patch queries and
fallbacks are reported for the fit's calibration, ``evaluate`` and ``predict``; an older tree
(e.g. the previous main) shows "-".

    python benchmarks/side_by_side.py --baseline /work/wt-base [--backbone wide_resnet50_2]
        [--precision exact|fast] [--rounds 2] [--predict-images 64] [--evaluate]
        [--out benchmarks/results/side_by_side.md]

The backbone uses random weights for the ResNets (``init_backbone``; the speed does not depend on
the weights) and the shipped weights for MobileNetV2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from common import REPO_ROOT, RESULTS, write_results


def worker(args: argparse.Namespace) -> None:
    """Runs in the measured tree: one fit (or one fit + predict); prints a JSON line."""
    start = time.perf_counter()
    import jax
    import numpy as np

    from patchcore_jax import preprocess
    from patchcore_jax.backbones import init_backbone, load_backbone
    from patchcore_jax.config import PatchCoreConfig
    from patchcore_jax.datasets import folders
    from patchcore_jax.model import PatchCore

    fields = PatchCoreConfig.__dataclass_fields__
    options = {"backbone": args.backbone, "coreset_fraction": args.coreset_fraction}
    if "precision" in fields:
        options["precision"] = args.precision
    elif args.precision != "exact":
        raise SystemExit(f"this tree has no precision option ({args.precision!r} asked)")
    config = PatchCoreConfig(**options)
    train_paths = folders.load_train_paths(args.data)
    log_lines: list[str] = []
    imported = time.perf_counter()
    backbone = (
        load_backbone(args.backbone)
        if args.backbone == "mobilenet_v2"
        else init_backbone(args.backbone, config.layers)
    )
    model = PatchCore(config, backbone=backbone)
    batches = preprocess.iter_image_batches(train_paths, config.batch_size, config.resize, 224)
    model.fit(batches, log=log_lines.append)
    jax.block_until_ready(model.memory_bank)
    fitted = time.perf_counter()
    import patchcore_jax

    knn_counts = {"fit": _counts(model)}
    evaluate_s = None
    if args.evaluate:
        import tempfile

        from patchcore_jax import workflows

        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            workflows.evaluate_dataset(model, args.data, Path(out) / "eval", heatmaps=False)
            evaluate_s = time.perf_counter() - start
        knn_counts["evaluate"] = _counts(model, knn_counts["fit"])

    result = {
        "module": str(Path(patchcore_jax.__file__).parent.parent),
        "import_s": imported - start,
        "fit_s": fitted - imported,
        "log": log_lines,
        "bank_rows": int(model.memory_bank.shape[0]),
        "bank_checksum": float(np.asarray(model.memory_bank, np.float64).sum()),
        "evaluate_s": evaluate_s,
        "knn_counts": knn_counts,
    }
    if args.predict_images:
        test_paths = [s.image_path for s in folders.load_dataset(args.data).test_samples]
        images = preprocess.load_images(test_paths, config.resize, 224)
        repeats = -(-args.predict_images // len(images))
        images = np.concatenate([images] * repeats)[: args.predict_images]
        model.predict(images[: config.batch_size])  # compile
        before = _counts(model)
        start = time.perf_counter()
        prediction = model.predict(images)  # a tuple in trees before calibration.Prediction
        scores = prediction[0] if isinstance(prediction, tuple) else prediction.image_scores
        seconds = time.perf_counter() - start
        result["predict_images_per_s"] = len(images) / seconds
        result["score_checksum"] = float(np.asarray(scores[: len(test_paths)], np.float64).sum())
        knn_counts["predict"] = _counts(model, before)
    print(json.dumps(result))


def _counts(model, before: dict | None = None) -> dict | None:
    """The certified k-NN's ``{"queries", "fallbacks"}`` so far (less ``before``), or None
    where the tree does not count them."""
    counts = getattr(model, "knn_counts", None)
    if counts is None:
        return None
    return {key: value - (before or {}).get(key, 0) for key, value in counts.items()}


def run_tree(tree: Path, args: argparse.Namespace, predict_images: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--data",
        str(args.data),
        "--backbone",
        args.backbone,
        "--precision",
        args.precision if tree == REPO_ROOT else "exact",
        "--coreset-fraction",
        str(args.coreset_fraction),
        "--predict-images",
        str(predict_images),
        *(["--evaluate"] if args.evaluate else []),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tree)
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def phase_seconds(log: list[str]) -> dict[str, float]:
    """Seconds of the phases the model logs ("memory bank: ... in 12.3 s", "calibration: ...")."""
    phases = {}
    for line in log:
        match = re.search(r" in ([0-9.]+) s", line)
        if match and line.startswith("memory bank:") and "->" in line:
            phases["coreset"] = float(match.group(1))
        elif match and line.startswith("calibration:"):
            phases["calibration"] = float(match.group(1))
        elif match and line.startswith("features:"):
            phases["features"] = float(match.group(1))
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", type=Path, help="the other checkout (e.g. a git worktree)")
    parser.add_argument(
        "--data", type=Path, default=REPO_ROOT.parent / "shared/data/mvtec_ad/bottle"
    )
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--precision", default="exact", choices=("exact", "fast"))
    parser.add_argument("--coreset-fraction", type=float, default=0.1)
    parser.add_argument("--predict-images", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--evaluate", action="store_true", help="also time evaluate, end to end")
    parser.add_argument("--out", type=Path, default=RESULTS / "side_by_side.md")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.baseline is None:
        parser.error("--baseline is required")
    import jax  # noqa: F401  (machine description only)
    from common import machine

    trees = {"baseline": args.baseline.resolve(), "this tree": REPO_ROOT}
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for round_index in range(args.rounds):
        for name, tree in trees.items():
            result = run_tree(tree, args, args.predict_images)
            if Path(result["module"]) != tree:
                raise RuntimeError(f"{name}: imported patchcore_jax from {result['module']}")
            runs[name].append(result)
            print(
                f"round {round_index + 1} {name}: fit {result['fit_s']:.1f} s, "
                f"{phase_seconds(result['log'])}, "
                f"evaluate {result.get('evaluate_s') or 0:.1f} s, "
                f"predict {result.get('predict_images_per_s', 0):.2f} img/s, "
                f"k-NN {result.get('knn_counts')}",
                flush=True,
            )
    load_after = os.getloadavg()
    best = {name: min(r["fit_s"] for r in results) for name, results in runs.items()}
    rows = [
        "| tree | precision | fit s (best) | fit s (all rounds) | phases of the best fit "
        "(s) | calibration s (best) | evaluate s (best) | predict img/s (best) | k-NN "
        "fallbacks / patch queries (fit, evaluate, predict) | bank rows | bank checksum |",
        "|---|---|---:|---|---|---:|---:|---:|---|---:|---:|",
    ]
    summary = {}
    for name, results in runs.items():
        best_run = min(results, key=lambda r: r["fit_s"])
        phases = ", ".join(f"{k} {v:.1f}" for k, v in phase_seconds(best_run["log"]).items())
        summary[name] = {
            "fit": best[name],
            "calibration": min(phase_seconds(r["log"]).get("calibration", 0) for r in results),
            "evaluate": min((r.get("evaluate_s") or float("inf")) for r in results),
            "predict": max(r.get("predict_images_per_s", 0.0) for r in results),
        }
        precision = args.precision if name == "this tree" else "exact"
        all_rounds = ", ".join(f"{r['fit_s']:.1f}" for r in results)
        counts = best_run.get("knn_counts") or {}
        fallbacks = ", ".join(
            "-" if not counts.get(key) else f"{counts[key]['fallbacks']} / {counts[key]['queries']}"
            for key in ("fit", "evaluate", "predict")
        )
        cells = summary[name]
        rows.append(
            f"| {name} | {precision} | {best[name]:.1f} | {all_rounds} | {phases} | "
            f"{cells['calibration']:.1f} | {cells['evaluate']:.1f} | {cells['predict']:.2f} | "
            f"{fallbacks} | {best_run['bank_rows']} | {best_run['bank_checksum']:.6g} |"
        )
    speedup = best["baseline"] / best["this tree"]
    ours, theirs = summary["this tree"], summary["baseline"]
    calibration = theirs["calibration"] / max(ours["calibration"], 1e-9)
    predict_ratio = f"; calibration phase {calibration:.2f}x faster"
    if args.evaluate:
        predict_ratio += f"; evaluate {theirs['evaluate'] / ours['evaluate']:.2f}x faster"
    if args.predict_images:
        predict_ratio += (
            f"; predict {ours['predict'] / theirs['predict']:.2f}x the baseline's images/s"
        )
    text = write_results(
        args.out,
        f"Fit and predict side by side: {args.backbone}, {args.precision}",
        machine("cpu"),
        [
            f"Baseline: {args.baseline} (git {_git_head(args.baseline)}); this tree: git "
            f"{_git_head(REPO_ROOT)}",
            f"Load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f}",
        ],
        [
            f"Bottle training images ({args.data}), coreset {args.coreset_fraction:g}, default "
            "config otherwise; a fresh process per fit (compilation included, no persistent "
            f"cache), trees alternating, {args.rounds} rounds. Predict: "
            f"{args.predict_images} test images (repeated), decoded beforehand, after one "
            "warm-up batch. Evaluate: the whole test set, right after the fit, in the same "
            "process. Ratios: best against best.",
            "",
            *rows,
            "",
            f"Fit: this tree takes {1 / speedup:.2f}x the baseline's time ({speedup:.2f}x "
            f"faster){predict_ratio}.",
        ],
    )
    print(text)
    return 0


def _git_head(tree: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
