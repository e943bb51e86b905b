"""The robot's live status: one line that fits the terminal, or a plain log line when there is none.

On a terminal the line is redrawn in place (`\\r`, then clear to the end of the line) a few times a
second, cut to the terminal's width: a line that wraps cannot be redrawn, and leaves a new line on
screen per update. Written to a file or a pipe, carriage returns would pile every update onto one
enormous line, so there it is a plain line every few seconds. The fields that matter most come
first (the model, the episodes, the subtask, the underruns), so a narrow terminal cuts the rest.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

from runtime.robot.control_loop import LoopStatus
from runtime.robot.episodes import Tally

_CLEAR_TO_END = "\x1b[K"
_ELLIPSIS = "..."
_MIN_CUT = 6  # characters of a cut field worth showing


def format_status(model: str, st: LoopStatus, episodes: Tally | None = None, width: int | None = None) -> str:
    """One line, most important first; at most `width` characters when given (a field that does
    not fit is cut, with "...", or left out)."""
    fields = [model]
    if st.in_outage:
        fields.append("NO SERVER (safe action)")
    if episodes is not None:
        fields.append(f"episode {episodes.started} ({episodes.succeeded} done)")
    fields.append(repr(st.subtask) if st.subtask else "no subtask yet")
    fields.append(f"underruns {st.underruns}")
    fields.append("latency -" if st.last_delay_ms is None else f"latency {st.last_delay_ms:.0f} ms")
    fields += [f"buffer {st.depth}", f"{st.achieved_hz:.1f} Hz", f"refresh {st.refresh_count}"]
    if st.outages:
        fields.append(f"outages {st.outages} ({st.outage_s:.1f} s)")
    line = " | ".join(fields)
    if width is None or len(line) <= width:
        return line
    # Whole fields while they fit; the next is cut, where enough of it shows to be read.
    shown = fields[0]
    for field in fields[1:]:
        joined = f"{shown} | {field}"
        if len(joined) > width:
            if width - len(shown) >= len(" | ") + _MIN_CUT + len(_ELLIPSIS):
                shown = joined[: width - len(_ELLIPSIS)] + _ELLIPSIS
            break
        shown = joined
    return shown if len(shown) <= width else shown[: max(width - len(_ELLIPSIS), 0)] + _ELLIPSIS


def terminal_columns() -> int:
    return shutil.get_terminal_size().columns


class StatusLine:
    """Writes the status to `out`: redrawn in place at most `rate_hz` times a second on a terminal,
    one plain line every `log_every_s` otherwise. `clock` and `columns` are injectable for tests."""

    def __init__(
        self,
        model: str,
        out: TextIO = sys.stderr,
        rate_hz: float = 4.0,
        log_every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        columns: Callable[[], int] = terminal_columns,
    ):
        self.model = model
        self._out = out
        self._tty = out.isatty()
        self._period = 1.0 / rate_hz if self._tty else log_every_s
        self._clock = clock
        self._columns = columns
        self._last: float | None = None
        self._drawn = False

    def __call__(self, st: LoopStatus, episodes: Tally | None = None) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < self._period:
            return
        self._last = now
        if self._tty:
            # One column spare: a line that fills the last column wraps on some terminals.
            line = format_status(self.model, st, episodes, max(self._columns() - 1, 1))
            self._out.write(f"\r{line}{_CLEAR_TO_END}")
            self._drawn = True
        else:
            self._out.write(format_status(self.model, st, episodes) + "\n")
        self._out.flush()

    def close(self) -> None:
        """Ends the redrawn line, so that what follows starts on a line of its own."""
        if self._drawn:
            self._out.write("\n")
            self._out.flush()
            self._drawn = False
