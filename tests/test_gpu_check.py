"""benchmarks/gpu_check.py, the script a lent GPU runs, rehearsed on the CPU so it never rots."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT


def test_gpu_check_rehearsal_passes_its_correctness_checks_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--small", "--out", str(out),
         "--parts", "correctness", "coreset"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[FAIL]" not in result.stdout and result.stdout.count("[PASS]") >= 8
    assert "greedy coreset" in out.read_text()
