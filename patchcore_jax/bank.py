"""The fit's feature store and row selection.

``PatchCore.fit`` (and ``fit_features``, ``extend``) keep the full patch features here while
the memory bank is selected. The greedy coreset only needs the projected rows
(``projection_dim`` floats a row); the full rows are needed twice more, each time batch by
batch: to gather the M selected rows into the memory bank (``take_rows``), and to score the
training images for the calibration (``self_excluded_batches``, ``held_out_batches``).
``FeatureStore`` keeps this process's full rows, one entry per batch, in the first place
they fit:

* ``device``: the embedded global arrays as they are (no copy at all);
* ``host``: this process's rows of each batch in host memory (``fit_features`` places its
  precomputed features here, without a copy);
* ``spill``: appended to a float32 file in a temporary folder (in ``spill_dir``: checked when
  the store is made, created when the first row is spilled), read back through a short-lived
  ``numpy.memmap`` per batch (so neither the file nor its page cache stays mapped into the
  process); the folder is deleted by ``close`` (also on error). A failed write (a full disk)
  is an OSError naming the file.

The store starts on the device and moves everything one tier down when the next batch would
exceed a tier's limit (``memory_limits``), so the number of images need not be known up front.
Host memory is then bounded by the limits plus one batch, never O(N x D). ``ImageLayout``
numbers the stored images of every process (process 0's first), as ``patch_features`` numbers
its rows.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from patchcore_jax import coreset, sharding
from patchcore_jax.config import PatchCoreConfig
from patchcore_jax.files import check_writable_folder, writing

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
def finite_rows(batch: jax.Array) -> jax.Array:
    """[B, P, D] -> [B, P] bool: the rows without a NaN or infinite value."""
    return jnp.all(jnp.isfinite(batch), axis=-1)


def non_finite_message(what: str, bad: int, num_rows: int) -> str:
    """Why ``bad`` of ``num_rows`` rows of ``what`` are refused."""
    return (
        f"{what}: {bad} of {num_rows} rows are non-finite (NaN or inf); "
        "check the input images (non-finite or out-of-range pixels) and the backbone weights"
    )


def check_finite_rows(rows: np.ndarray | jax.Array, what: str) -> None:
    """ValueError naming how many rows of ``rows: [N, D]`` hold a NaN or infinite value: one
    such row would be every test patch's nearest neighbour (or nobody's)."""
    if isinstance(rows, jax.Array):
        bad = int(jnp.sum(~jnp.all(jnp.isfinite(rows), axis=-1)))
    else:  # host rows, in chunks so the check never doubles host memory
        rows = np.asarray(rows)
        bad = sum(
            int(np.count_nonzero(~np.isfinite(rows[start : start + 8192]).all(axis=-1)))
            for start in range(0, rows.shape[0], 8192)
        )
    if bad:
        raise ValueError(non_finite_message(what, bad, rows.shape[0]))


@jax.jit
def _gather_rows(batch: jax.Array, images: jax.Array, patches: jax.Array) -> jax.Array:
    """``batch[images, patches]`` on the batch's device: [m, D] of [B, P, D]."""
    return batch[images, patches]


def _megabytes(limit: float) -> str:
    return "unlimited" if math.isinf(limit) else f"{limit / 2**20:.0f} MB"


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
        self.spill_dir = (
            None if spill_dir is None else check_writable_folder(spill_dir, "spill_dir")
        )
        self.kind = "device" if device_limit > 0 else "host" if host_limit > 0 else "spill"
        self.counts: list[int] = []  # this process's valid images per batch
        self.nbytes = 0  # of this process's valid rows
        self.row_shape: tuple[int, ...] | None = None  # [P, D]
        self._entries: list = []  # device: global arrays; host: np arrays; spill: row offsets
        self._finite: list[jax.Array] = []  # [G, P] bool per appended (embedded) batch
        self._folder: Path | None = None
        self._file = None
        self._rows_written = 0

    # ------------------------------------------------------------------ writing

    def append(self, batch: jax.Array, num_valid: int) -> None:
        """Stores ``num_valid`` of this process's images of ``batch`` [G, P, D] (global)."""
        self._reserve(tuple(batch.shape[1:]), num_valid)
        self._finite.append(finite_rows(batch))
        if self.kind == "device":
            self._entries.append(batch)
        else:
            self._entries.append(self._put(sharding.process_local_rows(batch)[:num_valid]))

    def add_rows(self, rows: np.ndarray) -> None:
        """Stores this process's host ``rows`` [count, P, D] as one batch (count may be 0): in
        host memory without a copy (float32, contiguous), or in the spill file."""
        if self.kind == "device":
            self._move("host")
        self._reserve(tuple(rows.shape[1:]), rows.shape[0])
        self._entries.append(self._put(rows))

    @classmethod
    def within_budget(
        cls, budget_mb: float | None, mesh: Mesh, spill_dir: str | os.PathLike | None = None
    ) -> FeatureStore:
        """An empty store with the limits ``memory_limits`` sets for ``budget_mb``."""
        device_limit, host_limit = memory_limits(budget_mb, mesh)
        return cls(device_limit=device_limit, host_limit=host_limit, spill_dir=spill_dir)

    def non_finite_rows(self) -> int:
        """This process's rows with a NaN or infinite value among the appended batches'."""
        return sum(
            int(np.count_nonzero(~sharding.process_local_rows(finite)[:count]))
            for finite, count in zip(self._finite, self.counts, strict=False)
        )

    def _reserve(self, row_shape: tuple[int, ...], count: int) -> None:
        """Counts ``count`` more images of ``row_shape`` [P, D], moving down a tier first if
        they would exceed the current tier's limit."""
        self.row_shape = row_shape
        nbytes = count * int(np.prod(row_shape)) * 4
        if self.kind == "device" and self.nbytes + nbytes > self.device_limit:
            self._move("host" if self.nbytes + nbytes <= self.host_limit else "spill")
        if self.kind == "host" and self.nbytes + nbytes > self.host_limit:
            self._move("spill")
        self.counts.append(count)
        self.nbytes += nbytes

    def _put(self, rows: np.ndarray):
        rows = np.ascontiguousarray(rows, np.float32)
        if self.kind == "host":
            return rows
        if self._file is None:
            if self.spill_dir is not None:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="patchcore-features-", dir=self.spill_dir))
            self._file = open(self.path, "wb")  # noqa: SIM115
        offset = self._rows_written
        with writing(self.path):  # file.write, not ndarray.tofile: tofile can lose a failure
            self._file.write(rows.data)
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
            file, self._file = self._file, None
            with writing(self.path):
                file.close()

    # ------------------------------------------------------------------ reading

    @property
    def path(self) -> Path | None:
        """The spill file, or None."""
        return (
            None if self._folder is None else self._folder / f"features_{jax.process_index()}.f32"
        )

    def describe(self) -> str:
        """Where the features are and the budget, e.g. ``12 MB in host memory (budget ...)``."""
        where = {"device": "on the device(s)", "host": "in host memory"}.get(
            self.kind, f"spilled to {self.path}"
        )
        return (
            f"{self.nbytes / 2**20:.0f} MB {where} (budget {_megabytes(self.device_limit)} on "
            f"the device, {_megabytes(self.host_limit)} on the host)"
        )

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
            with contextlib.suppress(OSError):  # its folder is removed next
                self._file.close()
            self._file = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------------- reading rows back


class ImageLayout:
    """Where each image of a ``FeatureStore`` is, on every process, numbered as
    ``patch_features``'s rows (process 0's images first): ``process``, ``batch`` (store entry),
    ``within`` (index among that process's images of the entry), ``position`` (row of the
    concatenated global batch arrays: ``batch * global_batch + row``), and ``first_image``
    (each process's first image number); ``num_images`` in all.

    Args:
      counts: [processes, entries] images per store entry of every process.
      batch_sharding: the sharding of the global batches (``sharding.row_sharding``).
      batch_size: one process's images per global batch.
    """

    def __init__(self, counts: np.ndarray, batch_sharding, batch_size: int) -> None:
        num_processes, num_batches = counts.shape
        self.global_batch = batch_size * num_processes
        blocks: dict[int, list[tuple[int, int]]] = {}
        for device, index in batch_sharding.devices_indices_map((self.global_batch,)).items():
            start, stop, _ = index[0].indices(self.global_batch)
            blocks.setdefault(device.process_index, []).append((start, stop))
        process, batch, within, position = [], [], [], []
        for q in range(num_processes):
            # This process's rows of a global batch, in the order of its local data.
            rows = np.concatenate([np.arange(a, b) for a, b in sorted(set(blocks[q]))])
            for b in range(num_batches):
                n = int(counts[q, b])
                process.append(np.full(n, q))
                batch.append(np.full(n, b))
                within.append(np.arange(n))
                position.append(b * self.global_batch + rows[:n])
        self.process, self.batch, self.within, self.position = (
            np.concatenate(x).astype(np.int64) for x in (process, batch, within, position)
        )
        self.first_image = np.concatenate([[0], np.cumsum(counts.sum(axis=1))[:-1]])
        self.num_images = int(counts.sum())

    @classmethod
    def of(cls, store: FeatureStore, batch_sharding, batch_size: int) -> ImageLayout:
        """The layout of every process's ``store`` (a collective: every process calls it);
        ValueError if there are no images, or a process has none."""
        counts = sharding.gather_from_processes(np.asarray(store.counts, np.int64))
        per_process = counts.sum(axis=1)
        if per_process.sum() == 0:
            raise ValueError("fit() received no images")
        if (per_process == 0).any():
            raise ValueError(
                f"every process must contribute rows; counts per process: {per_process}"
            )
        return cls(counts, batch_sharding, batch_size)


def take_rows(
    store: FeatureStore, layout: ImageLayout, images: np.ndarray, patches: np.ndarray
) -> np.ndarray:
    """Rows ``(images[i], patches[i])`` of the store: [m, D] float32 on every process (each
    row read by the process that holds it)."""
    owners = layout.process[images]
    out = np.zeros((len(images), store.row_shape[-1]), np.float32)
    for index in range(len(store)):
        mine = np.flatnonzero((owners == jax.process_index()) & (layout.batch[images] == index))
        if mine.size:
            out[mine] = store.take(index, layout.within[images[mine]], patches[mine])
    if jax.process_count() > 1:
        out = sharding.gather_from_processes(out)[owners, np.arange(len(images))]
    return out


def image_rows(store: FeatureStore, layout: ImageLayout, images: np.ndarray) -> np.ndarray:
    """Every row of ``images``, image-major: [len(images) * P, D] float32 on every process."""
    num_patches = store.row_shape[0]
    return take_rows(
        store,
        layout,
        np.repeat(images, num_patches),
        np.tile(np.arange(num_patches), len(images)),
    )


def assemble_projected(
    projected: list[jax.Array], layout: ImageLayout, images: np.ndarray, *, mesh: Mesh
) -> jax.Array:
    """The projected rows of ``images`` (image-major) as one array of
    ``coreset.padded_rows(len(images) * P, mesh)`` rows split over ``mesh``, zero-padded: what
    ``coreset.greedy_coreset_from_projected`` runs on. ``projected``: per store entry, its
    global batch's rows projected by ``coreset.project_rows`` ([G * P, p] each)."""
    num_patches = projected[0].shape[0] // layout.global_batch
    num_rows = len(images) * num_patches
    positions = (layout.position[images][:, None] * num_patches + np.arange(num_patches)).reshape(
        -1
    )
    beyond = len(projected) * layout.global_batch * num_patches  # a zero row
    positions = np.pad(
        positions, (0, coreset.padded_rows(num_rows, mesh) - num_rows), constant_values=beyond
    )
    return assemble_rows(
        tuple(projected), sharding.replicate(positions.astype(np.int32), mesh), mesh=mesh
    )


def self_excluded_batches(
    store: FeatureStore, layout: ImageLayout, batch_size: int, batch_sharding
) -> Iterator[tuple[jax.Array, jax.Array, int]]:
    """Every stored batch as ``(global batch [G, P, D], image numbers [G] int32, num_valid)``:
    each image's number says which bank rows came from it (padding: -2, no image's)."""
    first = int(layout.first_image[jax.process_index()])
    for index in range(len(store)):
        num_valid = store.counts[index]
        ids = np.full((batch_size,), -2, np.int32)
        ids[:num_valid] = np.arange(first, first + num_valid)
        first += num_valid
        global_ids = jax.make_array_from_process_local_data(batch_sharding, ids)
        yield store.global_batch(index, batch_size, batch_sharding), global_ids, num_valid


def held_out_batches(
    store: FeatureStore,
    layout: ImageLayout,
    held_out: np.ndarray,
    batch_size: int,
    batch_sharding,
) -> Iterator[tuple[jax.Array, None, int]]:
    """This process's images of ``held_out`` (sorted image numbers) regrouped into full
    batches ``(global batch [G, P, D] zero-padded, None, num_valid)`` (the shape of
    ``self_excluded_batches``'s); every process yields as many."""
    mine = held_out[layout.process[held_out] == jax.process_index()]
    num_batches = max(
        -(-int(np.count_nonzero(layout.process[held_out] == q)) // batch_size)
        for q in range(jax.process_count())
    )
    pending: list[np.ndarray] = []

    def padded() -> tuple[jax.Array, None, int]:
        batch = np.zeros((batch_size, *store.row_shape), np.float32)
        num_valid = sum(len(p) for p in pending)
        if pending:
            batch[:num_valid] = np.concatenate(pending)
        pending.clear()
        return jax.make_array_from_process_local_data(batch_sharding, batch), None, num_valid

    done = 0
    for index in range(len(store)):
        wanted = mine[layout.batch[mine] == index]
        rows = store.local_rows(index)[layout.within[wanted]] if wanted.size else wanted
        while len(rows):
            room = batch_size - sum(len(p) for p in pending)
            pending.append(rows[:room])
            rows = rows[room:]
            if sum(len(p) for p in pending) == batch_size:
                yield padded()
                done += 1
    for _ in range(done, num_batches):
        yield padded()


# ---------------------------------------------------------------------- placing and selecting


def host_store(rows: np.ndarray, batch_size: int) -> FeatureStore:
    """Precomputed ``rows`` [N, P, D] (the same on every process) in a host-tier store, in
    batches of ``batch_size`` as ``fit`` stores embedded ones: each process stores its own
    contiguous share (process 0's first), in as many batches as every other process."""
    share, largest = sharding.process_share(len(rows))
    mine = rows[share]
    num_batches = -(-largest // batch_size)
    store = FeatureStore(device_limit=0, host_limit=float("inf"))
    for start in range(0, num_batches * batch_size, batch_size):
        store.add_rows(mine[start : start + batch_size])
    return store


def project_batches(
    store: FeatureStore, batch_size: int, projection: jax.Array | None, *, mesh: Mesh
) -> list[jax.Array]:
    """Every stored batch's rows projected by ``coreset.project_rows``: [G * P, p] each, as
    ``fit`` projects the batches it embeds (split by rows over ``mesh``)."""
    batch_sharding = sharding.row_sharding(mesh)
    return [
        coreset.project_rows(
            store.global_batch(index, batch_size, batch_sharding), projection, mesh=mesh
        )
        for index in range(len(store))
    ]


def store_features(
    rows: np.ndarray | jax.Array,
    num_patches: int,
    batch_size: int,
    *,
    mesh: Mesh,
    projection: jax.Array | None = None,
    project: bool = False,
    whole_images_for: str | None = None,
) -> tuple[FeatureStore, ImageLayout, list[jax.Array]]:
    """Precomputed features [N, D] (checked: finite) stored as ``fit`` stores embedded ones:
    ``(host-tier store, layout, projected rows per batch (``project_batches`` if ``project``,
    else none))``. Whole images [num_patches, D] in batches of ``batch_size``; rows that are not
    whole images (refused when ``whole_images_for`` names what needs them) as single rows
    [1, D] in batches of ``batch_size * num_patches``."""
    check_finite_rows(rows, "patch features")
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[0] % num_patches:
        if whole_images_for is not None:
            raise ValueError(
                f"{whole_images_for} needs the patch features of whole "
                f"images ([num_images * {num_patches}, D], as patch_features returns), got "
                f"{rows.shape}; or use calibration='none'"
            )
        num_patches, batch_size = 1, batch_size * num_patches
    store = host_store(rows.reshape(-1, num_patches, rows.shape[-1]), batch_size)
    projected = project_batches(store, batch_size, projection, mesh=mesh) if project else []
    return store, ImageLayout.of(store, sharding.row_sharding(mesh), batch_size), projected


def select_bank(
    store: FeatureStore,
    layout: ImageLayout,
    projected: list[jax.Array],
    images: np.ndarray,
    config: PatchCoreConfig,
    *,
    key: jax.Array,
    mesh: Mesh,
    progress: Callable[[int], None] | None = None,
    selected_rows: np.ndarray | None = None,
) -> tuple[np.ndarray | jax.Array, np.ndarray | None]:
    """``(memory bank rows [M, D] float32, source image of each row [M] or None)``:
    ``config.sampler`` (``coreset.select_rows``) on the stored rows of ``images`` (sorted
    image numbers), M = ``config.bank_rows``. The greedy coreset runs on the ``projected``
    batches (``assemble_projected``; the list is emptied once they are assembled; ``progress``
    gets 0 first, then the steps done after each chunk), continued
    from ``selected_rows`` (projected rows already in the bank) if given; ``learned_proxies``
    trains on every row of ``images`` (read into host memory) and has no source images."""
    num_patches = store.row_shape[0]
    num_rows = len(images) * num_patches

    def greedy(num_samples: int) -> jax.Array:
        if progress is not None:
            progress(0)  # the selection starts: assembling the rows, then the steps
        rows_on_mesh = assemble_projected(projected, layout, images, mesh=mesh)
        projected.clear()  # only the assembled rows stay on the devices
        return coreset.greedy_coreset_from_projected(
            rows_on_mesh,
            num_samples,
            num_rows=num_rows,
            key=key,
            num_start_points=config.num_start_points,
            mesh=mesh,
            method=config.coreset_method,
            progress=progress,
            selected_rows=selected_rows,
            memory_budget_mb=config.feature_memory_budget,
        )

    rows = coreset.select_rows(
        config.sampler, num_rows, config.coreset_fraction, key=key, greedy=greedy
    )
    if rows is None:
        features = image_rows(store, layout, images)
        return coreset.learned_proxies(features, config.bank_rows(num_rows), key=key), None
    source_images = images[rows // num_patches]
    return take_rows(store, layout, source_images, rows % num_patches), source_images
