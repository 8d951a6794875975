"""How image files are read: in threads of this process, or in worker processes.

``ImageReader`` carries the choice (``workers``; ``cache_dir``, the decoded-crop cache of
``crop_cache``) and counts what was decoded and what the cache answered; ``ImageReader.map``
runs a function over items and yields the results in the items' order, with a bounded number in
flight. ``preprocess`` gives it the one function the workers run (``preprocess.read_image``).

Worker processes are started with ``spawn`` (JAX's threads make ``fork`` unsafe) and import
only that function's modules, none of which imports jax. One pool per worker count lives as long
as the process: the image check, the fit and the scoring of a run, and the runs of one Python
session, pay the start-up once. The order and the bits of the results do not depend on
``workers``.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from patchcore_jax.files import check_writable_folder

_POOLS: dict[int, ProcessPoolExecutor] = {}


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers() -> int:
    """Worker processes of the command line's ``--workers``: one per available CPU but the main
    process's, at most 8; 0 (threads) below 4 CPUs, where the main process's threads read
    faster than worker processes (``benchmarks/results/input_pipeline.md``)."""
    cpus = available_cpus()
    return 0 if cpus < 4 else min(8, cpus - 1)


@dataclass
class ImageReader:
    """How image files become crops, and what that took.

    ``workers``: processes that decode, resize and crop (0: threads of this process). Library
    workflows default to 0: a script that starts workers must guard its work with
    ``if __name__ == "__main__":`` (``spawn`` imports the main script in each worker).
    ``cache_dir``: folder of the decoded-crop cache (``crop_cache``; None: no cache); it must be
    writable (created on first use). ``decoded`` and ``from_cache`` count the images decoded
    from their files and those the cache answered, over every read of this reader.
    """

    workers: int = 0
    cache_dir: str | os.PathLike | None = None
    decoded: int = 0
    from_cache: int = 0

    def __post_init__(self) -> None:
        workers = self.workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(
                f"workers must be a whole number >= 0 (0: threads of this process), got {workers!r}"
            )
        if self.cache_dir is not None:
            self.cache_dir = check_writable_folder(self.cache_dir, "--cache-dir")

    def map(
        self,
        function: Callable[[Any], Any],
        items: Iterable[Any],
        *,
        in_flight: int,
        threads: int | None = None,
    ) -> Iterator[Any]:
        """``function(item)`` of each item, in order; at most ``in_flight`` results are computed
        ahead of the one yielded. With ``workers`` in worker processes (``function`` must be a
        module-level function or a ``functools.partial`` of one); else on ``threads`` threads
        (default ``min(8, cpu_count)``; 1: in turn, here). An error raised by ``function``
        reaches the caller as it was raised."""
        if self.workers:
            pool = _process_pool(self.workers)
            try:
                yield from _ordered(pool, function, items, max(in_flight, 1))
            except BrokenProcessPool:
                _POOLS.pop(self.workers, None)  # a worker died (killed): start afresh next time
                raise
            return
        threads = min(8, os.cpu_count() or 1) if threads is None else threads
        if threads <= 1:
            yield from map(function, items)
            return
        with ThreadPoolExecutor(max_workers=threads) as pool:
            yield from _ordered(pool, function, items, max(in_flight, 1))

    def count(self, decoded: bool) -> None:
        """Counts one image read: decoded from its file, or answered by the cache."""
        if decoded:
            self.decoded += 1
        else:
            self.from_cache += 1

    def describe(self) -> str:
        """``crops: 83 from cache, 0 decoded``: the log line of a run with a cache."""
        cached = f"{self.from_cache} from cache, {self.decoded} decoded"
        return f"crops: {cached} (cache {self.cache_dir})"


def log_counts(reader: ImageReader | None, log: Callable[[str], None]) -> None:
    """``log(reader.describe())`` when ``reader`` has a cache (without one, every image is
    decoded: nothing to say)."""
    if reader is not None and reader.cache_dir is not None:
        log(reader.describe())


def _process_pool(workers: int) -> ProcessPoolExecutor:
    pool = _POOLS.get(workers)
    if pool is None:
        context = multiprocessing.get_context("spawn")
        # Ctrl-C reaches the terminal's whole process group: the workers ignore it, and this
        # process stops at its next safe point (``interrupt``) with its pool whole.
        ignore_ctrl_c = (signal.SIGINT, signal.SIG_IGN)
        pool = ProcessPoolExecutor(
            workers, mp_context=context, initializer=signal.signal, initargs=ignore_ctrl_c
        )
        _POOLS[workers] = pool
    return pool


def _ordered(
    pool: Executor, function: Callable[[Any], Any], items: Iterable[Any], in_flight: int
) -> Iterator[Any]:
    """Results of ``pool`` in the order of ``items``, ``in_flight`` submitted ahead; the ones
    not yet started are cancelled when the caller stops early (or on an error)."""
    items = iter(items)
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= in_flight:
                break
        while pending:
            result = pending.popleft().result()
            for item in items:
                pending.append(pool.submit(function, item))
                break
            yield result
    finally:
        for future in pending:
            future.cancel()
