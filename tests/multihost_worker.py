"""One process of the multi-host check (tests/test_multihost.py launches several).

Each process owns ``--local-devices`` CPU devices and only its contiguous share of the bank rows
and query rows. Together they run the sharded device stages over all global devices and process
0 writes what every process read back to ``--out/results.npz``:

* ``coreset_given``: greedy coreset of the ``coreset_d1024`` fixture with its projection and
  start points; ``coreset_keyed``: the same bank with projection and starts drawn from a key, by
  the pruned path;
* ``memory_bank``: ``build_memory_bank`` rows of the keyed coreset;
* ``nn_distances`` / ``nn_indices``: ``knn.nearest_neighbors`` of query rows against that
  memory bank;
* ``model_<process>.npz``: a whole ``PatchCore`` fitted and run on MVTec AD bottle images, each
  process holding half of the train and test images (written by every process).

Usage: python multihost_worker.py --process-id I --num-processes N --port P --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

WORKER_SEED = 0
NUM_QUERIES = 512


def model_config():
    from patchcore_jax import PatchCoreConfig

    return PatchCoreConfig(backbone="mobilenet_v2", coreset_fraction=0.05, batch_size=4)


def model_images():
    """8 nominal train images and 4 test images (2 good, 2 defective) of MVTec AD bottle."""
    from conftest import BOTTLE

    from patchcore_jax.preprocess import load_images

    train = sorted((BOTTLE / "train/good").glob("*.png"))
    train = train[:: len(train) // 8][:8]  # every 26th of the 209 (the demo: every 8th of 70)
    test = sorted((BOTTLE / "test/good").glob("*.png"))[:2]
    test += sorted((BOTTLE / "test/broken_large").glob("*.png"))[:2]
    return load_images(train), load_images(test)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local-devices", type=int, default=4)
    return parser.parse_args()


def local_rows(array, process_id: int, num_processes: int):
    """This process's contiguous share of ``array``'s rows (rows must divide evenly)."""
    per_process = array.shape[0] // num_processes
    if per_process * num_processes != array.shape[0]:
        raise ValueError(f"{array.shape[0]} rows do not split over {num_processes} processes")
    return array[process_id * per_process : (process_id + 1) * per_process]


def main() -> None:
    args = parse_args()
    # Devices and platform must be fixed before jax is imported.
    os.environ["XLA_FLAGS"] = " ".join(
        [
            os.environ.get("XLA_FLAGS", ""),
            f"--xla_force_host_platform_device_count={args.local_devices}",
        ]
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    import jax
    import numpy as np
    from conftest import load_fixture
    from jax.experimental import multihost_utils

    from patchcore_jax import PatchCore, checkpoint, coreset, knn, sharding

    args.out.mkdir(parents=True, exist_ok=True)

    # gloo is jax's default CPU collectives implementation; set it explicitly all the same.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=120,
    )
    assert jax.process_count() == args.num_processes, jax.process_count()
    assert jax.local_device_count() == args.local_devices, jax.local_devices()

    fixture = load_fixture("reference_parity", "coreset_d1024")
    bank = fixture["features"]
    num_samples = len(fixture["indices"])
    split = {"process_id": args.process_id, "num_processes": args.num_processes}

    coreset_mesh = sharding.make_mesh()  # every device of every process
    global_bank = jax.make_array_from_process_local_data(
        sharding.row_sharding(coreset_mesh), local_rows(bank, **split), bank.shape
    )
    assert not global_bank.is_fully_addressable
    results = {
        "coreset_given": coreset.approximate_greedy_coreset(
            global_bank,
            num_samples,
            projection=fixture["projection"],
            start_indices=fixture["start_points"],
            mesh=coreset_mesh,
        ),
        "coreset_keyed": coreset.approximate_greedy_coreset(
            global_bank,
            num_samples,
            key=jax.random.key(WORKER_SEED),
            mesh=coreset_mesh,
            method="pruned",  # the single-process check uses the full pass
        ),
    }
    memory_bank = coreset.build_memory_bank(
        global_bank,
        sampler="approx_greedy_coreset",
        fraction=float(fixture["fraction"]),
        key=jax.random.key(WORKER_SEED),
        mesh=coreset_mesh,
    )
    results["memory_bank"] = memory_bank

    score_mesh = sharding.make_mesh(bank_shards=2)
    queries = (
        np.random.default_rng(WORKER_SEED)
        .normal(scale=float(bank.std()), size=(NUM_QUERIES, bank.shape[1]))
        .astype(np.float32)
    )
    global_queries = jax.make_array_from_process_local_data(
        sharding.row_sharding(score_mesh, sharding.DATA_AXIS),
        local_rows(queries, **split),
        queries.shape,
    )
    distances, indices = knn.nearest_neighbors(global_queries, memory_bank, 1, mesh=score_mesh)
    results["nn_distances"], results["nn_indices"] = distances, indices

    # The whole model: each process reads only its share of the images; fit gathers the bank
    # rows from every process, predict returns this process's images' scores and maps.
    train_images, test_images = model_images()
    # Process 0 keeps its features on its devices, process 1 spills them to a file (the
    # streaming fit's tiers are chosen per process; the results do not depend on them).
    budget = 0.0 if args.process_id == 1 else None
    config = model_config().replace(feature_memory_budget=budget)
    model = PatchCore(config, mesh=sharding.make_mesh(bank_shards=2))
    lines = []
    model.fit(local_rows(train_images, **split), log=lines.append)
    print("\n".join(lines), flush=True)
    features_line = next(line for line in lines if line.startswith("features:"))
    assert ("spilled to" if budget == 0.0 else "on the device") in features_line, lines
    prediction = model.predict(local_rows(test_images, **split))
    local_scores, local_maps = prediction.image_scores, prediction.anomaly_maps
    checkpoint.save(model, args.out / "model")  # every process takes part; process 0 swaps folders
    np.savez(
        args.out / f"model_{args.process_id}.npz",
        scores=local_scores,
        maps=local_maps,
        memory_bank=np.asarray(model.memory_bank.addressable_data(0)),
    )

    # Replicated results are readable as they are; sharded ones are gathered to every process.
    host = {
        name: np.asarray(
            value
            if value.is_fully_addressable or value.is_fully_replicated
            else multihost_utils.process_allgather(value, tiled=True)
        )
        for name, value in results.items()
    }
    if args.process_id == 0:
        np.savez(args.out / "results.npz", **host)
    # Nobody leaves before process 0 has read everything it needs from the others.
    multihost_utils.sync_global_devices("multihost_worker done")
    jax.distributed.shutdown()
    print(f"process {args.process_id}: ok ({', '.join(sorted(host))})", flush=True)


if __name__ == "__main__":
    main()
