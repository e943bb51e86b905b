"""Command-line options declared once, for the policy server, the front host, its workers and the broker.

An `Option` is a flag with its argparse settings and where it applies: on a front host (what robots
reach: ports, keys, gateways), on a worker (the model and its serving), or both. A front host builds
its workers' command line from the parsed values of the options that apply to workers
(`worker_argv`), so a new front-only flag cannot leak to workers, and a new model flag reaches them
without anyone keeping a list. The options both the server and the broker take (CURVE keys,
heartbeat, log level, ready file) are declared here once, with their "these go together" checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from transport.logs import LOG_FORMATS

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class Where(enum.Flag):
    """Where an option applies. A single server (neither front host nor worker) takes all of them."""

    FRONT = enum.auto()  # the front host: what robots reach, and the fleet around the workers
    WORKER = enum.auto()  # set per worker by whoever starts it (`--join`, `--cpus`), never copied
    BOTH = FRONT | WORKER  # the model and its serving: a front host hands its value to its workers


@dataclasses.dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    settings: Mapping[str, Any]
    where: Where = Where.BOTH
    text: Callable[[Any], str] = str  # a parsed value as it is written on a command line again

    @property
    def dest(self) -> str:
        return self.settings.get("dest") or self.flags[0].lstrip("-").replace("-", "_")

    def add_to(self, parser: Any) -> None:
        """Adds it to `parser` (an `ArgumentParser` or one of its argument groups), its help ending
        with its default, so `--help` says what runs when the flag is left out."""
        settings = dict(self.settings)
        default = settings.get("default")
        unset = default is None or default is False or default == [] or default == ()
        shown = not unset and "default" not in settings.get("help", "")
        if shown and settings.get("help") != argparse.SUPPRESS:
            settings["help"] = f"{settings.get('help', '')} (default: {self.text(default)})".strip()
        parser.add_argument(*self.flags, **settings)

    def argv(self, args: argparse.Namespace) -> list[str]:
        """This option's parsed value as command-line words, nothing for the default or an unset value."""
        value = getattr(args, self.dest)
        if value is None or value == self.settings.get("default"):
            return []
        if self.settings.get("action") == "store_true":
            return [self.flags[0]] if value else []
        if self.settings.get("action") == "append":
            return [word for item in value for word in (self.flags[0], self.text(item))]
        return [self.flags[0], self.text(value)]


def worker_argv(options: Iterable[Option], args: argparse.Namespace) -> list[str]:
    """The command line a front host gives its workers: the parsed values of the options that apply
    to workers and to front hosts alike (the model and its serving)."""
    return [word for option in options if option.where is Where.BOTH for word in option.argv(args)]


def check_together(parser: argparse.ArgumentParser, args: argparse.Namespace, *pairs: tuple[Option, Option]) -> None:
    """Each pair is given together or not at all (a key and its allow-list, a certificate and its key)."""
    for a, b in pairs:
        if (getattr(args, a.dest) is None) != (getattr(args, b.dest) is None):
            parser.error(f"{a.flags[0]} and {b.flags[0]} go together")


# ---------------------------------------------------------------------- value types


def port(text: str) -> int:
    """A TCP port, 1..65535, or 0 for "this endpoint is off"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: use 1..65535, or 0 to turn the endpoint off")
    return value


def positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be > 0")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def int_list(what: str, allowed: Callable[[], Sequence[int]] | None = None) -> Callable[[str], tuple[int, ...]]:
    """`0,1,2`: distinct non-negative integers (GPU indices, CPU cores), within `allowed()` if given."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None
        if any(v < 0 for v in values) or len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{text!r}: {what} must be distinct and >= 0")
        if allowed is not None and not set(values) <= set(allowed()):
            raise argparse.ArgumentTypeError(f"{text!r}: this process may use {what} {sorted(allowed())}")
        return values

    return parse


def comma_list(values: Iterable[Any]) -> str:
    return ",".join(str(v) for v in values)


def loopback(host: str) -> bool:
    """Whether `host` is this machine only (a host name other than localhost may resolve to anything)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tcp_endpoint(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"


# ---------------------------------------------------------------------- shared by the server and the broker

CURVE_SECRET = Option(
    ("--curve-secret",),
    {"default": None, "metavar": "FILE", "help": "CURVE .key_secret of the robots' ZMQ endpoints: robots need keys"},
    Where.FRONT,
    os.path.abspath,
)
CURVE_CLIENTS = Option(
    ("--curve-clients",),
    {"default": None, "metavar": "DIR", "help": "with --curve-secret: the robots' public keys (*.key) let in"},
    Where.FRONT,
    os.path.abspath,
)
WORKER_CURVE_SECRET = Option(
    ("--worker-curve-secret",),
    {"default": None, "metavar": "FILE", "help": "CURVE .key_secret of the TCP endpoints workers join"},
    Where.FRONT,
)
WORKER_CURVE_CLIENTS = Option(
    ("--worker-curve-clients",),
    {"default": None, "metavar": "DIR", "help": "with --worker-curve-secret: the workers' public keys let in"},
    Where.FRONT,
)
CURVE_PAIRS = ((CURVE_SECRET, CURVE_CLIENTS), (WORKER_CURVE_SECRET, WORKER_CURVE_CLIENTS))


def heartbeat_option(default_s: float) -> Option:
    return Option(
        ("--heartbeat",),
        {"type": positive(float), "default": default_s, "help": "fleet heartbeat interval, seconds"},
        Where.FRONT,
    )


LOG_LEVEL = Option(
    ("--log-level",), {"type": str.upper, "choices": LOG_LEVELS, "default": "INFO", "help": "least severe lines logged"}
)
LOG_FORMAT = Option(
    ("--log-format",),
    {"choices": LOG_FORMATS, "default": "text", "help": "text lines for people, or one JSON object a line"},
)
METRICS_PORT = Option(
    ("--metrics-port",),
    {
        "type": port,
        "default": 0,
        "help": "Prometheus /metrics over HTTP on --host at this port (0: off; 9464 is the usual choice)",
    },
    Where.FRONT,
)
READY_FILE = Option(
    ("--ready-file",),
    {
        "default": None,
        "metavar": "PATH",
        "help": "once serving, write this JSON file (atomically): pid, endpoints, model; removed at exit",
    },
    Where.FRONT,
)
