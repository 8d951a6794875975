"""Multi-host check: two processes on localhost, 4 CPU devices each, one 8-device mesh.

Each process (tests/multihost_worker.py) holds only half of the bank rows and half of the query
rows; the sharded coreset, k-NN scoring and a whole PatchCore fit/predict over the 8 global
devices must give what a single process computes on one device.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import numpy as np
from conftest import REPO_ROOT, load_fixture
from float_rounding import compare_greedy_selection

from patchcore_jax import PatchCore, checkpoint, coreset, knn, sharding

NUM_PROCESSES = 2
TIMEOUT_S = 300
WORKER = REPO_ROOT / "tests" / "multihost_worker.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(out_dir) -> None:
    """Runs every worker to completion, or kills them all and fails with their output."""
    port = free_port()
    env = dict(os.environ)
    # The worker sets its own device count and keeps every other XLA flag of this process
    # (e.g. --xla_cpu_max_isa), so both sides compile the same code.
    env["XLA_FLAGS"] = " ".join(
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    )
    env["JAX_PLATFORMS"] = "cpu"
    logs = [out_dir / f"process_{i}.log" for i in range(NUM_PROCESSES)]
    processes = []
    for process_id, log in enumerate(logs):
        command = [
            sys.executable, str(WORKER), "--process-id", str(process_id),
            "--num-processes", str(NUM_PROCESSES), "--port", str(port), "--out", str(out_dir),
        ]  # fmt: skip
        with open(log, "w") as log_file:
            processes.append(
                subprocess.Popen(
                    command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
                )
            )
    timed_out = False
    try:
        for process in processes:
            process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    codes = [process.returncode for process in processes]
    if timed_out or any(codes):
        outputs = "\n".join(
            f"----- process {i} (exit {code}) -----\n{log.read_text()[-6000:]}"
            for i, (code, log) in enumerate(zip(codes, logs, strict=True))
        )
        reason = f"timed out after {TIMEOUT_S} s" if timed_out else f"exit codes {codes}"
        raise AssertionError(f"multi-host workers failed ({reason}):\n{outputs}")


def test_two_processes_match_single_process(tmp_path):
    # Imported from the worker so both sides use the same seed and query count.
    sys.path.insert(0, str(WORKER.parent))
    from multihost_worker import NUM_QUERIES, WORKER_SEED, model_config, model_images

    run_workers(tmp_path)
    with np.load(tmp_path / "results.npz") as data:
        results = dict(data)

    case = load_fixture("reference_parity", "coreset_d1024")
    bank, num_samples = case["features"], len(case["indices"])
    # The reference's indices up to float32 near-ties (other CPUs round differently) ...
    comparison = compare_greedy_selection(
        bank, results["coreset_given"], case["indices"], case["start_points"], case["projection"]
    )
    assert comparison.ok, comparison.summary()
    # ... and exactly what one process computes on this machine.
    given = coreset.approximate_greedy_coreset(
        bank, num_samples, projection=case["projection"], start_indices=case["start_points"]
    )
    np.testing.assert_array_equal(results["coreset_given"], np.asarray(given))

    key = jax.random.key(WORKER_SEED)
    keyed = np.asarray(coreset.approximate_greedy_coreset(bank, num_samples, key=key))
    np.testing.assert_array_equal(results["coreset_keyed"], keyed)
    memory_bank = np.asarray(
        coreset.build_memory_bank(
            bank, sampler="approx_greedy_coreset", fraction=float(case["fraction"]), key=key
        )
    )
    np.testing.assert_array_equal(results["memory_bank"], memory_bank)

    queries = (
        np.random.default_rng(WORKER_SEED)
        .normal(scale=float(bank.std()), size=(NUM_QUERIES, bank.shape[1]))
        .astype(np.float32)
    )
    distances, indices = knn.nearest_neighbors(queries, memory_bank, 1)
    np.testing.assert_array_equal(results["nn_indices"], np.asarray(indices))
    np.testing.assert_allclose(results["nn_distances"], np.asarray(distances), rtol=1e-5)

    # The whole model, fitted and run by two processes on their halves of the images, equals
    # one process on one device that sees every image.
    train_images, test_images = model_images()
    model = PatchCore(model_config(), mesh=sharding.single_device_mesh()).fit(train_images)
    prediction = model.predict(test_images)
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    parts = [dict(np.load(tmp_path / f"model_{i}.npz")) for i in range(NUM_PROCESSES)]
    for part in parts:
        np.testing.assert_array_equal(part["memory_bank"], np.asarray(model.memory_bank))
    np.testing.assert_allclose(np.concatenate([p["scores"] for p in parts]), scores, rtol=1e-5)
    np.testing.assert_allclose(
        np.concatenate([p["maps"] for p in parts]), maps, rtol=1e-5, atol=1e-5 * maps.max()
    )
    # The checkpoint the two processes wrote together restores in a single process.
    restored = checkpoint.load(tmp_path / "model", mesh=sharding.single_device_mesh())
    np.testing.assert_array_equal(np.asarray(restored.memory_bank), np.asarray(model.memory_bank))
