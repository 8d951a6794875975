"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import os
import sys
import tempfile
import urllib.request
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Names ``path`` in an OSError raised within that names no file (a full disk, a quota, an
    I/O error while writing report only ``[Errno 28] No space left on device``): it becomes
    ``OSError(errno, "cannot write PATH: reason")``. Errors that name their file pass as they
    are."""
    try:
        yield
    except OSError as error:
        if error.errno is None or error.filename is not None:
            raise
        reason = error.strerror or os.strerror(error.errno)
        raise OSError(error.errno, f"cannot write {path}: {reason}") from error


def unwritable(folder: str | os.PathLike) -> str | None:
    """Why nothing can be created in ``folder`` (None if something can): a real, removed
    probe, so read-only file systems and ACLs are caught whoever runs it (root included)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".patchcore-jax-probe-", dir=folder))
    except OSError as error:
        return error.strerror or type(error).__name__
    return None


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists: where a folder to be created would go."""
    while not path.exists():
        path = path.parent
    return path


def check_writable_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` (absolute) if files can be written in it: a writable folder, or a folder that
    can be created (its nearest existing ancestor is a writable folder; nothing is created
    here). For a folder written into long after it is named (``--spill-dir``): OSError naming
    ``what`` and the path now, not hours later."""
    folder = Path(path).absolute()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{what} {folder} is a file; expected a folder")
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} {folder} cannot be created: {existing} is a file")
    problem = unwritable(existing)
    if problem:
        raise PermissionError(f"{what} {folder}: cannot write in {existing} ({problem})")
    return folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On any exception the temporary file is removed and ``path`` is left untouched; an OSError
    that names no file (a full disk) is reported naming ``path`` (``writing``).
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: folder {target.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
    try:
        with writing(target):
            yield Path(tmp)
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_csv(
    path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[object]]
) -> Path:
    """Writes a CSV file (``header``, then ``rows``) atomically; returns the path."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


# Written into every folder patchcore-jax creates for a run's outputs: readers never take such a
# folder for data, and --overwrite clears only folders that carry it.
OUTPUT_MARKER = ".patchcore-jax-output"
_LOCK_NAME = ".patchcore-jax.lock"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Holds an advisory ``flock`` on ``path`` while the block runs: a lock file (created if
    missing) or a folder itself (which adds no file to it). The lock goes with the process,
    however it ends, so a killed run never leaves a folder locked.

    Raises:
      FileExistsError: "``what`` is in use by another patchcore-jax run" if another run (or
        another thread of this one) holds it.
    """
    import fcntl

    target = Path(path)
    flags = os.O_RDONLY if target.is_dir() else os.O_RDWR | os.O_CREAT
    handle = os.open(target, flags, 0o666)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"{what} is in use by another patchcore-jax run") from None
        except OSError as error:  # NFS locks only files open for writing, never a folder
            if not target.is_dir() or error.errno not in (errno.EBADF, errno.ENOLCK):
                raise
            warnings.warn(
                f"cannot lock {what} on this file system ({error.strerror}): another run "
                "writing into it at the same time would not be detected",
                stacklevel=3,
            )
        yield
    finally:
        os.close(handle)


@contextlib.contextmanager
def output_folder(
    path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False
) -> Iterator[Path]:
    """Holds ``path`` as one run's output folder while the run writes into it.

    The folder is created if missing, marked with ``OUTPUT_MARKER`` and locked (an advisory
    ``flock``, released even when the process is killed): a second run into the same folder
    fails at once instead of mixing its files with this run's. It must be empty, so results of
    different runs never mix; with ``overwrite`` a folder that patchcore-jax wrote before is
    emptied first, and with ``resume`` its contents are kept for a run that continues them (the
    benchmark); a folder holding anything else is never cleared or written into.

    Raises:
      FileExistsError / OSError naming the folder: a file in the way, a folder in use by another
      run, previous results without ``overwrite``, foreign files with ``overwrite``.
    """
    import shutil

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; expected an output folder (--out)")
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder / _LOCK_NAME, f"output folder {folder}"):
        previous = [p for p in folder.iterdir() if p.name not in (_LOCK_NAME, OUTPUT_MARKER)]
        if previous and not (overwrite or resume):
            raise FileExistsError(
                f"output folder {folder} is not empty (e.g. {previous[0].name}); choose a new "
                "folder or pass --overwrite to replace its previous results"
            )
        if previous and not (folder / OUTPUT_MARKER).exists():
            raise FileExistsError(
                f"output folder {folder} holds files that patchcore-jax did not write (e.g. "
                f"{previous[0].name}); refusing to {'write into' if resume else 'clear'} it"
            )
        for entry in [] if resume else previous:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        (folder / OUTPUT_MARKER).touch()
        yield folder


def download_file(url: str, destination: Path, name: str) -> str:
    """Streams ``url`` into ``destination`` with a progress bar; returns the hex sha256.

    Raises OSError naming the URL when it cannot be opened (offline, not found, refused).
    """
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    try:
        response = urllib.request.urlopen(url)
    except (OSError, ValueError) as error:  # URLError (offline, DNS, HTTP 404) is an OSError
        reason = getattr(error, "reason", None) or error
        raise OSError(f"cannot download {url}: {reason}") from error
    with response, writing(destination), open(destination, "wb") as out:
        length = response.headers.get("Content-Length")
        with tqdm(
            total=int(length) if length else None,
            desc=f"downloading {name}",
            unit="B",
            unit_scale=True,
            file=sys.stderr,
        ) as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


def first_line(error: BaseException) -> str:
    """``module.Type: first line`` of an error, short enough for a one-line report."""
    kind, module = type(error).__qualname__, type(error).__module__.split(".")[0]
    kind = kind if module == "builtins" else f"{module.lstrip('_')}.{kind}"
    text = str(error).strip()
    return f"{kind}: {text.splitlines()[0][:200]}" if text else kind


def some_of(items: Sequence[object], limit: int = 3) -> str:
    """The first ``limit`` items as text, and how many more: ``a, b, c and 4 more``."""
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def quantity(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` with its noun, plural unless it is one: ``1 image``, ``0 images``, ``3 images``
    (``plural`` for irregular nouns: ``quantity(2, "category", "categories")``)."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
