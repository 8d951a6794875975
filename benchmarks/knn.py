"""k-NN scoring speed against the matmul floor, optionally over several (virtual) devices.

Times, per image (784 query patches of dim 1024, a 28x28 layer2 grid) against a 16,384 x 1024
memory bank:
  * ``matmul``: one plain ``jnp.dot`` with the same FLOPs (784 x 1024 x 16,384 x 2), the floor;
  * ``nearest_neighbors``: the blocked k-NN (k = 1);
  * ``score_patch_features``: k-NN plus patch/image scores and 224 x 224 anomaly maps.

Usage:
  python benchmarks/knn.py                      # one device, writes benchmarks/results/knn.md
  python benchmarks/knn.py --devices 1 2 4 8    # also times scoring on 1/2/4/8 XLA CPU devices
  python benchmarks/knn.py --worker --devices 4 --bank-shards 2   # one measurement, JSON out

Each device count runs in its own process because XLA_FLAGS must be set before jax is imported.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from common import RESULTS, best_times, machine, run_with_devices, write_results


def measure(args: argparse.Namespace) -> dict:
    """Runs in a process whose XLA_FLAGS already hold the device count."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from patchcore_jax import knn, scoring, sharding

    rng = np.random.default_rng(0)
    bank = jnp.asarray(rng.normal(size=(args.bank, args.dim)).astype(np.float32))
    queries = jnp.asarray(
        rng.normal(size=(args.images * args.patches, args.dim)).astype(np.float32)
    )
    features = queries.reshape(args.images, args.patches, args.dim)
    grid = int(round(args.patches**0.5))
    mesh = sharding.make_mesh(bank_shards=args.bank_shards)
    functions = {
        "knn_batch": lambda: knn.nearest_neighbors(queries, bank, mesh=mesh),
        "score_batch": lambda: scoring.score_patch_features(
            features, bank, (grid, grid), (224, 224), mesh=mesh
        ),
    }
    if jax.device_count() == 1:
        one_image = queries[: args.patches]
        matmul = jax.jit(lambda q, b: jnp.dot(q, b.T, precision=jax.lax.Precision.HIGHEST))
        functions["matmul"] = lambda: matmul(one_image, bank)
        functions["knn_1image"] = lambda: knn.nearest_neighbors(one_image, bank)
    seconds = best_times(functions, args.repeats)
    flops_per_image = 2.0 * args.patches * args.dim * args.bank
    result = {
        "devices": jax.device_count(),
        "bank_shards": args.bank_shards,
        "gflops_per_image": flops_per_image / 1e9,
        "knn_per_image_s": seconds["knn_batch"] / args.images,
        "score_per_image_s": seconds["score_batch"] / args.images,
    }
    if "matmul" in seconds:
        result["matmul_s"] = seconds["matmul"]
        result["matmul_gflops"] = flops_per_image / seconds["matmul"] / 1e9
        result["knn_1image_s"] = seconds["knn_1image"]
    return result


def _run_worker(args: argparse.Namespace, devices: int, bank_shards: int) -> dict:
    options = {
        "bank-shards": bank_shards,
        "bank": args.bank,
        "dim": args.dim,
        "patches": args.patches,
        "images": args.images,
        "repeats": args.repeats,
    }
    return run_with_devices(
        __file__, devices, [f"--{name}={value}" for name, value in options.items()]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--devices",
        type=int,
        nargs="+",
        default=[1],
        help="XLA CPU device counts to time scoring on",
    )
    parser.add_argument(
        "--bank-shards", type=int, default=None, help="worker only: bank shards of the mesh"
    )
    parser.add_argument("--bank", type=int, default=16384, help="memory bank rows")
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension")
    parser.add_argument("--patches", type=int, default=784, help="query patches per image")
    parser.add_argument("--images", type=int, default=4, help="images per scoring batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (best is kept)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS / "knn.md")
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(measure(args)))
        return

    load_before = os.getloadavg()[0]
    single = _run_worker(args, 1, 1)
    rows = []
    for devices in args.devices:
        for bank_shards in sorted({1, devices}):
            rows.append(
                single
                if (devices, bank_shards) == (1, 1)
                else _run_worker(args, devices, bank_shards)
            )

    floor_ms = single["matmul_s"] * 1e3
    notes = [
        f"Load average before the run: {load_before:.1f} (other jobs share these cores, so "
        "times are noisy)"
    ]
    lines = [
        f"One image = {args.patches} query patches x {args.dim} dims against a "
        f"{args.bank:,} x {args.dim} memory bank, k = 1, squared L2, default tiles "
        f"(4096 bank rows x 1024 queries); {single['gflops_per_image']:.1f} GFLOP per image. "
        f"Best of {args.repeats} interleaved timed calls after a compile/warm-up call.",
        "",
        "| what (1 device) | ms / image | GFLOP/s | matmul time / this time |",
        "|---|---:|---:|---:|",
        f"| plain `jnp.dot` [{args.patches},{args.dim}] x [{args.dim},{args.bank}] (floor) | "
        f"{floor_ms:.1f} | {single['matmul_gflops']:.1f} | 1.00 |",
    ]
    for name, key in (
        ("`nearest_neighbors`, 1 image", "knn_1image_s"),
        (f"`nearest_neighbors`, batch of {args.images} images", "knn_per_image_s"),
        (f"`score_patch_features` (k-NN + maps), batch of {args.images}", "score_per_image_s"),
    ):
        seconds = single[key]
        lines.append(
            f"| {name} | {seconds * 1e3:.1f} | {single['gflops_per_image'] / seconds:.1f} | "
            f"{single['matmul_s'] / seconds:.2f} |"
        )
    if args.devices != [1]:
        lines += [
            "",
            f"Scoring a batch of {args.images} images over virtual XLA CPU devices "
            "(`--xla_force_host_platform_device_count`; they share the same cores, so this shows "
            "sharding overhead, not speed-up; on this shared 2-core machine a single row can be "
            "off by up to 2x, e.g. k-NN alone slower than the scoring that contains it):",
            "",
            "| devices | mesh (data x bank) | k-NN ms / image | score ms / image |",
            "|---:|---|---:|---:|",
        ]
        for row in rows:
            lines.append(
                f"| {row['devices']} | {row['devices'] // row['bank_shards']} x "
                f"{row['bank_shards']} | {row['knn_per_image_s'] * 1e3:.1f} | "
                f"{row['score_per_image_s'] * 1e3:.1f} |"
            )
    print(write_results(args.output, "k-NN scoring speed", machine("cpu"), notes, lines))


if __name__ == "__main__":
    main()
