"""The errors patchcore-jax raises on purpose, which the command line reports in one line.

Bad input and failed reads or writes are ``ValueError`` (``checkpoint.CheckpointError``,
``preprocess.ImageLoadError`` among them) and ``OSError``, each with a message that names the
file or option and what was expected; a missing optional dependency is
``MissingDependencyError``. ``USER_ERRORS`` is that set: ``cli.main`` prints them as
``patchcore-jax: error: <first line>`` (exit 2), and any other exception (a bug) keeps its
traceback. Ctrl-C is ``interrupt.Interrupted`` (exit 130).
"""

from __future__ import annotations


class MissingDependencyError(ImportError):
    """An optional package a call needs is not installed; the message says what to install."""


USER_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError, MissingDependencyError)
