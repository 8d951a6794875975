"""Progress reports: the workflows' ``progress(stage, count, total)`` and how it is shown.

A workflow reports ``progress(stage, count, total)``: ``count`` more items (images, or coreset
steps) of ``total`` done in ``stage``; ``count`` 0 marks a stage's start, before its first
work, so that its clock starts there. A phase without counts (``phase``: export, saving) is
reported as ``(stage, 0, 1)`` then ``(stage, 1, 1)``.

``ProgressBars`` shows one stage at a time on stderr: a stage ends when its counts reach
``total`` or another stage reports (an ensemble's members run features, coreset and calibration
in turn: a stage that comes back goes on from its count and seconds). Its seconds are those
while it is the shown stage, so elapsed times and rates are its own work's. On a terminal the
stage is one line redrawn in place and messages (``say``) are written above it; anywhere else
(a file, a pipe, a CI log) every line is plain text without ``\\r`` or escape codes: one when a
stage starts, one when it ends (count, seconds, rate, seconds spent compiling), and one every
``interval`` seconds in between.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]
Item = TypeVar("Item")

UNITS = {"coreset": "steps"}  # by a stage's last word (the benchmark prefixes a category);
# other stages count images
BAR_UNITS = {"images": "img", "steps": "step"}
PHASES = ("export",)  # stages without counts (``phase``)
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_ACTIVE: list[ProgressBars] = []  # shown by ``say``, ended by ``close_bars``


def no_progress(stage: str, count: int, total: int) -> None:
    """The default ``progress``: reports nothing."""


def no_log(message: str) -> None:
    """The default ``log``: reports nothing."""


def stage_counter(progress: Progress, stage: str, total: int) -> Callable[[int], None]:
    """``progress`` of one stage as a ``count`` callback (what ``PatchCore.fit`` & co. take)."""
    return lambda count: progress(stage, count, total)


def counted(batches: Iterable[Item], progress: Progress, stage: str, total: int) -> Iterator[Item]:
    """Passes ``batches`` through, reporting ``stage``'s start, then each batch's length."""
    progress(stage, 0, total)
    for batch in batches:
        yield batch
        progress(stage, len(batch), total)  # type: ignore[arg-type]


def report_done(
    batches: Iterable[tuple[Any, int]], progress: Callable[[int], None] | None
) -> Iterator[tuple[Any, int]]:
    """Passes ``(device array, count)`` pairs through; ``progress`` gets each count once its
    array is computed (waited for after the next pair is taken: one batch in
    flight), so that a stage's counts and seconds are those of finished work, not of work
    queued on the devices."""
    if progress is None:
        yield from batches
        return
    import jax

    def report(pending: tuple[Any, int] | None) -> None:
        if pending is not None:
            jax.block_until_ready(pending[0])
            progress(pending[1])

    pending: tuple[Any, int] | None = None
    for array, count in batches:
        yield array, count
        report(pending)
        pending = (array, count)
    report(pending)


@contextlib.contextmanager
def phase(progress: Progress, stage: str) -> Iterator[None]:
    """Reports the block as ``stage``, a phase without counts: ``(stage, 0, 1)`` on entry,
    ``(stage, 1, 1)`` when it ends without an error."""
    progress(stage, 0, 1)
    yield
    progress(stage, 1, 1)


@contextlib.contextmanager
def compile_time() -> Iterator[list[float]]:
    """Collects the seconds JAX spends compiling inside the block (``[total]``)."""
    from jax import monitoring

    total = [0.0]

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event == BACKEND_COMPILE_EVENT:
            total[0] += duration

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield total
    finally:
        monitoring.unregister_event_duration_listener(listener)


def say(message: str, stream: TextIO | None = None) -> None:
    """Writes a one-line message to ``stream`` (default stderr), above the shown stage's bar
    if one is drawn there (a message never breaks a bar's line)."""
    stream = sys.stderr if stream is None else stream
    for bars in _ACTIVE:
        if bars.stream is stream:
            bars.write(message)
            return
    print(message, file=stream, flush=True)


def close_bars() -> None:
    """Ends the stage a stopped run left shown (its line says where it stopped), so that a
    message written next starts on a line of its own."""
    while _ACTIVE:
        _ACTIVE[-1].close()


class ProgressBars:
    """``progress(stage, count, total)`` shown on ``stream`` (default stderr), one stage at a
    time; ``quiet``: nothing. ``interactive`` (default: whether ``stream`` is a terminal)
    redraws one line in place; otherwise plain lines, one every ``interval`` seconds while a
    stage runs. ``close`` ends the shown stage."""

    def __init__(
        self,
        quiet: bool,
        *,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        interval: float = 30.0,
    ) -> None:
        self.quiet = quiet
        self.stream = sys.stderr if stream is None else stream
        if interactive is None:
            interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interactive = interactive
        self.interval = interval
        self.stage: str | None = None  # the shown stage
        # Per stage: items done, total, seconds and compile seconds of its earlier showings.
        self.done: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.compile_seconds: dict[str, float] = {}
        self._lock = threading.RLock()
        self._shown_at = self._line_at = self._drawn_at = 0.0
        self._compiled = [0.0]  # compile seconds since the first stage (``compile_time``)
        self._compiled_at = 0.0  # ... when the shown stage was shown
        self._drawn = 0  # characters of the bar's line on a terminal (0: none drawn)
        self._lines = 0  # plain lines written for the shown stage
        self._stopped = threading.Event()
        self._compiling: contextlib.ExitStack | None = None

    def __call__(self, stage: str, count: int, total: int) -> None:
        if self.quiet:
            return
        with self._lock:
            self.totals[stage] = total
            if stage != self.stage:
                self._end()
                self._show(stage)
            self.done[stage] += count
            if self.done[stage] >= total:
                self._end()
            elif self.interactive:
                self._draw(throttle=True)
            elif self.interval <= time.perf_counter() - self._line_at:
                self._print(self._status())

    def write(self, message: str) -> None:
        """``message`` on a line of its own, above the bar (drawn again below it)."""
        with self._lock:
            if self._drawn:
                self.stream.write("\r" + " " * self._drawn + "\r")
                self._drawn = 0
            self.stream.write(message + "\n")
            if self.stage is not None and self.interactive:
                self._draw()
            self.stream.flush()

    def close(self) -> None:
        """Ends the shown stage (its line says where it stopped) and the timers behind it."""
        with self._lock:
            self._end(stopped=True)
            self._stopped.set()
            if self._compiling is not None:
                self._compiling.close()
                self._compiling = None
            if self in _ACTIVE:
                _ACTIVE.remove(self)

    def elapsed(self, stage: str) -> float:
        """Seconds ``stage`` has been the shown stage, in all."""
        shown = time.perf_counter() - self._shown_at if stage == self.stage else 0.0
        return self.seconds.get(stage, 0.0) + shown

    def compiling(self, stage: str) -> float:
        """Seconds JAX spent compiling while ``stage`` was the shown stage, in all."""
        shown = self._compiled[0] - self._compiled_at if stage == self.stage else 0.0
        return self.compile_seconds.get(stage, 0.0) + shown

    # ------------------------------------------------------------------ stages

    def _show(self, stage: str) -> None:
        """Makes ``stage`` the shown one; its clock runs from now."""
        if self not in _ACTIVE:
            _ACTIVE.append(self)
            self._start_timers()
        resumed = stage in self.done
        self.stage = stage
        self._shown_at = self._line_at = time.perf_counter()
        self._compiled_at = self._compiled[0]
        for record, zero in ((self.done, 0), (self.seconds, 0.0), (self.compile_seconds, 0.0)):
            record.setdefault(stage, zero)
        self._lines = 0  # plain lines written for this showing
        if self.interactive:
            self._draw()
        elif not _is_phase(stage):  # a phase's first line is its end (or ``interval`` later)
            self._print(f"{stage}: {'resumed at' if resumed else 'started,'} {self._count(stage)}")

    def _end(self, stopped: bool = False) -> None:
        """Ends the shown stage: its seconds are added up and its last line is written; one
        ``stopped`` (by an error or Ctrl-C) before any count leaves no line if none was shown
        yet (a bad input's error stays one line)."""
        stage = self.stage
        if stage is None:
            return
        stopped = stopped and self.done[stage] < self.totals[stage]
        if self.interactive and stopped and not self.done[stage]:
            self.stream.write("\r" + " " * self._drawn + "\r")
        elif self.interactive:
            self._draw()
            self.stream.write("\n")
        elif self._lines or not stopped:
            self._print(self._status(final="stopped after" if stopped else "in"))
        self.stream.flush()
        self._drawn = 0
        self.seconds[stage] = self.elapsed(stage)
        self.compile_seconds[stage] = self.compiling(stage)
        self.stage = None

    def _count(self, stage: str) -> str:
        return f"{self.done[stage]}/{self.totals[stage]} {_unit(stage)}"

    def _status(self, final: str = "") -> str:
        """The shown stage as a plain line, e.g. ``features: 12/24 images in 3.0 s (4 images/s;
        1.2 s compiling)``; ``final``: ``in`` (ended) or ``stopped after``, else running."""
        stage = self.stage
        elapsed, compiling = self.elapsed(stage), self.compiling(stage)
        notes = [f"{compiling:.1f} s compiling"] if compiling >= 0.05 else []
        if _is_phase(stage):
            when = {"": "running for", "in": "done in"}.get(final, final)
            text = f"{stage}: {when} {elapsed:.1f} s"
        else:
            if elapsed > 0 and self.done[stage]:
                notes.insert(0, f"{self.done[stage] / elapsed:.3g} {_unit(stage)}/s")
            text = f"{stage}: {self._count(stage)} {final or 'after'} {elapsed:.1f} s"
        return text + (f" ({'; '.join(notes)})" if notes else "")

    # ------------------------------------------------------------------ output

    def _print(self, line: str) -> None:
        self._line_at, self._lines = time.perf_counter(), self._lines + 1
        self.stream.write(line + "\n")
        self.stream.flush()

    def _draw(self, throttle: bool = False) -> None:
        """Redraws the bar's line in place (at most 10 times a second with ``throttle``)."""
        now = time.perf_counter()
        if throttle and now - self._drawn_at < 0.1:
            return
        from tqdm import tqdm

        stage = self.stage
        elapsed, compiling = self.elapsed(stage), self.compiling(stage)
        width = shutil.get_terminal_size((80, 24)).columns - 1
        postfix = f"{compiling:.1f} s compiling" if compiling >= 0.05 else None
        if _is_phase(stage):
            line = f"{stage}: {tqdm.format_interval(elapsed)}{f' ({postfix})' if postfix else ''}"
        else:
            done, unit = self.done[stage], BAR_UNITS[_unit(stage)]
            rate = done / elapsed if elapsed > 0 and done else None
            line = tqdm.format_meter(
                done, self.totals[stage], elapsed, ncols=width, prefix=stage, unit=unit,
                rate=rate, postfix=postfix,
            )  # fmt: skip
        line = line[:width]
        self.stream.write("\r" + line + " " * max(0, self._drawn - len(line)))
        self.stream.flush()
        self._drawn, self._drawn_at = len(line), now

    def _start_timers(self) -> None:
        """The compile-time listener, and the thread that redraws the bar every second (its
        clock moves while a batch compiles) or writes a plain line every ``interval``."""
        self._compiling = contextlib.ExitStack()
        self._compiled = self._compiling.enter_context(compile_time())
        self._stopped = stopped = threading.Event()
        threading.Thread(target=self._tick, args=(stopped,), daemon=True).start()

    def _tick(self, stopped: threading.Event) -> None:
        while not stopped.wait(min(1.0, max(self.interval, 0.01))):
            with self._lock:
                if self.stage is None:
                    continue
                if self.interactive:
                    self._draw()
                elif self.interval <= time.perf_counter() - self._line_at:
                    self._print(self._status())


def _unit(stage: str) -> str:
    """What ``stage`` counts: ``steps`` (the coreset's) or ``images``."""
    return UNITS.get(stage.split()[-1], "images")


def _is_phase(stage: str) -> bool:
    """Whether ``stage`` is a phase without counts (``phase``)."""
    return stage.split()[-1] in PHASES
