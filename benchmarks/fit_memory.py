"""Peak host memory of a fit: the in-memory path vs the streaming fit with a small budget.

Each fit runs in its own process under ``/usr/bin/time -v`` (peak RSS = "Maximum resident set
size"; without it, ``resource.getrusage(RUSAGE_CHILDREN)``), on one JAX device:

* ``in-memory``: ``model.fit_features(model.patch_features(images))``: every patch feature
  [N, D] on the host;
* ``streaming``: ``model.fit(images)`` with ``feature_memory_budget`` several times smaller
  than the features, so they are spilled to a memory-mapped file and only the projected rows
  [N, 128] and the bank [M, D] stay resident.

The worker also reports its RSS after loading the images and building (and compiling) the
model, before the fit: the floor that JAX/XLA, the backbone and the images take in both runs.
The banks, their source images and the calibration scores of both runs are compared.

    python benchmarks/fit_memory.py [--images 64] [--fraction 0.01] [--budget-mb 32]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

sys.path.insert(0, str(common.REPO_ROOT / "tests"))


def _rss_mb() -> tuple[float, float]:
    """(current, peak) RSS of this process in MB, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return (
        int(fields["VmRSS"].split()[0]) / 1024,
        int(fields["VmHWM"].split()[0]) / 1024,
    )


def worker(args: argparse.Namespace) -> None:
    import jax
    import numpy as np
    from fixture_data import BOTTLE

    from patchcore_jax import PatchCore, PatchCoreConfig, sharding
    from patchcore_jax.preprocess import load_images

    paths = sorted((BOTTLE / "train" / "good").glob("*.png"))[: args.images]
    images = load_images(paths)
    config = PatchCoreConfig(
        backbone="mobilenet_v2",
        coreset_fraction=args.fraction,
        batch_size=8,
        feature_memory_budget=args.budget_mb if args.mode == "streaming" else None,
    )
    model = PatchCore(config, mesh=sharding.single_device_mesh())
    list(model.embed(images[:1]))  # compiles the embedding: part of the floor
    floor, floor_peak = _rss_mb()
    lines: list[str] = []
    start = time.perf_counter()
    if args.mode == "streaming":
        model.fit(images, log=lines.append, spill_dir=args.spill_dir)
    else:
        model.fit_features(model.patch_features(images), log=lines.append)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    np.savez(
        out / f"{args.mode}.npz",
        memory_bank=np.asarray(model.memory_bank),
        sources=model.bank_source_images,
        image_scores=model.calibration.image_scores,
    )
    result = {
        "floor_mb": floor,
        "floor_peak_mb": floor_peak,
        "peak_mb": _rss_mb()[1],
        "fit_s": seconds,
        "bank_rows": int(model.memory_bank.shape[0]),
        "log": lines,
        "backend": jax.default_backend(),
    }
    (out / f"{args.mode}.json").write_text(json.dumps(result))


def run(mode: str, args: argparse.Namespace, out: Path) -> dict:
    command = [
        sys.executable, __file__, "--worker", mode, "--out", str(out),
        "--images", str(args.images), "--fraction", str(args.fraction),
        "--budget-mb", str(args.budget_mb), "--spill-dir", str(out),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(common.REPO_ROOT))
    env.pop("XLA_FLAGS", None)
    timer = shutil.which("time") or "/usr/bin/time"
    start = time.perf_counter()
    if os.path.exists(timer):
        done = subprocess.run(
            [timer, "-v", *command], env=env, capture_output=True, text=True, check=False
        )
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
        peak = int(match.group(1)) / 1024 if match else float("nan")
        how = "/usr/bin/time -v"
    else:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        how = "getrusage(RUSAGE_CHILDREN)"
    if done.returncode:
        raise RuntimeError(f"{mode} worker failed:\n{done.stdout}\n{done.stderr[-4000:]}")
    result = json.loads((out / f"{mode}.json").read_text())
    result.update(peak_rss_mb=peak, wall_s=time.perf_counter() - start, how=how)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--budget-mb", type=float, default=32.0)
    parser.add_argument("--worker", choices=("in-memory", "streaming"))
    parser.add_argument("--out")
    parser.add_argument("--spill-dir")
    args = parser.parse_args()
    if args.worker:
        args.mode = args.worker
        return worker(args)

    import numpy as np

    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fit-memory-") as folder:
        out = Path(folder)
        results = {mode: run(mode, args, out) for mode in ("in-memory", "streaming")}
        old, new = (dict(np.load(out / f"{m}.npz")) for m in ("in-memory", "streaming"))
        identical = {name: bool(np.array_equal(old[name], new[name])) for name in old}
        leftovers = sorted(p.name for p in out.iterdir() if p.suffix not in (".json", ".npz"))
    load_after = os.getloadavg()
    num_rows = args.images * 784
    feature_mb = num_rows * 1024 * 4 / 2**20
    body = [
        f"Fit of {args.images} MVTec AD bottle training images ({num_rows} patches x 1024 "
        f"float32 = {feature_mb:.0f} MB of features), offline MobileNetV2, approximate greedy "
        f"coreset {args.fraction:.0%} ({results['streaming']['bank_rows']} rows), "
        "self-excluded calibration (default), batch 8, one JAX CPU device; each fit in its "
        f"own process, peak RSS by {results['streaming']['how']}.",
        "",
        "| path | feature budget | peak RSS (MB) | floor (MB) | peak - floor (MB) "
        "| fit (s) | process wall (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, budget in (("in-memory", "-"), ("streaming", f"{args.budget_mb:g} MB")):
        r = results[mode]
        body.append(
            f"| {mode} | {budget} | {r['peak_rss_mb']:.0f} | {r['floor_mb']:.0f} | "
            f"{r['peak_rss_mb'] - r['floor_mb']:.0f} | {r['fit_s']:.1f} | {r['wall_s']:.1f} |"
        )
    body += [
        "",
        "Floor: the worker's RSS after loading the images and building and compiling the model "
        "(JAX/XLA runtime, backbone, images), just before the fit; it is in both peaks.",
        "",
        "Identical results (streaming vs in-memory): "
        + ", ".join(f"{name} {'yes' if same else 'NO'}" for name, same in identical.items())
        + f". Spill folder left behind: {leftovers or 'none'}.",
        "",
        "Streaming fit log:",
        "",
        *(f"    {line}" for line in results["streaming"]["log"]),
    ]
    text = common.write_results(
        common.RESULTS / "fit_memory.md",
        "Peak host memory of a fit: in-memory vs streaming (spilled) features",
        common.machine("cpu"),
        [
            f"Load average (1, 5, 15 min) before: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}; "
            f"after: {load_after[0]:.2f}, {load_after[1]:.2f}, {load_after[2]:.2f}"
        ],
        body,
    )
    print(text)
    if not all(identical.values()):
        raise SystemExit("the streaming fit differs from the in-memory fit")


if __name__ == "__main__":
    main()
