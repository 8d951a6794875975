"""Host images/s of the input pipeline: decoding, resizing and cropping a folder of images
(by default the bottle training set, 209 PNGs of 900x900, resize 256, crop 224) into uint8
batches with ``preprocess.iter_image_batches``, as fit, predict and evaluate read them.

Settings, each measured in a fresh process (``PYTHONPATH`` = the tree measured) so that the
worker pool's start-up is in the time as a run pays it, alternating over ``--rounds``:

  baseline threads   the previous main (``--baseline``): threads of one process (its default)
  0 workers          this tree, ``ImageReader(workers=0)``: the same threads (today's path)
  N workers          this tree, N spawned worker processes (``--workers``, default 1 2)
  warm cache, N      this tree, N workers reading every crop from a warm ``--cache-dir``
                     (filled once before the rounds; a cold cache costs a decode + a write)

Each process reports images/s over the whole read (pool start-up included) and the seconds to
the first batch (start-up). Per worker: images/s divided by the worker count (1 worker is the
cleanest figure). The prediction for a machine with more cores multiplies the 1-worker rate by
its cores: it holds while the decode is CPU-bound and the disk and page cache keep up.

    python benchmarks/input_pipeline.py --baseline /work/wt-base5 [--images DIR] [--rounds 3]
        [--workers 1 2] [--predict-cores 16] [--out benchmarks/results/input_pipeline.md]
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

BOTTLE_TRAIN = Path(
    os.environ.get("PATCHCORE_SHARED", "/work/shared"), "data/mvtec_ad/bottle/train/good"
)


def worker(args: argparse.Namespace) -> None:
    """Runs in the measured tree: reads every image once; prints a JSON line."""
    from patchcore_jax import preprocess

    paths = sorted(Path(args.images).glob("*.png"))
    options = {"resize": 256, "crop": 224}
    if args.workers is None:  # the previous main: no reader argument
        batches = preprocess.iter_image_batches(paths, 8, **options)
        reader = None
    else:
        from patchcore_jax.image_reader import ImageReader

        reader = ImageReader(workers=args.workers, cache_dir=args.cache_dir)
        batches = preprocess.iter_image_batches(paths, 8, **options, reader=reader)
    start = time.perf_counter()
    first = None
    count = 0
    for batch in batches:
        count += len(batch)
        first = time.perf_counter() - start if first is None else first
    seconds = time.perf_counter() - start
    counts = None if reader is None else [reader.decoded, reader.from_cache]
    print(json.dumps({"images": count, "seconds": seconds, "first": first, "counts": counts}))


def measure(tree: Path, images: str, workers: int | None, cache_dir: str | None) -> dict:
    """One fresh process of ``tree`` reading ``images``."""
    command = [sys.executable, __file__, "--worker", "--images", images]
    if workers is not None:
        command += ["--worker-count", str(workers)]
    if cache_dir is not None:
        command += ["--cache-dir", cache_dir]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{tree} {workers}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="tree of the previous main (required)")
    parser.add_argument("--images", default=str(BOTTLE_TRAIN), help="folder of PNG images")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--predict-cores", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "input_pipeline.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-count", dest="worker_count", type=int, default=None)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.workers = args.worker_count
        worker(args)
        return
    if args.baseline is None:
        parser.error("--baseline is required: a tree of the previous main")

    cache = tempfile.mkdtemp(prefix="input_pipeline_cache_")
    cold = measure(REPO_ROOT, args.images, args.workers[-1], cache)  # fills the cache
    settings = {"baseline threads": (args.baseline, None, None), "0 workers": (REPO_ROOT, 0, None)}
    for count in args.workers:
        settings[f"{count} workers"] = (REPO_ROOT, count, None)
    for count in (0, args.workers[-1]):
        settings[f"warm cache, {count} workers"] = (REPO_ROOT, count, cache)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, (tree, count, cache_dir) in settings.items():
            runs[name].append(measure(tree, args.images, count, cache_dir))
            print(name, runs[name][-1], flush=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    num_images = cold["images"]
    rows = [
        "| setting | images/s best | images/s median | per worker (best) | seconds to the "
        "first batch (median) | decoded, from cache |",
        "|---|---:|---:|---:|---:|---|",
    ]
    rates = {}
    for name, measured in runs.items():
        per_second = [run["images"] / run["seconds"] for run in measured]
        rates[name] = max(per_second)
        count = settings[name][1]
        per_worker = f"{max(per_second) / count:.1f}" if count else "-"
        first = statistics.median(run["first"] for run in measured)
        counts = measured[-1]["counts"]
        counted = "-" if counts is None else ", ".join(map(str, counts))
        rows.append(
            f"| {name} | {max(per_second):.1f} | {statistics.median(per_second):.1f} | "
            f"{per_worker} | {first:.2f} | {counted} |"
        )
    one = rates.get("1 workers")
    prediction = []
    if one is not None:
        prediction = [
            "",
            f"**Prediction** (not measured) for the {args.predict_cores} cores of the GPU machine: "
            f"{one:.1f} images/s per worker x {args.predict_cores} = "
            f"{one * args.predict_cores:.0f} images/s with `--workers {args.predict_cores}` "
            "(the default caps at 8 workers: "
            f"{one * 8:.0f} images/s), if the decode stays CPU-bound and the main process "
            "keeps up (it only stacks the crops). The warm cache needs no decode: its rate is "
            "file reads and hashing.",
        ]
    body = [
        f"{num_images} images of `{args.images}` (resize 256, crop 224, batch 8), each setting "
        f"in a fresh process, {args.rounds} rounds alternating; pool start-up included. A cold "
        f"cache ({args.workers[-1]} workers: decode + write) read at "
        f"{cold['images'] / cold['seconds']:.1f} images/s.",
        "",
        *rows,
        *prediction,
    ]
    notes = [
        f"Load average (1, 5, 15 min): before {' '.join(load_before)}, after "
        f"{' '.join(load_after)}; baseline tree {args.baseline}",
    ]
    machine = f"{cpu_model()}, {os.cpu_count()} cores (host only: no jax in the timed code)"
    print(write_results(args.out, "Input pipeline: host images/s", machine, notes, body))


if __name__ == "__main__":
    main()
