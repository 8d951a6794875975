"""Device meshes and the conventions every device stage follows (sharding, matmul precision).

One 2-D mesh serves the whole pipeline:

* ``data``: images (and query patches) are split along it: data parallelism.
* ``bank``: memory-bank rows are split along it for k-NN scoring.

Stages that own a single big array split it over *both* axes (``ALL_AXES``): the backbone batch
during fitting and the patch rows during coreset selection. A mesh of one device is the
single-device case; the same compiled programs run on 1, 8 or 512 devices, on one host or many.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Every float32 matmul and einsum of the device stages runs at this precision, so GPUs and TPUs do
# not silently use TF32 or bfloat16 passes (the reference numerics).
HIGHEST = jax.lax.Precision.HIGHEST
DATA_AXIS = "data"
BANK_AXIS = "bank"
ALL_AXES = (DATA_AXIS, BANK_AXIS)


def make_mesh(bank_shards: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, bank)`` mesh over ``devices`` (default: every device of every process).

    Args:
      bank_shards: how many devices split each memory bank; must divide the device count.
        1 (default) replicates the bank and runs inference purely data-parallel.
      devices: the devices to use, e.g. ``jax.local_devices()`` or ``jax.devices()[:1]``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if bank_shards < 1 or len(devices) % bank_shards:
        raise ValueError(
            f"bank_shards={bank_shards} must be a positive divisor of the device count "
            f"{len(devices)}"
        )
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // bank_shards, bank_shards)
    return Mesh(grid, ALL_AXES)


def single_device_mesh() -> Mesh:
    """The 1x1 mesh on the default device: the single-device reference behaviour."""
    return make_mesh(1, jax.devices()[:1])


def mesh_size(mesh: Mesh, axes: str | tuple[str, ...] = ALL_AXES) -> int:
    """Number of shards along ``axes`` of ``mesh``."""
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def pad_rows(rows: np.ndarray, multiple: int) -> np.ndarray:
    """Host ``rows`` with zero rows appended up to a multiple of ``multiple`` (axis 0).

    Callers drop the padded rows' results; see ``PatchCore.embed``.
    """
    pad = (-rows.shape[0]) % multiple
    return np.pad(rows, [(0, pad)] + [(0, 0)] * (rows.ndim - 1)) if pad else rows


def row_sharding(mesh: Mesh, axes: str | tuple[str, ...] = ALL_AXES) -> NamedSharding:
    """Sharding that splits axis 0 over ``axes`` and replicates the rest."""
    return NamedSharding(mesh, P(axes))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that puts a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def replicate(values: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array, equal on every process, as a global array replicated over ``mesh``."""
    values = np.asarray(values)
    return jax.make_array_from_callback(values.shape, replicated(mesh), lambda index: values[index])


def process_local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of an array split by rows, in order (all rows on one process).

    Shards replicated over other mesh axes are read once.
    """
    if x.is_fully_addressable:
        return np.asarray(x)
    blocks = {shard.index[0].start or 0: shard.data for shard in x.addressable_shards}
    return np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)])


def gather_from_processes(local: np.ndarray) -> np.ndarray:
    """Every process's host ``local`` (equal shapes on every process, small):
    [processes, *local.shape], on every process."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local[None]
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(local))
    return gathered.reshape(jax.process_count(), *local.shape)


def gather_rows_from_processes(
    rows: np.ndarray | None, *, every_process: bool = True
) -> np.ndarray | None:
    """Concatenates every process's host rows (process 0's first) on every process.

    ``rows`` may differ in length between processes, or be None where a process has none;
    returns None only if no process has any. With ``every_process`` a process without rows is
    an error (while another has some); without it, such a process passes an empty [0, ...]
    array. With one process, returns ``rows`` unchanged.
    """
    if jax.process_count() == 1:
        return rows
    num_local = 0 if rows is None else rows.shape[0]
    counts = gather_from_processes(np.int64(num_local)).reshape(-1)
    if counts.sum() == 0:
        return None
    if every_process and (counts == 0).any():  # decided alike on every process: none waits
        raise ValueError(f"every process must contribute rows; counts per process: {counts}")
    padded = np.zeros((max(1, int(counts.max())), *rows.shape[1:]), rows.dtype)
    padded[:num_local] = rows
    gathered = gather_from_processes(padded)
    return np.concatenate([gathered[p, : counts[p]] for p in range(len(counts))])


def initialize_distributed(**kwargs) -> None:
    """Joins this process to a multi-process JAX job (TPU pod slice, multi-node GPU, CPU hosts).

    A thin wrapper over ``jax.distributed.initialize(**kwargs)``: on Cloud TPU, SLURM and
    Open MPI the arguments are detected; elsewhere pass ``coordinator_address="host:port"``,
    ``num_processes`` and ``process_id``. Call it before any other JAX call; afterwards
    ``make_mesh()`` spans every process's devices and the same programs run unchanged.
    """
    jax.distributed.initialize(**kwargs)


def enable_compile_cache(folder: str | os.PathLike) -> None:
    """Turns on JAX's persistent compilation cache in ``folder`` (every program is cached), so
    a later process with the same shapes skips compilation."""
    jax.config.update("jax_compilation_cache_dir", str(Path(folder).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
