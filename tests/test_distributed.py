"""``--distributed``: the CLI as two local processes of four CPU devices each (one 8-device
mesh), compared with one process of eight devices (the same programs per device, so the same
bits), and the arithmetic of each process's share of the images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest
from conftest import REPO_ROOT
from test_multihost import free_port

from patchcore_jax import checkpoint, options, sharding, workflows
from patchcore_jax.cli import build_parser

NUM_PROCESSES = 2
TIMEOUT_S = 300
# Batches of 4: one image per device both in one process of 8 devices and in two of 4.
MODEL_OPTIONS = ["--backbone", "mobilenet_v2", "--coreset-fraction", "0.02", "--batch-size", "4"]


def run_processes(*args) -> list[subprocess.CompletedProcess]:
    """``patchcore-jax ARGS --distributed`` as two local processes; both are killed (and the
    test fails) if they do not end within TIMEOUT_S."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # Keep this process's other XLA flags (e.g. --xla_cpu_max_isa) so both sides compile alike.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=4"])
    env.setdefault("PATCHCORE_COMPILE_CACHE", str(REPO_ROOT / ".pytest_cache" / "xla"))
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "patchcore_jax.cli",
                *map(str, args),
                "--quiet",
                "--distributed",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(NUM_PROCESSES),
                "--process-id",
                str(process_id),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )  # fmt: skip
        for process_id in range(NUM_PROCESSES)
    ]
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
            results.append(
                subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
            )
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def own_lines(text: str) -> list[str]:
    """Lines the tool wrote (not gloo's connection notes, which it prints to stdout)."""
    return [line for line in text.splitlines() if line and not line.startswith("[Gloo]")]


def test_two_processes_fit_and_evaluate_like_one_and_only_process_0_writes(subset, tmp_path):
    fitted = run_processes("fit", subset, "--out", tmp_path / "model2", *MODEL_OPTIONS)
    for result in fitted:
        assert result.returncode == 0, result.stderr[-3000:]
    evaluated = run_processes(
        "evaluate", tmp_path / "model2", subset, "--out", tmp_path / "evaluation2"
    )
    for result in evaluated:
        assert result.returncode == 0, result.stderr[-3000:]

    # One process of 8 devices, the same options, through the same workflows.
    parsed = build_parser().parse_args(["fit", str(subset), *MODEL_OPTIONS])
    assert len(jax.devices()) == 8
    workflows.fit_folder(subset, tmp_path / "model1", options.configs_from_args(parsed))
    workflows.evaluate_dataset(tmp_path / "model1", subset, tmp_path / "evaluation1")

    # The same bank (its sha256 and shape), calibration and metrics.
    one, two = (checkpoint.read_record(tmp_path / f"model{n}") for n in (1, 2))
    assert two["memory_bank"] == one["memory_bank"]
    assert two["calibration"] == one["calibration"]
    metrics = [json.loads((tmp_path / f"evaluation{n}/metrics.json").read_text()) for n in (1, 2)]
    for report in metrics:
        del report["model"]
    assert metrics[1] == metrics[0]
    per_image = [(tmp_path / f"evaluation{n}/per_image.csv").read_text() for n in (1, 2)]
    assert per_image[1] == per_image[0]
    heatmaps = [
        sorted(
            p.relative_to(tmp_path / f"evaluation{n}")
            for p in (tmp_path / f"evaluation{n}").rglob("*.png")
        )
        for n in (1, 2)
    ]
    # 6 heatmaps, score_distributions.png and roc.png
    assert heatmaps[1] == heatmaps[0] and len(heatmaps[0]) == 6 + 2

    # Process 0 reports; process 1 prints nothing of its own. Both hold the evaluate folder's
    # lock only if they write, and a second writer would have failed on it.
    assert "saved model" in fitted[0].stderr and own_lines(fitted[1].stderr) == []
    assert "image_auroc" in evaluated[0].stdout and own_lines(evaluated[1].stdout) == []
    assert own_lines(evaluated[1].stderr) == []


def test_an_unreadable_image_in_one_share_ends_both_processes_with_one_line(subset, tmp_path):
    data = tmp_path / "data"
    (data / "train/good").mkdir(parents=True)
    for image in sorted((subset / "train/good").iterdir())[:4]:
        (data / "train/good" / image.name).symlink_to(image.resolve())
    (data / "train/good/zzz.png").write_bytes(b"not a png")  # last: process 1's share

    results = run_processes("fit", data, "--out", tmp_path / "model", *MODEL_OPTIONS)
    errors = [own_lines(result.stderr)[-1] for result in results]
    assert [result.returncode for result in results] == [2, 2]
    assert errors[0] == errors[1]
    # Every process decodes every image before the work (workflows.check_usable), so the
    # first process to report names it; the agreement gives both the same line.
    assert errors[0].startswith("patchcore-jax: error: process ")
    assert "1 of 5 training images cannot be used" in errors[0] and "zzz.png" in errors[0]
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    ("num_items", "batch_size", "num_processes", "sizes"),
    [
        (9, 2, 2, [[2, 1, 1], [2, 2, 1]]),  # shares 4 and 5: the full last batch is split
        (10, 4, 2, [[4, 1], [4, 1]]),
        (7, 8, 3, [[2], [2], [3]]),
        (8, 1, 2, [[1] * 4, [1] * 4]),
    ],
)
def test_shares_are_the_images_in_order_in_equally_many_batches(
    monkeypatch, num_items, batch_size, num_processes, sizes
):
    monkeypatch.setattr(jax, "process_count", lambda: num_processes)
    shares = []
    for process in range(num_processes):
        monkeypatch.setattr(jax, "process_index", lambda process=process: process)
        share, largest = sharding.process_share(num_items)
        assert sharding.share_batch_sizes(num_items, batch_size) == sizes[process]
        assert sum(sizes[process]) == share.stop - share.start <= largest
        shares += list(range(num_items))[share]
    assert shares == list(range(num_items))


@pytest.mark.parametrize(
    ("num_items", "batch_size"),
    [(1, 4), (9, 1)],  # a process without images; batches of 1
)
def test_shares_that_cannot_run_in_step_are_refused(monkeypatch, num_items, batch_size):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="do not split over 2 processes"):
        sharding.share_batch_sizes(num_items, batch_size)


def test_distributed_values_need_distributed_and_a_process_id_below_the_count():
    def arguments(*flags):
        args = build_parser().parse_args(["predict", "m", "x", "--out", "o", *flags])
        return options.distributed_arguments(args)

    assert arguments() is None
    assert arguments("--distributed") == {}
    assert arguments("--distributed", "--num-processes", "2", "--process-id", "1") == {
        "num_processes": 2,
        "process_id": 1,
    }
    with pytest.raises(ValueError, match="need --distributed"):
        arguments("--coordinator", "host:1234")
    with pytest.raises(ValueError, match="--process-id 2: expected 0 .. 1"):
        arguments("--distributed", "--num-processes", "2", "--process-id", "2")


def test_one_process_agrees_without_collectives():
    sharding.agree(None)
    sharding.agree(ValueError("only this process"))  # nothing to agree on: the caller raises
    with pytest.raises(KeyError), sharding.agreed():
        raise KeyError("kept as it is")
