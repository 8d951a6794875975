"""Helpers shared by the benchmark scripts: machine description, timing, worker processes, and
the results markdown file (command, machine, date header + body).

The scripts run as ``python benchmarks/<name>.py``, so this module imports as ``common``.
Nothing here imports jax at module level: a parent process that only starts workers (each with
its own ``XLA_FLAGS``) never needs it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"


def cpu_model() -> str:
    """``lscpu``'s "Model name" (or ``platform.processor()``), e.g. ``AMD EPYC``."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip()
            for line in lscpu.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine(backend: str | None = None) -> str:
    """CPU model, core count, jax version and backend, e.g.
    ``AMD EPYC, 2 cores (jax 0.10.2, XLA CPU)``.

    ``backend``: what the timed code ran on (default: this process's ``jax.default_backend()``);
    parents of CPU worker processes pass ``"cpu"``.
    """
    import jax

    backend = jax.default_backend() if backend is None else backend
    return f"{cpu_model()}, {os.cpu_count()} cores (jax {jax.__version__}, XLA {backend.upper()})"


def command_line() -> str:
    """How this script was started, as a repo-relative command: ``python benchmarks/x.py ...``."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO_ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def best_times(functions: dict[Any, Callable[[], Any]], repeats: int) -> dict[Any, float]:
    """Best wall time (seconds) of each function over ``repeats`` round-robin rounds.

    One warm-up (compile) call each first; every call is waited for with
    ``jax.block_until_ready``. Interleaving the candidates spreads load from other processes
    evenly over them, and the minimum is the least disturbed run.
    """
    import jax

    for function in functions.values():
        jax.block_until_ready(function())
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            jax.block_until_ready(function())
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def run_with_devices(script: str | Path, num_devices: int, arguments: Sequence[str]) -> Any:
    """Runs ``script --worker --devices N *arguments`` on N virtual XLA CPU devices and returns
    the JSON value the worker printed as its last stdout line.

    A separate process is needed because ``XLA_FLAGS`` is read once, when jax starts.
    """
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
    )
    command = [
        sys.executable,
        str(script),
        "--worker",
        "--devices",
        str(num_devices),
        *map(str, arguments),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"worker {' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_results(
    path: Path,
    title: str,
    machine_line: str,
    notes: Sequence[str],
    body: Sequence[str],
) -> str:
    """Writes (and returns) a results markdown file::

    # title
    Command: `python benchmarks/x.py ...`
    Machine: machine_line
    Date: YYYY-MM-DD
    notes (one line each)

    body (description and tables)
    """
    header = [
        f"Command: `{command_line()}`",
        f"Machine: {machine_line}",
        f"Date: {datetime.date.today().isoformat()}",
        *notes,
    ]
    # Two trailing spaces make markdown keep the header lines apart.
    lines = [f"# {title}", "", *(line + "  " for line in header[:-1]), header[-1], "", *body]
    text = "\n".join(lines).rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return text
