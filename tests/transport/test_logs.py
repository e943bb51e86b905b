"""The log formats: `--log-format json` gives one JSON object a line for every process of a server
(its gateways too), and neither format lets peer text break a record into several lines."""

from __future__ import annotations

import json
import logging
import sys

from tests.support.server_process import ServerProcess
from transport.logs import JsonFormatter, OneLineFormatter

PEER_TEXT = "robot\nFAKE 2026 ERROR forged\u2028line\x1b[2J"


def _record(message: str, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("runtime.test", logging.WARNING, __file__, 1, "peer %r said %s", ("id", message), exc_info)


def test_a_json_record_is_one_line_whatever_the_peer_sent():
    line = JsonFormatter("server").format(_record(PEER_TEXT))
    assert "\n" not in line and "\u2028" not in line and "\x1b" not in line
    entry = json.loads(line)
    assert entry["message"] == f"peer 'id' said {PEER_TEXT}"
    assert (entry["level"], entry["logger"], entry["role"]) == ("WARNING", "runtime.test", "server")
    assert entry["time"].endswith("+00:00")


def test_a_json_traceback_stays_inside_its_record():
    try:
        raise ValueError("boom")
    except ValueError:
        line = JsonFormatter().format(_record("x", sys.exc_info()))
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exception"]


def test_a_text_record_is_one_line_whatever_the_peer_sent():
    formatter = OneLineFormatter("%(levelname)s %(message)s")
    assert formatter.format(_record(PEER_TEXT)).count("\n") == 0


def test_every_line_of_a_server_and_its_gateways_is_json():
    with ServerProcess("--fixed-reply", "--log-format", "json") as srv:
        pass
    entries = [json.loads(line) for line in srv.lines if line.strip()]
    roles = {entry.get("role") for entry in entries}
    assert {"server", "json gateway", "openpi gateway"} <= roles, roles
    assert any(entry["message"].startswith("ready (server)") for entry in entries)
