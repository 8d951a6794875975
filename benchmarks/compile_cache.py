"""Compile time with JAX's persistent compilation cache: a first and a second CLI run.

Runs `patchcore-jax fit` and then `evaluate` twice, each in a new process, on the shipped demo
category (MobileNetV2, 1% coreset, no heatmaps) with an empty cache folder before the first
run. Reports the wall time of each command, the seconds JAX spent compiling (its
`/jax/compilation_cache/...` and backend-compile events, summed in the process), and how many
programs the second run had to compile (new cache entries).

    python benchmarks/compile_cache.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO_ROOT, RESULTS, machine, write_results

DEMO = REPO_ROOT / "data" / "mvtec_ad_demo" / "bottle"

# Runs the CLI in this process and prints the seconds JAX spent in backend compilation.
_WRAPPER = """
import json, sys, jax
from jax import monitoring
seconds = []
def record(event, duration, **kwargs):
    if event.endswith("backend_compile_duration"):
        seconds.append(duration)
monitoring.register_event_duration_secs_listener(record)
from patchcore_jax.cli import main
status = main(sys.argv[1:])
print(json.dumps({"compile_s": sum(seconds), "status": status}))
"""


def run(arguments: list[str], cache: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *arguments, "--compile-cache", str(cache), "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    result["entries"] = len(list(cache.iterdir())) if cache.exists() else 0
    return result


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        cache = folder / "xla"
        model = folder / "model"
        fit = ["fit", str(DEMO), "--backbone", "mobilenet_v2", "--coreset-fraction", "0.01"]
        rows = []
        for attempt in ("first (empty cache)", "second (new process)"):
            before = len(list(cache.iterdir())) if cache.exists() else 0
            result = run([*fit, "--out", str(model)], cache)
            rows.append(("fit", attempt, result, result["entries"] - before))
        for index, attempt in enumerate(("first", "second (new process)")):
            out = folder / f"evaluation{index}"
            before = len(list(cache.iterdir()))
            result = run(
                ["evaluate", str(model), str(DEMO), "--out", str(out), "--no-heatmaps"], cache
            )
            rows.append(("evaluate", attempt, result, result["entries"] - before))
    body = [
        "The demo category (70 training, 83 test images, 224 px), MobileNetV2, 1% coreset, "
        "self-excluded calibration (default), one CPU device. `evaluate`'s first run already "
        "finds the programs it shares with `fit` in the cache.",
        "",
        "| command | run | wall s | compile s | programs compiled (new cache entries) |",
        "| --- | --- | ---: | ---: | ---: |",
        *(
            f"| {command} | {attempt} | {result['wall_s']:.1f} | {result['compile_s']:.1f} | "
            f"{new} |"
            for command, attempt, result, new in rows
        ),
    ]
    text = write_results(
        RESULTS / "compile_cache.md",
        "Persistent compilation cache: first and second CLI runs",
        machine("cpu"),
        [f"Load average before the run: {os.getloadavg()[0]:.1f} (shared 2-core machine)"],
        body,
    )
    print(text)


if __name__ == "__main__":
    main()
