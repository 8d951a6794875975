"""Greedy coreset speed: seconds per 1,000 selection steps against the memory-bandwidth floor.

Each greedy step must stream every projected row once (N x 128 float32) and read and write one
distance per row (N x 4 x 2 bytes); the floor is those bytes divided by a measured copy
bandwidth (numpy copy of a 512 MB array, read + write bytes counted). Steps are timed after
compilation as the difference of two compiled runs with different step counts, so one-off costs
(host-to-device transfer, transpose, start-point distances) cancel; the bank is placed on the
devices once, outside the timed calls.

Usage:
  python benchmarks/coreset.py                        # 100k and 1M rows, 1/2/4/8 devices
  python benchmarks/coreset.py --devices 1            # single device only
  python benchmarks/coreset.py --worker --devices 4   # one process's measurements, JSON out

Each device count runs in its own process because XLA_FLAGS must be set before jax is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from common import RESULTS, best_times, machine, run_with_devices, write_results

DIM = 128
NUM_START_POINTS = 10


def copy_bandwidth(num_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best memory bandwidth (bytes/s, read + write) of a large numpy copy."""
    source = np.ones(num_bytes // 4, np.float32)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best


def bytes_per_step(num_rows: int) -> int:
    return num_rows * DIM * 4 + num_rows * 4 * 2


def greedy_step_seconds(num_rows: int, steps: tuple[int, int], repeats: int, mesh) -> dict:
    """Seconds per greedy step and one-off setup seconds for a random [num_rows, DIM] bank.

    The bank is placed on ``mesh`` once, outside the timed calls; each step count is compiled
    and warmed up first, then the best of ``repeats`` rounds is kept.
    """
    from patchcore_jax import coreset, sharding

    features = np.random.default_rng(0).normal(size=(num_rows, DIM)).astype(np.float32)
    on_mesh = coreset._rows_on_mesh(features, mesh)
    starts = sharding.replicate(np.arange(NUM_START_POINTS, dtype=np.int32), mesh)
    del features

    def run(num_samples: int):
        return coreset._greedy_selection(
            on_mesh, None, starts, num_samples=num_samples, num_valid=num_rows, mesh=mesh
        )

    best = best_times({num_samples: lambda n=num_samples: run(n) for num_samples in steps}, repeats)
    few, many = steps
    per_step = (best[many] - best[few]) / (many - few)
    return {"seconds_per_step": per_step, "setup_seconds": best[few] - few * per_step}


def measure(rows: list[int], steps: tuple[int, int], repeats: int) -> list[dict]:
    """Seconds per step on all devices of this process (XLA_FLAGS already set)."""
    import jax

    from patchcore_jax import sharding

    mesh = sharding.make_mesh()
    return [
        {
            "devices": jax.device_count(),
            "rows": num_rows,
            **greedy_step_seconds(num_rows, steps, repeats, mesh),
        }
        for num_rows in rows
    ]


def run_worker(args: argparse.Namespace, devices: int) -> list[dict]:
    arguments = ["--rows", *args.rows, "--steps", *args.steps, "--repeats", args.repeats]
    return run_with_devices(__file__, devices, arguments)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--steps", type=int, nargs=2, default=[50, 250], help="step counts of the two runs"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (best is kept)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS / "coreset.md")
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(measure(args.rows, tuple(args.steps), args.repeats)))
        return

    load_before = os.getloadavg()[0]
    wall_start = time.perf_counter()
    bandwidth = copy_bandwidth()
    by_devices = {devices: run_worker(args, devices) for devices in args.devices}
    wall = time.perf_counter() - wall_start
    few, many = args.steps

    notes = [
        f"Load average before the run: {load_before:.1f} (other jobs share these cores, so "
        f"times are noisy); benchmark wall time {wall:.0f} s"
    ]
    lines = [
        f"Bank: N random rows x {DIM} dims (already projected), {NUM_START_POINTS} start points. "
        f"Seconds per step = (time of {many} steps - time of {few} steps) / {many - few}, best "
        f"of {args.repeats} rounds each, after compilation. Floor: the {DIM * 4 + 8} bytes a step "
        f"must move per row (projected row + distance read/write) at the measured numpy copy "
        f"bandwidth of {bandwidth / 1e9:.1f} GB/s (read + write bytes).",
    ]
    if 1 in by_devices:
        lines += [
            "",
            "| rows (1 device) | s / 1,000 steps | floor s / 1,000 steps | floor / measured "
            "| achieved GB/s | one-off setup s |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in by_devices[1]:
            per_step = row["seconds_per_step"]
            floor = bytes_per_step(row["rows"]) / bandwidth
            lines.append(
                f"| {row['rows']:,} | {per_step * 1e3:.2f} | {floor * 1e3:.2f} | "
                f"{floor / per_step:.2f} | {bytes_per_step(row['rows']) / per_step / 1e9:.1f} | "
                f"{row['setup_seconds']:.2f} |"
            )
    if len(by_devices) > 1:
        lines += [
            "",
            "Over virtual XLA CPU devices (`--xla_force_host_platform_device_count`; they share "
            "the same cores, so this shows the cost of sharding and of one all-gather per step, "
            "not a speed-up):",
            "",
            "| devices | "
            + " | ".join(f"{rows:,} rows: s / 1,000 steps" for rows in args.rows)
            + " |",
            "|---:|" + "---:|" * len(args.rows),
        ]
        for devices, rows in by_devices.items():
            lines.append(
                f"| {devices} | "
                + " | ".join(f"{row['seconds_per_step'] * 1e3:.2f}" for row in rows)
                + " |"
            )
    print(write_results(args.output, "Greedy coreset speed", machine("cpu"), notes, lines))


if __name__ == "__main__":
    main()
