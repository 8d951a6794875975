"""The errors patchcore-jax raises on purpose, which the command line reports in one line.

Bad input and failed reads or writes are ``ValueError`` (``CheckpointError``,
``ImageLoadError`` of ``preprocess`` among them) and ``OSError``, each with a message that names
the file or option and what was expected; a missing optional dependency is
``MissingDependencyError``. ``USER_ERRORS`` is that set: ``cli.main`` prints them as
``patchcore-jax: error: <first line>`` (exit 2), and any other exception (a bug) keeps its
traceback. Ctrl-C is ``interrupt.Interrupted`` (exit 130).
"""

from __future__ import annotations

import os
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not match what the caller loads it with."""


class MissingDependencyError(ImportError):
    """An optional package a call needs is not installed; the message says what to install."""


class ImageLoadError(ValueError):
    """An image or mask file cannot be read; ``path`` names it, ``reason`` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self) -> tuple:
        """Pickled by path and reason: raised in a worker process, re-raised here the same."""
        return type(self), (self.path, self.reason)


class ImageNotFoundError(ImageLoadError, FileNotFoundError):
    """The image or mask file does not exist (also a ``FileNotFoundError``)."""


USER_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError, MissingDependencyError)
