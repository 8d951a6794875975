"""The versioned folder of a checkpoint: how a save replaces a model atomically.

Layout: the checkpoint folder holds versions and a pointer::

    MODEL/CURRENT                  one line: the name of the version folder that is the model
    MODEL/v000002/                 a single model: an orbax checkpoint, state/ (the bank) and
                                   record/ (the JSON record)
    MODEL/v000002/ensemble.json    or an ensemble: {"format", "members": ["member0", ...],
    MODEL/v000002/member0/         "normalisation"} and one complete single-model checkpoint
                                   folder per member

Saving locks the folder (``files.exclusive_lock`` on the folder itself: a second writer fails at
once), writes the next version in full (``write_version``: orbax commits it), then replaces
``CURRENT`` with one ``os.replace``, then removes the versions older than the new one. A kill at
any moment leaves ``CURRENT`` naming a complete version, old or new (a single model or an
ensemble, never a mix), so loading always finds a model; the next save removes what a killed one
left. Saving only ever deletes entries it wrote (versions, its staging folders and pointer
temporaries); other files in the folder are left alone. Folders written before the pointer
existed (an orbax checkpoint at MODEL itself) still load, and the next save replaces them in the
same way.

The protocol is written here rather than with orbax's ``CheckpointManager``: that one finds the
latest version by listing its step folders (there is no ``CURRENT`` to switch atomically), every
step must be an orbax checkpoint (an ensemble's version is a folder of member checkpoints), and it
does not read the folders written before the pointer existed. What a version holds is
``checkpoint``'s.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import jax

from patchcore_jax import interrupt
from patchcore_jax.errors import CheckpointError
from patchcore_jax.files import exclusive_lock, nearest_existing, unwritable

STATE = "state"  # a single model's orbax items: the arrays ...
RECORD = "record"  # ... and the JSON record
POINTER = "CURRENT"
VERSION = re.compile(r"v\d{6}")
LEGACY = (STATE, RECORD, "_CHECKPOINT_METADATA", "commit_success.txt")


def check_destination(path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """The absolute ``path`` if a checkpoint can be saved there; CheckpointError otherwise.

    Cheap, and called before any work (``fit``) so a bad ``--out`` fails in a second, not after
    feature extraction: ``path`` must be a new folder (its nearest existing ancestor a writable
    folder), an empty folder, or a writable patchcore-jax checkpoint (replaced if ``overwrite``)
    whose ``CURRENT`` is readable, and no other run may be saving into it.
    """
    target = Path(path).absolute()
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise CheckpointError(f"{target} is a file, not a checkpoint folder")
        if _layout(target) is None and not all(map(_is_leftover, target.iterdir())):
            raise CheckpointError(
                f"{target} exists and is not a patchcore-jax checkpoint; refusing to write into it"
            )
        if _layout(target) is not None and not overwrite:
            raise CheckpointError(f"{target} exists; pass overwrite=True to replace it")
        problem = unwritable(target)
        if problem:
            raise CheckpointError(f"cannot write to {target}: {problem}")
        current_version(target)  # a damaged pointer is reported now
        if jax.process_index() == 0:  # the one process that locks it (``write_version``)
            with _locked(target):  # another run saving into it is reported now
                pass
        return target
    ancestor = nearest_existing(target.parent)
    if not ancestor.is_dir():
        raise CheckpointError(f"cannot create {target}: {ancestor} is a file, not a folder")
    problem = unwritable(ancestor)
    if problem:
        raise CheckpointError(f"cannot create {target}: {ancestor} is not writable ({problem})")
    return target


def enclosing_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint folder that ``path`` is or lies inside (links resolved), or None.

    A folder counts when it holds ``CURRENT``, a version folder (``vNNNNNN``, also the
    leftover of an unfinished first save) or a checkpoint written before the pointer existed:
    other tools must never write files there (``CURRENT`` replaced by a foreign file makes the
    model unloadable).
    """
    for folder in [Path(path).resolve(), *Path(path).resolve().parents]:
        try:
            if folder.is_dir() and (
                _layout(folder) is not None
                or any(VERSION.fullmatch(e.name) and e.is_dir() for e in folder.iterdir())
            ):
                return folder
        except OSError:  # an unreadable ancestor is no checkpoint we could have written
            continue
    return None


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """The checkpoint folder ``target`` locked for one writer (CheckpointError if it is not)."""
    try:
        with exclusive_lock(target, f"checkpoint folder {target}"):
            yield
    except FileExistsError as error:
        raise CheckpointError(str(error)) from None


def reached(point: str) -> None:
    """Called at each step of ``write_version`` (a no-op); tests replace it to kill the process
    there."""


def write_version(
    path: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = True
) -> Path:
    """Writes a new version of the checkpoint folder ``path`` and makes it current; returns the
    absolute path.

    The versioned-folder protocol of every checkpoint (module docstring): ``write(staging)``
    fills the hidden folder ``.vNNNNNN.saving`` (it does not exist yet), which is then renamed
    to ``vNNNNNN``; ``CURRENT`` is switched to it in one ``os.replace``, and the versions older
    than it are removed. The folder stays locked from before the first write to after the last
    removal (a second writer fails at once: CheckpointError), and what killed saves left is
    removed first. If ``write`` raises (or Ctrl-C was pressed meanwhile: ``interrupt.check``),
    its staging folder is removed and the previous model stays current. With several processes
    every process calls ``write`` (for orbax, which coordinates them) and process 0 alone
    creates, locks, switches and cleans.
    """
    target = check_destination(path, overwrite=overwrite)
    is_primary = jax.process_index() == 0
    created = not target.exists()
    if is_primary:
        target.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(target) if is_primary else contextlib.nullcontext():
            _write_locked(target, write, is_primary)
    except BaseException:
        if is_primary and created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # nothing of ours or anyone's in it
        raise
    barrier("patchcore_jax.checkpoint.save:done")
    return target


def _write_locked(target: Path, write: Callable[[Path], None], is_primary: bool) -> None:
    """``write_version``'s steps once the folder ``target`` exists and is locked."""
    if is_primary:
        _remove_leftovers(target)
    barrier("patchcore_jax.checkpoint.save:prepared")
    current = current_version(target)
    name = f"v{(int(current[1:]) if current else 0) + 1:06d}"
    staging = target / f".{name}.saving"
    reached("writing")
    try:
        write(staging)
        interrupt.check()  # Ctrl-C while writing: the previous model stays current
    except BaseException:
        if is_primary:
            shutil.rmtree(staging, ignore_errors=True)  # only this save's: the folder is locked
        raise
    reached("written")
    if is_primary:
        os.rename(staging, target / name)
        _fsync_dir(target)
        reached("renamed")
        _write_pointer(target, name)
        reached("switched")
        _remove_leftovers(target, older_than=name)
        reached("cleaned")


def _layout(folder: Path) -> str | None:
    """``"versioned"`` (CURRENT + versions), ``"legacy"`` (orbax checkpoint at the folder) or
    None (not a patchcore-jax checkpoint)."""
    if (folder / POINTER).is_file():
        return "versioned"
    if (folder / RECORD).is_dir():
        return "legacy"
    return None


def current_version(folder: Path) -> str | None:
    """The version ``CURRENT`` names, or None if there is no pointer. CheckpointError naming
    the file if it names none (empty, binary garbage, unreadable)."""
    pointer = folder / POINTER
    try:
        content = pointer.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise CheckpointError(f"{pointer} cannot be read: {error.strerror}") from None
    name = content.decode("utf-8", errors="replace").strip()
    if not VERSION.fullmatch(name):
        raise CheckpointError(
            f"{pointer} is damaged: expected the name of a version folder (v000001 ...), found "
            f"{content[:40]!r}; restore it, or remove the folder"
        )
    return name


def _write_pointer(folder: Path, name: str) -> None:
    """Replaces ``CURRENT`` atomically (and durably: fsync of the file and the folder)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{POINTER}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(name + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, folder / POINTER)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _is_leftover(entry: Path) -> bool:
    """Whether ``entry`` is something an interrupted save wrote (a version or staging folder,
    a pointer temporary): a folder holding only these is an unfinished first save."""
    name = entry.name
    return bool(
        VERSION.fullmatch(name)
        or (name.startswith(".v") and ".saving" in name)
        or (name.startswith(f".{POINTER}.") and name.endswith(".tmp"))
    )


def _remove_leftovers(folder: Path, older_than: str | None = None) -> None:
    """Deletes what earlier saves wrote and no longer need: every version but the current one,
    staging folders, pointer temporaries, and a legacy checkpoint once a pointer replaced it;
    with ``older_than`` (the version a save just made current) only the versions older than it
    and a legacy checkpoint, so a writer never deletes another's newer version. Nothing else is
    touched."""
    current = current_version(folder)
    for entry in folder.iterdir():
        if older_than is not None:
            stale = VERSION.fullmatch(entry.name) is not None and entry.name < older_than
        else:
            stale = _is_leftover(entry) and entry.name != current
        ours = stale or (current is not None and entry.name in LEGACY)
        if not ours:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def resolve(target: Path) -> Path:
    """The orbax checkpoint folder holding the model saved at ``target``."""
    if not target.is_dir():
        leftovers = sorted(target.parent.glob(f".{target.name}.previous"))
        hint = f"; an interrupted save left {leftovers[0]}" if leftovers else ""
        raise CheckpointError(f"no checkpoint at {target}{hint}")
    layout = _layout(target)
    if layout == "legacy":
        return target
    if layout is None:
        unfinished = any(map(_is_leftover, target.iterdir()))
        hint = "; a save was interrupted before it finished: fit again" if unfinished else ""
        raise CheckpointError(f"no checkpoint at {target} (no {POINTER} file){hint}")
    version = target / current_version(target)
    if not version.is_dir():
        raise CheckpointError(
            f"{target} is damaged: {POINTER} names {version.name}, which does not exist"
        )
    return version


def barrier(name: str) -> None:
    """Waits for every process (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
