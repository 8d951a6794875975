"""interrupt.py: Ctrl-C stops a long command at its next safe point, before anything is saved
(exit 130), and changes nothing for library users who never install the handler."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import BOTTLE
from test_cli import run_cli

from patchcore_jax import coreset, interrupt


def _wait_for_flag() -> None:
    """Python runs a signal's handler at its next bytecode boundary: wait for it."""
    deadline = time.monotonic() + 5.0
    while not interrupt.requested() and time.monotonic() < deadline:
        time.sleep(0.001)


def test_without_the_handler_ctrl_c_keeps_python_default_and_check_never_raises():
    before = signal.getsignal(signal.SIGINT)
    import importlib

    importlib.reload(interrupt)  # importing installs nothing
    assert signal.getsignal(signal.SIGINT) is before
    interrupt.check()
    assert not interrupt.requested()


def test_first_ctrl_c_sets_the_flag_and_restores_the_default_action_for_a_second():
    before = signal.getsignal(signal.SIGINT)
    with interrupt.handling_sigint():
        interrupt.check()  # nothing requested yet
        os.kill(os.getpid(), signal.SIGINT)
        _wait_for_flag()
        assert interrupt.requested()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # a second Ctrl-C terminates
        with pytest.raises(interrupt.Interrupted):
            interrupt.check()
    assert signal.getsignal(signal.SIGINT) is before and not interrupt.requested()
    interrupt.check()
    assert issubclass(interrupt.Interrupted, KeyboardInterrupt)  # never an `except Exception`


def test_ctrl_c_stops_the_greedy_coreset_after_at_most_one_more_chunk(monkeypatch):
    monkeypatch.setattr(coreset, "_ROW_VISITS_PER_CHUNK", 1024)  # one step per chunk
    reports = []

    def press_ctrl_c_once(steps):
        reports.append(steps)
        if len(reports) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for_flag()

    features = np.random.default_rng(13).normal(size=(1000, 8)).astype(np.float32)
    with interrupt.handling_sigint(), pytest.raises(interrupt.Interrupted):
        coreset.approximate_greedy_coreset(
            features, 500, key=jax.random.key(0), projection_dim=8, progress=press_ctrl_c_once
        )
    assert len(reports) == 1  # the check follows the first chunk's report: no more work


# ------------------------------------------------------------------ the command line


def _fit_args(data: Path, out: Path) -> list[str]:
    # Tiny crops and batches of 2: 3 feature batches, so Ctrl-C lands in every phase.
    return [
        "fit", data, "--out", out, "--backbone", "mobilenet_v2", "--coreset-fraction", "0.05",
        "--resize", "64", "--crop", "64", "--batch-size", "2",
    ]  # fmt: skip


def _fit_pressing_ctrl_c(data: Path, out: Path, trigger: str) -> tuple[int, str]:
    """Runs ``fit`` and sends SIGINT once its stderr shows ``trigger``: (exit status, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.setdefault("PATCHCORE_COMPILE_CACHE", str(Path(data).parent / "xla"))
    process = subprocess.Popen(
        [sys.executable, "-m", "patchcore_jax.cli", *map(str, _fit_args(data, out))],
        stderr=subprocess.PIPE,
        env=env,
    )
    stderr, sent = b"", False
    while chunk := os.read(process.stderr.fileno(), 4096):
        stderr += chunk
        if not sent and trigger.encode() in stderr:
            process.send_signal(signal.SIGINT)
            sent = True
    process.wait(timeout=120)
    assert sent, f"{trigger!r} never appeared:\n{stderr.decode()}"
    return process.returncode, stderr.decode()


def _contents(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupt")
    data = root / "data" / "train" / "good"
    data.mkdir(parents=True)
    for image in sorted((BOTTLE / "train/good").glob("*.png"))[:6]:
        (data / image.name).symlink_to(image)
    run_cli(*_fit_args(root / "data", root / "model"))
    return root / "data"


@pytest.mark.parametrize(
    "trigger",
    [
        "features: started",  # the stage's first line, before its first feature batch
        "coreset:",  # the greedy coreset's bar
        "calibration:",  # logged after the calibration: Ctrl-C before or during the save
    ],
)
def test_ctrl_c_during_fit_exits_130_and_leaves_out_untouched(tiny_data, tmp_path, trigger):
    previous = tmp_path / "previous"
    shutil.copytree(tiny_data.parent / "model", previous)
    before = _contents(previous)
    for out in (previous, tmp_path / "new"):  # over a model, into a new folder
        status, stderr = _fit_pressing_ctrl_c(tiny_data, out, trigger)
        assert status == 130, stderr
        assert stderr.rstrip().endswith("patchcore-jax: interrupted"), stderr
        assert "saved model" not in stderr and "Traceback" not in stderr, stderr
    assert _contents(previous) == before and not (tmp_path / "new").exists()
    if trigger == "calibration:":
        import patchcore_jax

        assert patchcore_jax.load(previous).memory_bank.shape[0] > 0  # still loads
