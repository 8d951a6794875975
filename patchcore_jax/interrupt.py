"""Ctrl-C as a request to stop at the next safe point, for the command line's long runs.

A KeyboardInterrupt raised wherever the signal happens to land (inside a JAX callback, a garbage
collection, a device wait) can be swallowed there, or end the process in a half-torn state. So
the command line installs ``handling_sigint`` for its commands: the first Ctrl-C only sets a
flag (and restores the default action, so a second Ctrl-C ends the process at once), and the
long loops call ``check`` at their host boundaries (between batches of images, between chunks
of greedy coreset steps, between phases, before anything is saved), which raises
``Interrupted`` there. ``check`` tests a flag: no device wait or host round-trip is added.

Importing this module changes nothing: without ``handling_sigint`` (a library user) the flag is
never set, ``check`` never raises, and Ctrl-C raises KeyboardInterrupt as Python's default does.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Interrupted(KeyboardInterrupt):
    """The run was stopped by Ctrl-C at a safe point (``check``), before saving anything. A
    KeyboardInterrupt, so ``except Exception`` clauses never take it for a failure."""


_requested = threading.Event()


def requested() -> bool:
    """Whether Ctrl-C was pressed inside ``handling_sigint``."""
    return _requested.is_set()


def check() -> None:
    """Raises ``Interrupted`` if Ctrl-C was pressed inside ``handling_sigint`` (a flag test)."""
    if _requested.is_set():
        raise Interrupted("interrupted")


def _request(signum: int, frame: object) -> None:
    _requested.set()
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once


@contextlib.contextmanager
def handling_sigint() -> Iterator[None]:
    """Within: the first SIGINT sets the flag ``check`` raises on, then SIGINT gets its
    default action (terminate). The previous handler and a clear flag are restored on exit.
    Outside the main thread (where signals cannot be handled) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    _requested.clear()
    signal.signal(signal.SIGINT, _request)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested.clear()
