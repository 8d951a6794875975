"""Where ``PatchCore.fit`` keeps the full patch features while the coreset is selected.

The greedy coreset only needs the projected rows (``projection_dim`` floats a row); the full
rows are needed twice more, each time batch by batch: to gather the M selected rows into the
memory bank, and to score every training image for the calibration. ``FeatureStore`` keeps
this process's full rows, one entry per embedded batch, in the first place they fit:

* ``device``: the embedded global arrays as they are (no copy at all);
* ``host``: this process's rows of each batch in host memory;
* ``spill``: appended to a float32 file in a temporary folder, read back through a short-lived
  ``numpy.memmap`` per batch (so neither the file nor its page cache stays mapped into the
  process); the folder is deleted by ``close`` (also on error).

The store starts on the device and moves everything one tier down when the next batch would
exceed a tier's limit (``memory_limits``), so the number of images need not be known up front.
Host memory is then bounded by the limits plus one batch, never O(N x D).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from patchcore_jax import sharding

KINDS = ("device", "host", "spill")
# Default share of device (and host) memory the full features may take.
DEFAULT_MEMORY_SHARE = 0.25


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _device_memory(devices: list[jax.Device]) -> int | None:
    """Total memory of ``devices`` (None where a backend does not say, e.g. the CPU)."""
    total = 0
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - backends without memory stats
            stats = None
        if not stats or "bytes_limit" not in stats:
            return None
        total += int(stats["bytes_limit"])
    return total


def memory_limits(budget_mb: float | None, mesh: Mesh) -> tuple[float, float]:
    """``(device_limit, host_limit)`` in bytes of this process's full features.

    ``budget_mb`` None (the default): a quarter of this process's devices' memory on the
    device, else a quarter of the host's physical memory on the host, else spill. A budget
    caps both: the features stay on the device if they fit it (and a quarter of the device
    memory), else on the host if they fit it, else they are spilled to a file. On the CPU
    backend "device" memory is host memory and counts the same.
    """
    host = _physical_memory()
    host_auto = float("inf") if host is None else DEFAULT_MEMORY_SHARE * host
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    device = _device_memory(local)
    device_auto = host_auto if device is None else DEFAULT_MEMORY_SHARE * device
    if budget_mb is None:
        return device_auto, host_auto
    budget = float(budget_mb) * 2**20
    return min(budget, device_auto), budget


@functools.partial(jax.jit, static_argnames=("mesh",))
def assemble_rows(batches: tuple[jax.Array, ...], positions: jax.Array, *, mesh: Mesh):
    """Rows ``positions`` of the concatenated ``batches`` ([n_b, p] each), as one array split by
    rows over ``mesh``; positions past the end give zero rows (the greedy coreset's padding)."""
    rows = jnp.concatenate(batches)
    out = jnp.take(rows, positions, axis=0, mode="fill", fill_value=0)
    return jax.lax.with_sharding_constraint(out, sharding.row_sharding(mesh))


@jax.jit
def _gather_rows(batch: jax.Array, images: jax.Array, patches: jax.Array) -> jax.Array:
    """``batch[images, patches]`` on the batch's device: [m, D] of [B, P, D]."""
    return batch[images, patches]


class FeatureStore:
    """This process's full patch features, one entry per embedded batch; see the module doc.

    Use as a context manager (or call ``close``): a spill folder is always removed.
    """

    def __init__(
        self,
        *,
        device_limit: float,
        host_limit: float,
        spill_dir: str | os.PathLike | None = None,
    ) -> None:
        self.device_limit = device_limit
        self.host_limit = host_limit
        self.spill_dir = spill_dir
        self.kind = "device" if device_limit > 0 else "host" if host_limit > 0 else "spill"
        self.counts: list[int] = []  # this process's valid images per batch
        self.nbytes = 0  # of this process's valid rows
        self.row_shape: tuple[int, ...] | None = None  # [P, D]
        self._entries: list = []  # device: global arrays; host: np arrays; spill: row offsets
        self._folder: Path | None = None
        self._file = None
        self._rows_written = 0

    # ------------------------------------------------------------------ writing

    def append(self, batch: jax.Array, num_valid: int) -> None:
        """Stores ``num_valid`` of this process's images of ``batch`` [G, P, D] (global)."""
        self.row_shape = tuple(batch.shape[1:])
        nbytes = num_valid * int(np.prod(self.row_shape)) * 4
        if self.kind == "device" and self.nbytes + nbytes > self.device_limit:
            self._move("host" if self.nbytes + nbytes <= self.host_limit else "spill")
        if self.kind == "host" and self.nbytes + nbytes > self.host_limit:
            self._move("spill")
        self.counts.append(num_valid)
        self.nbytes += nbytes
        if self.kind == "device":
            self._entries.append(batch)
        else:
            self._entries.append(self._put(sharding.process_local_rows(batch)[:num_valid]))

    def _put(self, rows: np.ndarray):
        rows = np.ascontiguousarray(rows, np.float32)
        if self.kind == "host":
            return rows
        if self._file is None:
            self._folder = Path(tempfile.mkdtemp(prefix="patchcore-features-", dir=self.spill_dir))
            self._file = open(self._folder / f"features_{jax.process_index()}.f32", "wb")  # noqa: SIM115
        offset = self._rows_written
        rows.tofile(self._file)
        self._rows_written += rows.shape[0]
        return offset

    def _move(self, kind: str) -> None:
        """Moves every stored batch one or two tiers down (device -> host/spill, host -> spill)."""
        old_kind, self.kind = self.kind, kind
        moved = []
        for index, entry in enumerate(self._entries):
            rows = (
                sharding.process_local_rows(entry)[: self.counts[index]]
                if old_kind == "device"
                else entry
            )
            moved.append(self._put(rows))
            self._entries[index] = None  # frees the old copy as we go
        self._entries = moved

    def finish(self) -> None:
        """Ends writing (flushes a spill file)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    # ------------------------------------------------------------------ reading

    @property
    def path(self) -> Path | None:
        """The spill file, or None."""
        return (
            None if self._folder is None else self._folder / f"features_{jax.process_index()}.f32"
        )

    def describe(self) -> str:
        where = {"device": "on the device(s)", "host": "in host memory"}.get(
            self.kind, f"spilled to {self.path}"
        )
        return f"{self.nbytes / 2**20:.0f} MB {where}"

    def __len__(self) -> int:
        return len(self._entries)

    def local_rows(self, index: int) -> np.ndarray:
        """This process's images of batch ``index`` on the host: [count, P, D] float32."""
        entry, count = self._entries[index], self.counts[index]
        if self.kind == "device":
            return sharding.process_local_rows(entry)[:count]
        if self.kind == "host":
            return entry
        self.finish()
        shape = (count, *self.row_shape)
        mapped = np.memmap(
            self.path,
            np.float32,
            mode="r",
            offset=entry * int(np.prod(self.row_shape)) * 4,
            shape=shape,
        )
        try:
            return np.array(mapped)
        finally:
            del mapped  # unmapped now: the file's pages do not stay in this process

    def global_batch(self, index: int, batch_size: int, batch_sharding) -> jax.Array:
        """Batch ``index`` as the embedded global array [G, P, D] (padded images are zeros
        when it is rebuilt from the host or the file)."""
        if self.kind == "device":
            return self._entries[index]
        padded = sharding.pad_rows(self.local_rows(index), batch_size)
        return jax.make_array_from_process_local_data(batch_sharding, padded)

    def take(self, index: int, images: np.ndarray, patches: np.ndarray) -> np.ndarray:
        """Rows ``(images[i], patches[i])`` of this process's batch ``index``: [m, D] float32.

        Device batches are read on their devices (only the m rows come to the host)."""
        if self.kind != "device":
            return np.asarray(self.local_rows(index)[images, patches], np.float32)
        entry = self._entries[index]
        out = np.zeros((len(images), self.row_shape[-1]), np.float32)
        shards = {s.index[0].start or 0: s.data for s in entry.addressable_shards}
        starts = sorted(shards)  # this process's rows, in order (sharding.process_local_rows)
        per_shard = shards[starts[0]].shape[0]
        for k, start in enumerate(starts):
            mine = np.flatnonzero(images // per_shard == k)
            if mine.size:
                # Index arrays padded to a power of two: a few compiled gathers, not one per m.
                size = 1 << max(0, mine.size - 1).bit_length()
                local = np.zeros(size, np.int32)
                local[: mine.size] = images[mine] % per_shard
                patch = np.zeros(size, np.int32)
                patch[: mine.size] = patches[mine]
                rows = _gather_rows(shards[start], local, patch)
                out[mine] = np.asarray(rows)[: mine.size]
        return out

    # ------------------------------------------------------------------ clean-up

    def close(self) -> None:
        """Drops every stored batch and removes the spill folder."""
        self._entries = []
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
