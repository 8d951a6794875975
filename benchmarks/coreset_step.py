"""Greedy coreset step cost: full pass vs the previous main's pruned path vs this tree's, side
by side on real bottle banks (issue 23 item 3).

Each measurement runs in a fresh process with ``PYTHONPATH`` pointing at the tree measured
(this tree, or ``--baseline``, e.g. a ``git worktree`` of the previous main); the three runs
alternate (full, baseline pruned, pruned, full, ...) so that load from other jobs falls on all
alike, and the best of ``--rounds`` is kept. A run projects the bank with key 0 (as
``approximate_greedy_coreset``), builds the loop state (compiling the steps program on a
throw-away copy: that is "set-up"), then runs the selection in the library's chunks; us/step =
steps seconds / steps. The full pass runs at most ``--full-steps`` steps (its step cost does not
change along the selection) and its total is extrapolated from them. Selected indices are
compared over the steps all three ran.

    python benchmarks/coreset_step.py --baseline /work/wt-base5 [--banks bottle_mobilenet_v2
        bottle_wide_resnet50_2] [--fraction 0.1] [--rounds 2] [--full-steps 3000]
        [--out benchmarks/results/coreset_step.md]

Banks come from ``coreset.bank`` (benchmarks/coreset.py; cached under /tmp).
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

import numpy as np
from common import REPO_ROOT, RESULTS, machine, write_results

NUM_START_POINTS = 10


def worker(args: argparse.Namespace) -> None:
    """Runs in the measured tree: one selection; prints a JSON line, saves the indices."""
    import jax

    from patchcore_jax import coreset, sharding
    from patchcore_jax.config import bank_rows

    features = np.load(args.bank_path, mmap_mode="r")
    num_rows, dim = features.shape
    num_samples = bank_rows(num_rows, "approx_greedy_coreset", args.fraction)
    steps = min(num_samples, args.max_steps)
    mesh = sharding.single_device_mesh()
    key = jax.random.key(0)
    projection = coreset.projection_matrix(key, dim)
    _, start_key = jax.random.split(key)
    starts = np.asarray(coreset.random_subsample(num_rows, NUM_START_POINTS, start_key))
    on_mesh = coreset._rows_on_mesh(np.asarray(features), mesh)
    projection = None if projection is None else sharding.replicate(projection, mesh)
    starts = sharding.replicate(starts.astype(np.int32), mesh)
    jax.block_until_ready(on_mesh)

    start = time.perf_counter()
    constants, carry = coreset._greedy_init(
        on_mesh, projection, starts, method=args.method, num_valid=num_rows, mesh=mesh
    )
    selected = sharding.replicate(np.zeros(coreset._bucket(num_samples), np.int32), mesh)
    warm = jax.tree.map(lambda x: x.copy(), (carry, selected))
    steps_program = coreset._greedy_steps
    jax.block_until_ready(steps_program(constants, *warm, 0, 1, method=args.method, mesh=mesh))
    setup = time.perf_counter() - start
    del warm

    chunk = coreset._steps_per_chunk(num_rows, args.method)
    start = time.perf_counter()
    for first in range(0, steps, chunk):
        last = min(first + chunk, steps)
        carry, selected, done = steps_program(
            constants, carry, selected, first, last, method=args.method, mesh=mesh
        )
    jax.block_until_ready(done)
    seconds = time.perf_counter() - start
    read = float(np.asarray(carry[-1]).sum()) / steps if args.method == "pruned" else 1.0
    np.save(args.indices_out, np.asarray(selected)[:steps])
    print(
        json.dumps(
            {
                "setup": setup,
                "steps": steps,
                "samples": num_samples,
                "rows": num_rows,
                "us_per_step": seconds / steps * 1e6,
                "read": read,
            }
        )
    )


def run(tree: Path, method: str, bank_path: Path, args: argparse.Namespace, out: Path) -> dict:
    """One worker process on ``tree``; returns its JSON result."""
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    max_steps = args.full_steps if method == "full" else 10**9
    command = [sys.executable, __file__, "--worker", "--method", method]
    command += ["--bank-path", str(bank_path), "--fraction", str(args.fraction)]
    command += ["--max-steps", str(max_steps), "--indices-out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{tree} {method} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_bank(name: str, args: argparse.Namespace, scratch: Path) -> dict:
    from coreset import CACHE, bank

    bank(name)  # computed and cached by this tree's library if missing
    bank_path = CACHE / f"{name}.npy"
    candidates = {
        "full": (REPO_ROOT, "full"),
        "baseline": (args.baseline, "pruned"),
        "pruned": (REPO_ROOT, "pruned"),
    }
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for label, (tree, method) in candidates.items():
            result = run(tree, method, bank_path, args, scratch / f"{name}_{label}.npy")
            print(name, label, json.dumps(result), flush=True)
            if label not in best or result["us_per_step"] < best[label]["us_per_step"]:
                best[label] = result
    indices = {label: np.load(scratch / f"{name}_{label}.npy") for label in candidates}
    common = min(len(v) for v in indices.values())
    identical = all(np.array_equal(v[:common], indices["full"][:common]) for v in indices.values())
    identical &= np.array_equal(indices["baseline"], indices["pruned"])  # every step
    return {"bank": name, "results": best, "identical": identical, "compared": common}


def total_seconds(result: dict) -> float:
    """Set-up plus every step of the selection (extrapolated when fewer steps ran)."""
    return result["setup"] + result["us_per_step"] * 1e-6 * result["samples"]


def lines_for(measured: list[dict], args: argparse.Namespace) -> list[str]:
    lines = [
        f"Coreset {args.fraction:.0%} of each bank, 1 device, key 0 ({NUM_START_POINTS} start "
        "points, 128-d projection). `full`: this tree's full pass (at most "
        f"{args.full_steps:,} steps run, total extrapolated); `baseline pruned`: the pruned "
        f"path of `{args.baseline}`; `pruned`: this tree's. us/step over all steps run (best of "
        f"{args.rounds} rounds, fresh process each); set-up = projection, grouping, start "
        "distances and compilation; rows read = rows gathered per step / the rows of the "
        "block layout (capacity tiers included; this tree gathers whole 8-row tiles, the "
        "baseline single rows). Identical: the three selected the same indices over the steps "
        "all ran (n), and both pruned paths over every step.",
        "",
        "| bank | coreset | full us/step | baseline pruned us/step | pruned us/step "
        "| full / pruned (steps) | baseline / pruned (steps) | rows read (baseline / pruned) "
        "| total s (full* / baseline / pruned) | full / pruned (total) | identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in measured:
        full, base, new = (m["results"][k] for k in ("full", "baseline", "pruned"))
        lines.append(
            f"| {m['bank']} | {new['samples']:,} | {full['us_per_step']:,.0f} "
            f"| {base['us_per_step']:,.0f} | {new['us_per_step']:,.0f} "
            f"| {full['us_per_step'] / new['us_per_step']:.1f}x "
            f"| {base['us_per_step'] / new['us_per_step']:.2f}x "
            f"| {base['read']:.1%} / {new['read']:.1%} "
            f"| {total_seconds(full):.1f} / {total_seconds(base):.1f} / {total_seconds(new):.1f} "
            f"| {total_seconds(full) / total_seconds(new):.1f}x "
            f"| {'yes' if m['identical'] else 'NO'} ({m['compared']:,} steps) |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="a tree of the previous main")
    parser.add_argument(
        "--banks", nargs="+", default=["bottle_mobilenet_v2", "bottle_wide_resnet50_2"]
    )
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--full-steps", type=int, default=3000, help="full-pass steps run")
    parser.add_argument("--out", type=Path, default=RESULTS / "coreset_step.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--bank-path", help=argparse.SUPPRESS)
    parser.add_argument("--max-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--indices-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.baseline is None or not (args.baseline / "patchcore_jax").is_dir():
        raise SystemExit(f"--baseline must be a tree with patchcore_jax/, got {args.baseline}")
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        measured = [measure_bank(name, args, Path(scratch)) for name in args.banks]
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    notes = [
        f"Load average (1/5/15 min) before: {load_before}, after: {load_after}; "
        f"wall time {time.perf_counter() - wall:.0f} s"
    ]
    text = write_results(
        args.out, "Pruned greedy coreset step", machine("cpu"), notes, lines_for(measured, args)
    )
    print(text)


if __name__ == "__main__":
    main()
