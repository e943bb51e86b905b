"""The robot's status line: one line cut to the terminal, redrawn in place; plain lines in a log."""

from __future__ import annotations

import io

import pytest

from runtime.robot.control_loop import LoopStatus
from runtime.robot.episodes import Tally
from runtime.robot.status_line import StatusLine, format_status
from runtime.robot.virtual_time import VirtualClock

MODEL = "pi05_demo: trained demo policy"
SUBTASK = "move the green block to the black plate at 2"  # the demo task's longest


class FakeStream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def busy_status(**changes) -> LoopStatus:
    """A status with every field in use, the longest subtask and an outage on: the longest line."""
    st = LoopStatus(
        step=500, subtask=SUBTASK, refresh_count=123, last_delay_ms=1234.5, depth=28, achieved_hz=49.97,
        underruns=7, outages=3, outage_s=12.5, in_outage=True,
    )  # fmt: skip
    for name, value in changes.items():
        setattr(st, name, value)
    return st


def draws(text: str) -> list[str]:
    """What each redraw put on the terminal's line: the text after each carriage return, without
    the clear-to-end-of-line."""
    return [part.removesuffix("\x1b[K") for part in text.split("\r")[1:]]


@pytest.mark.parametrize("columns", [80, 200])
def test_on_a_terminal_each_update_redraws_one_line_that_fits(columns):
    clock = VirtualClock()
    out = FakeStream(tty=True)
    line = StatusLine(MODEL, out, rate_hz=4.0, clock=clock, columns=lambda: columns)
    for step in range(200):  # 4 s of a 50 Hz loop: 4 updates a second at most
        line(busy_status(step=step, underruns=step // 50), Tally(12, 9))
        clock.advance(0.02)
    line.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # only the final newline: every update in place
    shown = draws(text.removesuffix("\n"))
    assert len(shown) == 16
    assert all(len(s) <= columns - 1 for s in shown)  # never wraps, not even at the last column
    assert text.count("\x1b[K") == 16  # each redraw clears what a longer line before left
    # The most important fields come first and stay whole.
    assert all(s.startswith(f"{MODEL} | NO SERVER (safe action) | episode 12 (9 done)") for s in shown)
    if columns == 200:
        assert f"{SUBTASK!r} | underruns 3 | latency 1234 ms" in shown[-1]
    else:  # the rest left out: too little room for the subtask to be read
        assert shown[-1] == f"{MODEL} | NO SERVER (safe action) | episode 12 (9 done)"


def test_at_80_columns_a_short_subtask_shows_whole():
    out = FakeStream(tty=True)
    StatusLine(MODEL, out, columns=lambda: 80)(busy_status(subtask="grasp the red block", in_outage=False), Tally(3, 2))
    (shown,) = draws(out.getvalue())
    assert shown == f"{MODEL} | episode 3 (2 done) | 'grasp the red block'"


def test_the_terminals_width_is_read_at_each_redraw():
    clock = VirtualClock()
    out = FakeStream(tty=True)
    widths = iter([200, 80])
    line = StatusLine(MODEL, out, clock=clock, columns=lambda: next(widths))
    line(busy_status(in_outage=False, outages=0))
    clock.advance(1.0)
    line(busy_status(in_outage=False, outages=0))
    first, second = draws(out.getvalue())
    assert len(first) > 80 and len(second) == 79  # the terminal was made narrower


def test_not_on_a_terminal_a_plain_line_every_few_seconds():
    clock = VirtualClock()
    out = FakeStream(tty=False)
    line = StatusLine(MODEL, out, log_every_s=5.0, clock=clock, columns=lambda: 80)
    for step in range(1000):  # 20 s at 50 Hz
        line(busy_status(step=step), Tally(3, 2))
        clock.advance(0.02)
    line.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert len(lines) == 4  # at 0, 5, 10 and 15 s
    assert all(s.startswith(f"{MODEL} | NO SERVER (safe action) | episode 3 (2 done) | {SUBTASK!r}") for s in lines)
    # A log has no width: the line is whole.
    assert lines[0] == format_status(MODEL, busy_status(), Tally(3, 2)) and "outages 3 (12.5 s)" in lines[0]


def test_a_line_narrower_than_its_first_field_is_cut_not_wrapped():
    assert format_status(MODEL, LoopStatus(), width=12) == "pi05_demo..."
    assert format_status("m", LoopStatus(), width=200) == (
        "m | no subtask yet | underruns 0 | latency - | buffer 0 | 0.0 Hz | refresh 0"
    )
