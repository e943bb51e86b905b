"""The log setup of the processes that read peers' input (the policy server, the broker, the gateways).

A robot id, a key or a topic is text a peer chose; logged as it is, a newline in it starts a line that
looks like the server's own and an escape sequence rewrites the operator's terminal. The call sites
quote such text (`%r`); this formatter is the net under them: every control character left in a
record's message is written as an escape (`\\n`, `\\x1b`), so one record is always one line of
printable text. Tracebacks keep their lines: they come from the server's own code.
"""

from __future__ import annotations

import logging
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


class OneLineFormatter(logging.Formatter):
    """A `logging.Formatter` whose records' messages cannot hold a control character."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _CONTROL.sub(_escape, record.message)
        return super().formatMessage(record)


def configure(level: str | int, fmt: str) -> None:
    """`logging.basicConfig(level, format)`, with `OneLineFormatter` on its handler."""
    logging.basicConfig(level=level, format=fmt)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(OneLineFormatter(fmt))
