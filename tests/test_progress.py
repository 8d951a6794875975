"""progress.py: one stage shown at a time, messages above its bar, honest seconds, plain lines
off a terminal, counts of finished device work."""

import io
import re
import time

import jax.numpy as jnp
import pytest

from patchcore_jax import progress
from patchcore_jax.progress import ProgressBars


def visible_lines(text: str) -> list[str]:
    """What a terminal keeps of each finished line: the part after its last ``\\r``."""
    return [line.split("\r")[-1].rstrip() for line in text.split("\n")[:-1]]


def test_one_bar_at_a_time_with_messages_above_it():
    """An ensemble's stages interleave (features of member 1, its coreset, features of member
    2): tqdm kept both bars open, one line apart, with cursor-up escapes between them and
    messages printed across them. Each stage's line ends before the next one starts, and a
    message is a whole line of its own."""
    stream = io.StringIO()
    bars = ProgressBars(False, stream=stream, interactive=True, interval=60.0)
    bars("features", 0, 4)
    bars("features", 2, 4)
    progress.say("memory bank: subsampling", stream)
    bars("coreset", 0, 10)
    bars("coreset", 10, 10)
    bars("features", 0, 4)
    bars("features", 2, 4)
    progress.say("after the last stage", stream)
    progress.close_bars()
    text = stream.getvalue()
    assert "\x1b" not in text
    lines = visible_lines(text)
    assert lines[0] == "memory bank: subsampling"
    assert [line.split(":")[0] for line in lines[1:3]] == ["features", "coreset"]
    assert "2/4" in lines[1] and "10/10" in lines[2]
    assert lines[3].startswith("features") and "4/4" in lines[3]
    assert lines[4] == "after the last stage" and len(lines) == 5
    # Every redraw replaces the whole line: one stage's bar per line, never two.
    for line in text.split("\n"):
        drawn = [part for part in line.split("\r") if part.strip()]
        assert len({part.split(":")[0] for part in drawn if "|" in part}) <= 1, line


def test_plain_lines_give_each_stage_its_own_seconds():
    """Off a terminal: a start line, a line every ``interval``, an end line with count,
    seconds and rate; a stage that comes back goes on from its count and seconds; a stage
    stopped by an error says where it stopped."""
    stream = io.StringIO()
    bars = ProgressBars(False, stream=stream, interval=0.0)
    start = time.perf_counter()
    bars("features", 0, 4)
    time.sleep(0.2)
    bars("features", 2, 4)
    bars("coreset", 0, 8)  # ends the features' first showing
    time.sleep(0.1)
    bars("coreset", 8, 8)
    bars("features", 0, 4)
    bars("features", 2, 4)
    bars("scoring", 0, 6)
    bars("scoring", 1, 6)
    progress.close_bars()
    wall = time.perf_counter() - start
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == "features: started, 0/4 images"
    assert any(line.startswith("features: 2/4 images after ") for line in lines)  # interval 0
    assert "features: resumed at 2/4 images" in lines
    ends = {}
    for line in lines:
        match = re.fullmatch(r"(\w+): (\d+)/(\d+) \w+ (in|stopped after) ([\d.]+) s.*", line)
        if match:
            ends.setdefault(match[1], []).append((int(match[2]), match[4], float(match[5])))
    # Seconds are printed to 0.1 s: within 0.05 s of the sleeps, and of the wall clock.
    (first, second) = ends["features"]
    assert first[:2] == (2, "in") and first[2] >= 0.2 - 0.05
    assert second[:2] == (4, "in") and second[2] >= first[2]
    ((steps, word, coreset_seconds),) = ends["coreset"]
    assert (steps, word) == (8, "in") and coreset_seconds >= 0.1 - 0.05
    assert ends["scoring"] == [(1, "stopped after", pytest.approx(0.0, abs=0.05 + wall))]
    assert second[2] + coreset_seconds <= wall + 0.1
    assert bars.elapsed("features") + bars.elapsed("coreset") <= wall


def test_a_stage_stopped_before_any_count_leaves_a_bad_input_error_one_line():
    """``export`` checks its arguments inside its phase: a refusal writes no progress line."""
    stream = io.StringIO()
    with pytest.raises(ValueError), progress.phase(ProgressBars(False, stream=stream), "export"):
        raise ValueError("bad --out")
    progress.close_bars()
    assert stream.getvalue() == ""
    with progress.phase(ProgressBars(False, stream=stream), "export"):
        pass
    assert re.fullmatch(r"export: done in [\d.]+ s\n", stream.getvalue())


def test_report_done_counts_a_batch_once_it_is_computed_one_in_flight():
    """The fit's features stage counted batches when they were queued on the devices, so it
    ended before the work did (its seconds went to the next stage)."""
    events = []

    def batches():
        for index in range(3):
            events.append(f"queued {index}")
            yield jnp.full((2, 3), index), 2

    for array, _ in progress.report_done(batches(), events.append):
        events.append(f"used {int(array[0, 0])}")
    assert events == [
        "queued 0", "used 0", "queued 1", "used 1", 2, "queued 2", "used 2", 2, 2
    ]  # fmt: skip
