"""The log setup of the processes that read peers' input (the policy server, the broker, the gateways,
a robot's loop), as text lines for people or JSON lines for a log shipper (`--log-format json`).

A robot id, a key or a topic is text a peer chose; logged as it is, a newline in it starts a line that
looks like the server's own and an escape sequence rewrites the operator's terminal. The call sites
quote such text (`%r`); the text formatter is the net under them: every control character left in a
record's message is written as an escape (`\\n`, `\\x1b`), so one record is always one line of
printable text. Tracebacks keep their lines: they come from the server's own code. The JSON
formatter gets the same guarantee from JSON's own string escaping: one object a line, a traceback
inside its `exception` field.
"""

from __future__ import annotations

import datetime
import json
import logging
import re

LOG_FORMATS = ("text", "json")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


class OneLineFormatter(logging.Formatter):
    """A `logging.Formatter` whose records' messages cannot hold a control character."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _CONTROL.sub(_escape, record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: `time` (ISO 8601, UTC), `level`, `logger`, `message`, `process` (its
    pid), `role` when given (which process of a fleet wrote it: workers share their front host's
    log), and `exception` with the traceback when there is one."""

    def __init__(self, role: str | None = None):
        super().__init__()
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if self._role:
            entry["role"] = self._role
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # ensure_ascii: U+2028 and every control character escaped, so a record is one line whatever it held
        return json.dumps(entry, ensure_ascii=True, default=str)


def configure(level: str | int, fmt: str, log_format: str = "text", role: str | None = None) -> None:
    """`logging.basicConfig(level)` with `OneLineFormatter(fmt)` on its handler, or `JsonFormatter(role)`
    for `log_format="json"`."""
    logging.basicConfig(level=level)
    formatter = JsonFormatter(role) if log_format == "json" else OneLineFormatter(fmt)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
