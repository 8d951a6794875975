"""Backbone forward-pass speed: images/second at batch 8, 224 px, default (PatchCore) stages.

Also the embedding (backbone + locally aware patch features, 1024/1024, patch 3: what fit and
predict run per batch). ResNets and DenseNets use random weights (same cost as the real ones);
MobileNetV2 uses the shipped TFLite weights. Compile time is measured separately from the timed
runs.

    python benchmarks/backbones.py [--names resnet18 ...] [--seconds 10] [--out PATH] [--append]

``--append`` adds the run as a new section below the file's earlier ones (e.g. a new backbone
next to WideResNet-50-2, measured under the load of its day) instead of replacing the file.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from pathlib import Path

import jax
import numpy as np
from common import RESULTS, machine, write_results

from patchcore_jax import features
from patchcore_jax.backbones import available_backbones, init_backbone, load_backbone

BATCH = 8
SIZE = 224


def measure(name: str, seconds: float) -> dict[str, object]:
    """Compile time and steady-state throughput of one backbone's default stages."""
    if name == "mobilenet_v2":
        backbone, weights = load_backbone(name), "TFLite (dequantised)"
    else:
        backbone, weights = init_backbone(name), "random init"
    images = np.random.default_rng(0).integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)
    variables = jax.device_put(backbone.variables)
    images = jax.device_put(images)
    embed = functools.partial(
        features.embed_images,
        backbone.module,
        pretrain_embed_dimension=1024,
        target_embed_dimension=1024,
        patch_size=3,
    )
    compile_seconds, per_batch, runs, outputs = time_program(
        backbone.module.apply, variables, images, seconds / 2
    )
    embed_compile_seconds, embed_per_batch, _, _ = time_program(
        embed, variables, images, seconds / 2
    )
    shapes = ", ".join(f"{k} {'x'.join(map(str, v.shape[1:]))}" for k, v in outputs.items())
    parameters = sum(leaf.size for leaf in jax.tree.leaves(backbone.variables.get("params", {})))
    return {
        "name": name,
        "weights": weights,
        "stages": shapes,
        "parameters": f"{parameters / 1e6:.1f} M",
        "compile_s": f"{compile_seconds:.1f}",
        "batch_s": f"{per_batch:.3f}",
        "runs": runs,
        "images_per_s": f"{BATCH / per_batch:.1f}",
        "embed_compile_s": f"{embed_compile_seconds:.1f}",
        "embed_images_per_s": f"{BATCH / embed_per_batch:.1f}",
    }


def time_program(function, variables, images, seconds: float) -> tuple[float, float, int, object]:
    """(compile seconds, median seconds per batch, timed runs, outputs) of ``jit(function)``."""
    start = time.perf_counter()
    compiled = jax.jit(function).lower(variables, images).compile()
    compile_seconds = time.perf_counter() - start
    jax.block_until_ready(compiled(variables, images))  # warm-up
    timings = []
    while len(timings) < 2 or (sum(timings) < seconds and len(timings) < 50):
        start = time.perf_counter()
        outputs = jax.block_until_ready(compiled(variables, images))
        timings.append(time.perf_counter() - start)
    return compile_seconds, float(np.median(timings)), len(timings), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", nargs="*", default=list(available_backbones()))
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="timing budget per backbone (at least 2 runs)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "backbones.md")
    parser.add_argument(
        "--append", action="store_true", help="add a section to --out instead of replacing it"
    )
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    rows = []
    for name in args.names:
        row = measure(name, args.seconds)
        print(row, flush=True)
        rows.append(row)
    columns = [
        ("backbone", "name"),
        ("weights", "weights"),
        ("stages (HxWxC)", "stages"),
        ("params used", "parameters"),
        ("compile s", "compile_s"),
        ("s / batch of 8", "batch_s"),
        ("timed runs", "runs"),
        ("images / s", "images_per_s"),
        ("embed compile s", "embed_compile_s"),
        ("embed images / s", "embed_images_per_s"),
    ]
    notes = [
        f"1-minute load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
        "(the machine is shared; other jobs slow these numbers down)"
    ]
    body = [
        f"Batch {BATCH} uint8 images at {SIZE}x{SIZE} px, the default (PatchCore) stages only, "
        "jitted `module.apply`; time per batch is the median of the timed runs after one "
        "warm-up run; compile time is `lower().compile()`. The embed columns time "
        "`features.embed_images` (backbone + patch features, 1024/1024, patch 3) the same way.",
        "",
        "| " + " | ".join(title for title, _ in columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(str(row[key]) for _, key in columns) + " |" for row in rows),
    ]
    earlier = args.out.read_text(encoding="utf-8") if args.append and args.out.exists() else ""
    title = "Backbone forward pass" + (f": {', '.join(args.names)}" if earlier else "")
    text = write_results(args.out, title, machine(), notes, body)
    if earlier:  # the new run becomes a second-level section below the earlier ones
        args.out.write_text(earlier.rstrip("\n") + "\n\n#" + text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
