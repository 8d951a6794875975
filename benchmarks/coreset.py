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
  python benchmarks/coreset.py --suite fused          # issue 9: us/step before/now, 1 and 8 dev.
  python benchmarks/coreset.py --suite pruning        # pruned vs full on real and tiled banks

``--suite fused`` and ``--suite pruning`` replace their own sections of the results file.

Each device count runs in its own process because XLA_FLAGS must be set before jax is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from common import (
    REPO_ROOT,
    RESULTS,
    best_times,
    command_line,
    machine,
    run_with_devices,
    write_results,
)

from patchcore_jax.config import bank_rows

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


def greedy_step_seconds(
    num_rows: int, steps: tuple[int, int], repeats: int, mesh, method: str = "full"
) -> dict:
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
            on_mesh,
            None,
            starts,
            num_samples=num_samples,
            num_valid=num_rows,
            method=method,
            mesh=mesh,
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


# --------------------------------------------------------------------------- pruned vs full

BASELINE_REVISION = "8c4e54a"  # the coreset before the pruned path and the fused step
CACHE = Path("/tmp/patchcore_coreset_bench")


def baseline_module(revision: str):
    """The library's coreset.py at ``revision`` (git show), imported side by side."""
    import importlib.util
    import subprocess

    source = subprocess.run(
        ["git", "show", f"{revision}:patchcore_jax/coreset.py"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"coreset_{revision}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"coreset_{revision}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fused_step_seconds(num_rows: int, steps: tuple[int, int], repeats: int, revision: str) -> dict:
    """Issue 9: seconds per full-pass step before (``revision``) and now, this process's mesh."""
    import jax

    from patchcore_jax import coreset, sharding

    mesh = sharding.make_mesh()
    before = baseline_module(revision)
    features = np.random.default_rng(0).normal(size=(num_rows, DIM)).astype(np.float32)
    on_mesh = coreset._rows_on_mesh(features, mesh)
    starts = sharding.replicate(np.arange(NUM_START_POINTS, dtype=np.int32), mesh)
    del features

    def run_before(num_samples: int):
        return before._greedy_selection(
            on_mesh, None, starts, num_samples=num_samples, num_valid=num_rows, mesh=mesh
        )

    def run_now(num_samples: int):
        constants, carry = coreset._greedy_init(
            on_mesh, None, starts, method="full", num_valid=num_rows, mesh=mesh
        )
        selected = sharding.replicate(np.zeros(num_samples, np.int32), mesh)
        jax.block_until_ready(carry)
        start = time.perf_counter()
        _, selected, _ = coreset._greedy_steps(
            constants, carry, selected, 0, num_samples, method="full", mesh=mesh
        )
        jax.block_until_ready(selected)
        return time.perf_counter() - start

    # Before: one program (set-up included, it cancels in the difference); now: steps only.
    best = best_times({n: (lambda n=n: run_before(n)) for n in steps}, repeats)
    now = {n: min(run_now(n) for _ in range(repeats + 1)) for n in steps}
    few, many = steps
    return {
        "devices": jax.device_count(),
        "rows": num_rows,
        "before": (best[many] - best[few]) / (many - few),
        "now": (now[many] - now[few]) / (many - few),
    }


def bank(name: str) -> np.ndarray:
    """A bank by name, cached under /tmp: real bottle features, or tiled perturbed copies.

    ``bottle_mobilenet_v2`` / ``bottle_wide_resnet50_2``: all 209 bottle training images
    through the offline MobileNetV2 / a random-init WideResNet-50-2, [163856, 1024].
    ``tiled_<rows>``: SYNTHETIC, the MobileNetV2 bottle features projected to 128-d (the
    coreset's own projection, key 0) tiled up to ``rows`` rows, each copy plus Gaussian noise
    of 5% of the per-dimension standard deviation.
    """
    path = CACHE / f"{name}.npy"
    if path.exists():
        return np.load(path)
    CACHE.mkdir(parents=True, exist_ok=True)
    if name.startswith("bottle_"):
        from patchcore_jax import PatchCore, PatchCoreConfig, preprocess, sharding
        from patchcore_jax.backbones import init_backbone, load_backbone

        backbone_name = name.removeprefix("bottle_")
        backbone = (
            load_backbone(backbone_name)
            if backbone_name == "mobilenet_v2"
            else init_backbone(backbone_name)
        )
        model = PatchCore(
            PatchCoreConfig(backbone=backbone_name),
            backbone=backbone,
            mesh=sharding.single_device_mesh(),
        )
        paths = sorted((REPO_ROOT.parent / "shared/data/mvtec_ad/bottle/train/good").glob("*"))
        features = model.patch_features(preprocess.iter_image_batches(paths, 8, 256, 224))
    else:
        projection, _ = projection_and_starts(bank("bottle_mobilenet_v2"))
        base = bank("bottle_mobilenet_v2") @ projection.T
        rows = int(name.removeprefix("tiled_"))
        rng = np.random.default_rng(0)
        copies = -(-rows // len(base))
        scale = 0.05 * base.std(axis=0)
        features = np.concatenate(
            [base + rng.normal(size=base.shape) * scale for _ in range(copies)]
        )[:rows]
    features = np.asarray(features, np.float32)
    np.save(path, features)
    return features


def projection_and_starts(features: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """The projection and start points ``approximate_greedy_coreset`` draws from key 0."""
    import jax
    import jax.numpy as jnp

    from patchcore_jax import coreset

    projection_key, start_key = jax.random.split(jax.random.key(0))
    dim = features.shape[1]
    projection = None
    if dim != DIM:
        bound = 1.0 / np.sqrt(dim)
        projection = np.asarray(
            jax.random.uniform(projection_key, (DIM, dim), jnp.float32, -bound, bound)
        )
    starts = np.asarray(coreset.random_subsample(len(features), NUM_START_POINTS, start_key))
    return projection, starts


def timed_selection(features, num_samples: int, method: str, window: int, max_steps: int):
    """Runs ``method`` for min(num_samples, max_steps) steps in timed windows.

    Returns set-up seconds (compilation, projection, grouping, start distances), seconds per
    step over the first and the last ``window`` steps run, steps seconds, steps run, and the
    mean fraction of rows read per step (pruned: rows gathered; full: 1).
    """
    import jax

    from patchcore_jax import coreset, sharding

    mesh = sharding.single_device_mesh()
    projection, starts = projection_and_starts(features)
    on_mesh = coreset._rows_on_mesh(features, mesh)
    projection = None if projection is None else sharding.replicate(projection, mesh)
    starts = sharding.replicate(starts.astype(np.int32), mesh)
    jax.block_until_ready(on_mesh)
    start = time.perf_counter()
    constants, carry = coreset._greedy_init(
        on_mesh, projection, starts, method=method, num_valid=len(features), mesh=mesh
    )
    selected = sharding.replicate(np.zeros(num_samples, np.int32), mesh)
    # Compile the steps program on a throw-away copy of the state (one step).
    warm = jax.tree.map(lambda x: x.copy(), (carry, selected))
    jax.block_until_ready(coreset._greedy_steps(constants, *warm, 0, 1, method=method, mesh=mesh))
    setup = time.perf_counter() - start
    steps = min(num_samples, max_steps)
    marks = sorted({0, min(window, steps), max(steps - window, 0), steps})
    seconds = []
    for first, last in zip(marks[:-1], marks[1:], strict=True):
        start = time.perf_counter()
        carry, selected, done = coreset._greedy_steps(
            constants, carry, selected, first, last, method=method, mesh=mesh
        )
        jax.block_until_ready(done)
        seconds.append((time.perf_counter() - start, last - first))
    read = float(np.asarray(carry[-1]).sum()) / steps if method == "pruned" else 1.0
    return {
        "setup": setup,
        "early": seconds[0][0] / seconds[0][1],
        "late": seconds[-1][0] / seconds[-1][1],
        "steps_seconds": sum(s for s, _ in seconds),
        "steps": steps,
        "read": read,
        "selected": np.asarray(selected)[:steps],
    }


def pruning_suite(cases: list[tuple[str, float, int]], window: int) -> list[dict]:
    """Full and pruned side by side per (bank, fraction, full-pass step limit)."""
    results = []
    for name, fraction, full_steps in cases:
        features = bank(name)
        num_samples = bank_rows(len(features), "approx_greedy_coreset", fraction)
        full = timed_selection(features, num_samples, "full", window, full_steps)
        pruned = timed_selection(features, num_samples, "pruned", window, num_samples)
        steps = full["steps"]
        full["extrapolated"] = steps < num_samples
        if full["extrapolated"]:  # a full-pass step costs the same early and late
            full["steps_seconds"] *= num_samples / steps
        identical = bool(np.array_equal(full["selected"], pruned["selected"][:steps]))
        del full["selected"], pruned["selected"]
        results.append(
            {
                "bank": name,
                "rows": len(features),
                "fraction": fraction,
                "samples": num_samples,
                "full": full,
                "pruned": pruned,
                "identical_steps": steps,
                "identical": identical,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def pruning_lines(results: list[dict]) -> list[str]:
    lines = [
        "## Exact pruned greedy coreset against the full pass (1 device)",
        "",
        "Banks: `bottle_*`: real patch features of the 209 bottle training images (MobileNetV2, "
        "offline weights; WideResNet-50-2 with RANDOM weights), 1024-d, projected to 128-d by "
        "the coreset. `tiled_*`: SYNTHETIC, the MobileNetV2 bottle bank projected to 128-d and "
        "tiled, each copy plus Gaussian noise of 5% of each dimension's standard deviation. "
        "Key 0 (projection, 10 start points). Set-up: compilation, projection, grouping rows "
        "into blocks and start distances. us/step over the first and the last "
        "steps run. Rows read: mean fraction of the bank gathered per step (capacity tiers "
        "included). Total = set-up + all steps. Full-pass totals marked * are extrapolated "
        "from the steps run (its step cost does not change along the selection); the pruned "
        "path always runs every step. Identical: selected indices equal over the steps both "
        "ran.",
        "",
        "| bank | rows | coreset | full: set-up s | full: us/step early / late | full: total s "
        "| pruned: set-up s | pruned: us/step early / late | rows read | pruned: total s "
        "| speed-up (total) | speed-up (steps) | identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        full, pruned = r["full"], r["pruned"]
        full_total = full["setup"] + full["steps_seconds"]
        pruned_total = pruned["setup"] + pruned["steps_seconds"]
        star = "*" if full["extrapolated"] else ""
        lines.append(
            f"| {r['bank']} | {r['rows']:,} | {r['fraction']:.0%} ({r['samples']:,}) "
            f"| {full['setup']:.1f} | {full['early'] * 1e6:,.0f} / {full['late'] * 1e6:,.0f} "
            f"| {full_total:.1f}{star} | {pruned['setup']:.1f} "
            f"| {pruned['early'] * 1e6:,.0f} / {pruned['late'] * 1e6:,.0f} "
            f"| {pruned['read']:.1%} | {pruned_total:.1f} | {full_total / pruned_total:.1f}x "
            f"| {full['steps_seconds'] / pruned['steps_seconds']:.1f}x "
            f"| {'yes' if r['identical'] else 'NO'} ({r['identical_steps']:,} steps) |"
        )
    return lines


def section(title: str, notes: list[str], body: list[str]) -> list[str]:
    """A ``## title`` section with its own command, machine and load lines."""
    header = [f"Command: `{command_line()}`", f"Machine: {machine('cpu')}", *notes]
    return [f"## {title}", "", *(line + "  " for line in header[:-1]), header[-1], "", *body]


def replace_section(path: Path, lines: list[str]) -> None:
    """Replaces the ``## `` section of ``path`` with the same title (or appends it)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Greedy coreset speed\n"
    title = lines[0]
    kept, skipping = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            skipping = line == title
        if not skipping:
            kept.append(line)
    path.write_text("\n".join([*kept, "", *lines]).rstrip("\n") + "\n", encoding="utf-8")


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
    parser.add_argument("--suite", choices=["bandwidth", "fused", "pruning"], default="bandwidth")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=[
            "bottle_mobilenet_v2:0.01:100000",
            "bottle_mobilenet_v2:0.1:100000",
            "bottle_wide_resnet50_2:0.01:100000",
            "bottle_wide_resnet50_2:0.1:100000",
            "tiled_1000000:0.01:300",
            "tiled_2400000:0.01:200",
        ],
        help="pruning suite: bank:fraction:full-pass step limit (then extrapolated)",
    )
    parser.add_argument("--window", type=int, default=200, help="steps timed early and late")
    parser.add_argument("--revision", default=BASELINE_REVISION, help="fused suite baseline")
    parser.add_argument("--output", type=Path, default=RESULTS / "coreset.md")
    args = parser.parse_args()

    if args.worker and args.suite == "fused":
        print(
            json.dumps(
                [
                    fused_step_seconds(rows, tuple(args.steps), args.repeats, args.revision)
                    for rows in args.rows
                ]
            )
        )
        return
    if args.worker:
        print(json.dumps(measure(args.rows, tuple(args.steps), args.repeats)))
        return
    load = f"Load average before the run: {os.getloadavg()[0]:.1f} (shared 2-core machine)"
    if args.suite == "pruning":
        cases = [(name, float(f), int(s)) for name, f, s in (c.split(":") for c in args.cases)]
        wall = time.perf_counter()
        results = pruning_suite(cases, args.window)
        notes = [load, f"Wall time {time.perf_counter() - wall:.0f} s"]
        lines = pruning_lines(results)
        replace_section(args.output, section(lines[0][3:], notes, lines[2:]))
        print(args.output.read_text())
        return
    if args.suite == "fused":
        arguments = ["--suite", "fused", "--rows", *args.rows, "--steps", *args.steps]
        arguments += ["--repeats", args.repeats, "--revision", args.revision]
        rows = [r for d in args.devices for r in run_with_devices(__file__, d, arguments)]
        body = [
            f"Full pass, one greedy step on N random rows x {DIM} dims: the code at "
            f"`{args.revision}` (argmax pass + update pass, two all-gathers per step) against "
            "now (update and next argmax in the step, one all-gather of a packed proposal). "
            f"Seconds per step = (time of {args.steps[1]} - time of {args.steps[0]} steps) / "
            f"{args.steps[1] - args.steps[0]}, best of {args.repeats}.",
            "",
            "| devices | rows | before us/step | now us/step | now / before |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            body.append(
                f"| {r['devices']} | {r['rows']:,} | {r['before'] * 1e6:,.0f} "
                f"| {r['now'] * 1e6:,.0f} | {r['now'] / r['before']:.2f} |"
            )
        title = "## Fused step (issue 9): one pass and one all-gather per step"
        replace_section(args.output, section(title[3:], [load], body))
        print(args.output.read_text())
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
    kept = args.output.read_text().split("\n## ", 1)[1:] if args.output.exists() else []
    write_results(args.output, "Greedy coreset speed", machine("cpu"), notes, lines)
    for text in kept:  # the other suites' sections
        replace_section(args.output, ("## " + text).rstrip("\n").split("\n"))
    print(args.output.read_text())


if __name__ == "__main__":
    main()
