"""Device meshes and the conventions every device stage follows (sharding, matmul precision).

One 2-D mesh serves the whole pipeline:

* ``data``: images (and query patches) are split along it: data parallelism.
* ``bank``: memory-bank rows are split along it for k-NN scoring.

Stages that own a single big array split it over *both* axes (``ALL_AXES``): the backbone batch
during fitting and the patch rows during coreset selection. A mesh of one device is the
single-device case; the same compiled programs run on 1, 8 or 512 devices, on one host or many.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

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
# Bytes of an error's first line that ``agree`` passes between processes.
_MESSAGE_BYTES = 1024
Item = TypeVar("Item")


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


def valid_rows(num_valid: int, num_rows: int, batch_sharding: NamedSharding) -> jax.Array:
    """``[global rows] bool`` split like a batch: this process's first ``num_valid`` of its
    ``num_rows`` rows True, its padding (``pad_rows``) False; every process passes its own."""
    local = np.arange(num_rows) < num_valid
    return jax.make_array_from_process_local_data(batch_sharding, local)


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
    A process that dies later ends the others after ``heartbeat_timeout_seconds`` (jax's
    default: 100). Raises ValueError (one line) if the job cannot be joined.
    """
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as error:  # no coordinator detected or reachable, a bad address, ...
        raise ValueError(f"cannot join the multi-process job: {_first_line(error)}") from error


def is_primary_process() -> bool:
    """False only on the processes other than 0 of a multi-process job (those that write no
    files and print no results); never starts a JAX backend."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def process_share(num_items: int) -> tuple[slice, int]:
    """This process's contiguous share of ``num_items`` ordered items (process 0's first, so
    that the shares in process order are the items in order; sizes differ by at most one) and
    the largest share's size."""
    processes, index = jax.process_count(), jax.process_index()
    bounds = [num_items * process // processes for process in range(processes + 1)]
    return slice(bounds[index], bounds[index + 1]), -(-num_items // processes)


def share_batch_sizes(num_items: int, batch_size: int) -> list[int]:
    """Sizes of the batches (each 1 .. ``batch_size``) of this process's ``process_share``:
    as many on every process, so that all run each compiled program equally often.

    Raises ValueError, alike on every process, if some process's share cannot fill that many
    batches (fewer items than processes, or ``batch_size`` 1 with unequal shares).
    """
    share, largest = process_share(num_items)
    num_batches = -(-largest // batch_size)
    smallest = num_items // jax.process_count()
    if smallest < num_batches:
        raise ValueError(
            f"{num_items} images do not split over {jax.process_count()} processes into equally "
            f"many batches of at most {batch_size}: every process needs at least {num_batches} "
            "images (use fewer processes or a larger --batch-size)"
        )
    size = share.stop - share.start
    sizes = [batch_size] * (size // batch_size) + ([size % batch_size] if size % batch_size else [])
    if len(sizes) < num_batches:  # one short (a full last batch of >= 2): split it in two
        last = sizes.pop()
        sizes += [last - last // 2, last // 2]
    return sizes


def rebatch(batches: Iterable[np.ndarray], sizes: Sequence[int]) -> Iterator[np.ndarray]:
    """``batches`` cut into batches of ``sizes`` (each size within one of the batches)."""
    remaining = iter(sizes)
    for batch in batches:
        while len(batch):
            size = next(remaining)
            yield batch[:size]
            batch = batch[size:]


class ProcessFailure(ValueError):
    """An error one process of a multi-process job met, raised alike on every process by
    ``agree``: ``process Q of N: <that error's first line>``."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, ValueError | OSError):  # bad input: its message says it all
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def agree(error: BaseException | None) -> None:
    """Every process says whether it failed (a collective: all call it at the same point);
    if any did, every process raises the same ``ProcessFailure`` naming the first failed
    process and its error's first line, so none waits forever for a peer that gave up.

    With one process, or for an error already agreed on (a ``ProcessFailure``), does nothing:
    the caller raises its own error.
    """
    if jax.process_count() == 1 or isinstance(error, ProcessFailure):
        return
    local = np.zeros(_MESSAGE_BYTES, np.uint8)
    if error is not None:
        text = _first_line(error).encode()[: _MESSAGE_BYTES - 3]
        local[0], local[1], local[2] = 1, len(text) // 256, len(text) % 256
        local[3 : 3 + len(text)] = np.frombuffer(text, np.uint8)
    everyone = gather_from_processes(local)
    failed = np.flatnonzero(everyone[:, 0])
    if failed.size:
        first = everyone[failed[0]]
        text = bytes(first[3 : 3 + int(first[1]) * 256 + int(first[2])])
        message = text.decode("utf-8", errors="replace")
        raise ProcessFailure(f"process {failed[0]} of {jax.process_count()}: {message}") from error


@contextlib.contextmanager
def agreed() -> Iterator[None]:
    """Runs a block that every process runs, then ``agree``s on its outcome: an error in any
    process's block ends every process's with the same ``ProcessFailure``."""
    try:
        yield
    except Exception as error:
        agree(error)
        raise
    agree(None)


def agreed_items(items: Iterable[Item], count: int) -> Iterator[Item]:
    """The ``count`` items of ``items`` (as many on every process), each produced inside
    ``agreed``: e.g. image batches, so that an unreadable image in one process's share ends
    every process at the same batch with the same error."""
    iterator = iter(items)
    for _ in range(count):
        with agreed():
            item = next(iterator, None)
            if item is None:
                raise ValueError(f"fewer than the {count} planned batches")
        yield item


def default_compile_cache() -> str:
    """The project's compilation-cache folder: ``$PATCHCORE_COMPILE_CACHE`` (``off``: none),
    else ``$XDG_CACHE_HOME/patchcore-jax/xla`` (``~/.cache/patchcore-jax/xla``)."""
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return os.environ.get("PATCHCORE_COMPILE_CACHE", str(cache_home / "patchcore-jax" / "xla"))


def enable_compile_cache(folder: str | os.PathLike, every_program: bool = True) -> None:
    """Turns on JAX's persistent compilation cache in ``folder`` (process-wide), so a later
    process with the same shapes skips compilation: every program, or with ``every_program``
    False only those JAX's own thresholds keep (compiling >= 1 s by default)."""
    jax.config.update("jax_compilation_cache_dir", str(Path(folder).expanduser()))
    if every_program:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
