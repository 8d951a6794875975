"""Fit and predict of this tree against another checkout (e.g. a ``git worktree`` of the
previous main), side by side in one run.

Every measurement runs in a fresh process (so compilation is included, as for a user's first
``fit``, and no persistent compilation cache is used), with ``PYTHONPATH`` pointing at the tree
being measured; the two trees alternate (A, B, A, B, ...) so that load from other jobs on the
shared machine falls on both alike, and the best of ``--rounds`` is kept.

  fit       ``PatchCore(config, backbone).fit(iter_image_batches(train paths))``: decoding,
            backbone, features, coreset and calibration, end to end (model construction and the
            BatchNorm probe included), plus the phase times the model logs;
  predict   ``model.predict`` over the test images repeated to ``--predict-images`` (decoded
            once beforehand), after one warm-up batch: steady-state images/s.

    python benchmarks/side_by_side.py --baseline /work/wt-base [--backbone wide_resnet50_2]
        [--precision exact|fast] [--rounds 2] [--out benchmarks/results/side_by_side.md]

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

    result = {
        "module": str(Path(patchcore_jax.__file__).parent.parent),
        "import_s": imported - start,
        "fit_s": fitted - imported,
        "log": log_lines,
        "bank_rows": int(model.memory_bank.shape[0]),
        "bank_checksum": float(np.asarray(model.memory_bank, np.float64).sum()),
    }
    if args.predict_images:
        test_paths = [s.image_path for s in folders.load_dataset(args.data).test_samples]
        images = preprocess.load_images(test_paths, config.resize, 224)
        repeats = -(-args.predict_images // len(images))
        images = np.concatenate([images] * repeats)[: args.predict_images]
        model.predict(images[: config.batch_size])  # compile
        start = time.perf_counter()
        scores, _ = model.predict(images)
        seconds = time.perf_counter() - start
        result["predict_images_per_s"] = len(images) / seconds
        result["score_checksum"] = float(np.asarray(scores[: len(test_paths)], np.float64).sum())
    print(json.dumps(result))


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
                f"predict {result.get('predict_images_per_s', 0):.2f} img/s",
                flush=True,
            )
    load_after = os.getloadavg()
    best = {name: min(r["fit_s"] for r in results) for name, results in runs.items()}
    rows = [
        "| tree | precision | fit s (best) | fit s (all rounds) | phases of the best fit "
        "(s) | predict img/s (best) | bank rows | bank checksum |",
        "|---|---|---:|---|---|---:|---:|---:|",
    ]
    for name, results in runs.items():
        best_run = min(results, key=lambda r: r["fit_s"])
        phases = ", ".join(f"{k} {v:.1f}" for k, v in phase_seconds(best_run["log"]).items())
        predict = max(r.get("predict_images_per_s", 0.0) for r in results)
        precision = args.precision if name == "this tree" else "exact"
        all_rounds = ", ".join(f"{r['fit_s']:.1f}" for r in results)
        rows.append(
            f"| {name} | {precision} | {best[name]:.1f} | {all_rounds} | {phases} | "
            f"{predict:.2f} | {best_run['bank_rows']} | {best_run['bank_checksum']:.6g} |"
        )
    speedup = best["baseline"] / best["this tree"]
    predict_ratio = ""
    if args.predict_images:
        ours = max(r["predict_images_per_s"] for r in runs["this tree"])
        theirs = max(r["predict_images_per_s"] for r in runs["baseline"])
        predict_ratio = f"; predict {ours / theirs:.2f}x the baseline's images/s"
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
            "warm-up batch.",
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
