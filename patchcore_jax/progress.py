"""The workflows' ``progress(stage, count, total)`` shown as progress bars (the command line's)."""

from __future__ import annotations

import sys
from typing import Any

_OPEN: list[Any] = []  # bars opened by any ProgressBars and not closed yet


class ProgressBars:
    """``progress(stage, count, total)`` as one tqdm bar per stage on stderr (``quiet``: none).

    A bar opens at a stage's first report and closes when ``count``s reach its ``total``."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, count: int, total: int) -> None:
        if self.quiet:
            return
        bar = self.bars.get(stage)
        if bar is None:
            from tqdm.auto import tqdm

            unit = "step" if stage.endswith("coreset") else "img"
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr)
            _OPEN.append(bar)
        bar.update(count)
        if bar.n >= total:
            bar.close()
            _OPEN.remove(bar)
            del self.bars[stage]


def close_bars() -> None:
    """Ends the bars a stopped run left open, so that a message written next is not followed
    by their last redraw (tqdm redraws open bars when they are collected)."""
    while _OPEN:
        _OPEN.pop().close()
