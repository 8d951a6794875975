"""Exported program images/s at batch 1/8/32: the previous ``lax.map`` program (one image at a
time, built and run by another checkout, e.g. a ``git worktree`` of the previous main) against
this tree's batched program (the bank inside, and the bank as an input) and against
``PatchCore.predict`` at the same batch size.

One fitted model (the baseline tree, saved as a checkpoint) is exported by each tree's own
``patchcore-jax export``; every measurement then runs in a fresh process with ``PYTHONPATH`` at
the tree that reads that file, the variants alternating in each round (A, B, C, D, then the next
round in reverse order) so that load from other jobs falls on all alike. A worker calls its
program on the test crops repeated to the batch size: one warm-up (compile) call, then calls for
at least ``--seconds``; the best call is kept, and the best over ``--rounds``.

    python benchmarks/export_batch.py --baseline /work/wt-base [--train-images 209]
        [--rounds 3] [--seconds 10] [--out benchmarks/results/export_batch.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO_ROOT, RESULTS, machine, write_results

BATCH_SIZES = (1, 8, 32)
VARIANTS = {
    "lax.map program (baseline)": "baseline",
    "batched program, bank inside": "batched",
    "batched program, bank as input": "bank_input",
    "PatchCore.predict": "predict",
}


def worker(args: argparse.Namespace) -> None:
    """Runs in the measured tree: images/s of one variant at each batch size; a JSON line."""
    import jax
    import numpy as np

    from patchcore_jax import preprocess
    from patchcore_jax.datasets import folders

    test_paths = [s.image_path for s in folders.load_dataset(args.data).test_samples]
    crops = preprocess.load_images(test_paths[:32], 256, 224)
    if args.variant == "predict":
        from patchcore_jax import checkpoint
        from patchcore_jax.model import PatchCore

        fitted = checkpoint.load(args.model)
        models = {
            batch: PatchCore(
                fitted.config.replace(batch_size=batch),
                backbone=fitted.backbone,
                memory_bank=fitted.memory_bank,
            )
            for batch in BATCH_SIZES
        }

        def run(images):
            return models[len(images)].predict(images).image_scores
    else:
        from patchcore_jax import exported

        options = {"bank": args.bank} if args.bank else {}
        program = exported.load(args.program, **options)

        def run(images):
            return program(images)

    rates = {}
    for batch in BATCH_SIZES:
        images = np.resize(crops, (batch, *crops.shape[1:]))
        jax.block_until_ready(run(images))  # compile
        best, spent, calls = float("inf"), 0.0, 0
        while spent < args.seconds or calls < 3:
            start = time.perf_counter()
            jax.block_until_ready(run(images))
            elapsed = time.perf_counter() - start
            best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
        rates[batch] = batch / best
    print(json.dumps(rates))


def run_tree(tree: Path, arguments: list[str]) -> subprocess.CompletedProcess:
    """``arguments`` run in a fresh process with ``PYTHONPATH`` at ``tree``; raises on failure."""
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(  # cwd: ``-m`` puts it first on sys.path
        [sys.executable, *arguments], env=env, capture_output=True, text=True, cwd=tree
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} in {tree} failed:\n{done.stderr[-4000:]}")
    return done


def fit_and_export(args: argparse.Namespace, folder: Path) -> dict[str, list[str]]:
    """Fits the model (the baseline tree: this tree reads older checkpoints, not the reverse),
    exports it with both trees; each variant's worker options."""
    fit = f"""
import sys
from patchcore_jax import checkpoint, preprocess
from patchcore_jax.config import PatchCoreConfig
from patchcore_jax.datasets import folders
from patchcore_jax.model import PatchCore
config = PatchCoreConfig(backbone="mobilenet_v2", coreset_fraction={args.coreset_fraction})
paths = folders.load_train_paths(sys.argv[1])[: {args.train_images}]
model = PatchCore(config).fit(preprocess.iter_image_batches(paths, 8, 256, 224))
checkpoint.save(model, sys.argv[2])
print(model.memory_bank.shape[0])
"""
    model = folder / "model"
    rows = run_tree(args.baseline, ["-c", fit, str(args.data), str(model)]).stdout.split()[-1]
    print(f"fitted: {rows} bank rows", flush=True)
    export = ["-m", "patchcore_jax.cli", "export", str(model), "--platforms", "cpu"]
    run_tree(args.baseline, [*export, "--out", str(folder / "baseline.pcjx")])
    run_tree(REPO_ROOT, [*export, "--out", str(folder / "batched.pcjx")])
    bank_files = ["--out", str(folder / "line.pcjx"), "--bank-out", str(folder / "bank.pcjb")]
    run_tree(REPO_ROOT, [*export, *bank_files])
    return {
        "baseline": ["--program", str(folder / "baseline.pcjx")],
        "batched": ["--program", str(folder / "batched.pcjx")],
        "bank_input": ["--program", str(folder / "line.pcjx"), "--bank", str(folder / "bank.pcjb")],
        "predict": ["--model", str(model)],
        "rows": [rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="checkout with the lax.map export")
    parser.add_argument(
        "--data", type=Path, default=REPO_ROOT.parent / "shared/data/mvtec_ad/bottle"
    )
    parser.add_argument("--train-images", type=int, default=209)
    parser.add_argument("--coreset-fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "export_batch.md")
    parser.add_argument("--note", default="", help="a line added to the results header")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--program", help=argparse.SUPPRESS)
    parser.add_argument("--bank", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.baseline is None:
        parser.error("--baseline is required (a checkout with the lax.map export)")
    load_before = os.getloadavg()
    best = {variant: dict.fromkeys(BATCH_SIZES, 0.0) for variant in VARIANTS.values()}
    with tempfile.TemporaryDirectory(prefix="export-batch-") as tmp:
        options = fit_and_export(args, Path(tmp))
        order = list(VARIANTS.values())
        for round_index in range(args.rounds):
            for variant in order if round_index % 2 == 0 else order[::-1]:
                tree = args.baseline if variant == "baseline" else REPO_ROOT
                script = [str(Path(__file__).resolve()), "--worker", "--variant", variant]
                timing = ["--data", str(args.data), "--seconds", str(args.seconds)]
                done = run_tree(tree, [*script, *timing, *options[variant]])
                rates = json.loads(done.stdout.strip().splitlines()[-1])
                for batch in BATCH_SIZES:
                    best[variant][batch] = max(best[variant][batch], rates[str(batch)])
                print(f"round {round_index + 1} {variant}: {rates}", flush=True)
    load_after = os.getloadavg()
    rows = []
    for name, variant in VARIANTS.items():
        cells = [
            f"{best[variant][b]:.2f} ({best[variant][b] / best['baseline'][b]:.2f}x)"
            for b in BATCH_SIZES
        ]
        rows.append(f"| {name} | {' | '.join(cells)} |")
    notes = [
        f"Load average (1/5/15 min) before: {' / '.join(f'{x:.1f}' for x in load_before)}, "
        f"after: {' / '.join(f'{x:.1f}' for x in load_after)}",
        f"Baseline: {args.baseline} (git {_git_head(args.baseline)}); this tree: git "
        f"{_git_head(REPO_ROOT)}",
    ] + ([args.note] if args.note else [])
    body = [
        f"MobileNetV2 (bundled weights), 224 x 224 crops, exact precision, coreset "
        f"{args.coreset_fraction} of {args.train_images} bottle training images: "
        f"{options['rows'][0]} bank rows. Images/s (best call after compilation, best of "
        f"{args.rounds} rounds of fresh processes, >= {args.seconds:g} s of calls each) and the "
        "ratio to the lax.map program at the same batch size.",
        "",
        "| variant | " + " | ".join(f"batch {b}" for b in BATCH_SIZES) + " |",
        "|---|" + "---:|" * len(BATCH_SIZES),
        *rows,
    ]
    print(
        write_results(args.out, "Exported program: batched vs lax.map", machine("cpu"), notes, body)
    )


def _git_head(tree: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
