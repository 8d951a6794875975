"""Device meshes and the sharding conventions every device stage follows.

One 2-D mesh serves the whole pipeline:

* ``data``: images (and query patches) are split along it: data parallelism.
* ``bank``: memory-bank rows are split along it for k-NN scoring.

Stages that own a single big array split it over *both* axes (``ALL_AXES``): the backbone batch
during fitting and the patch rows during coreset selection. A mesh of one device is the
single-device case; the same compiled programs run on 1, 8 or 512 devices, on one host or many.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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


def pad_rows(x: jax.Array | np.ndarray, multiple: int, value: float = 0.0):
    """Pads axis 0 of ``x`` up to a multiple of ``multiple``; returns ``(padded, num_valid)``.

    Callers must make padded rows inert (never selected, never matched); see the stages.
    """
    num_valid = x.shape[0]
    pad = (-num_valid) % multiple
    if pad:
        widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
        x = (
            jnp.pad(x, widths, constant_values=value)
            if isinstance(x, jax.Array)
            else np.pad(x, widths, constant_values=value)
        )
    return x, num_valid


def row_sharding(mesh: Mesh, axes: str | tuple[str, ...] = ALL_AXES) -> NamedSharding:
    """Sharding that splits axis 0 over ``axes`` and replicates the rest."""
    return NamedSharding(mesh, P(axes))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that puts a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())
