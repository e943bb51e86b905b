"""The policy server on a background thread of the current process, for tests and benchmarks
that drive a real server from synchronous code (or hand it their own engine as `backend`).
Without `--config` in its argv it runs `TEST_CONFIG`: the shapes tests assert are that config's.
"""

from __future__ import annotations

import argparse
import asyncio
import threading

from runtime.policy_server.flags import parse_args
from runtime.policy_server.main import serve
from runtime.policy_server.service import InferenceBackend

TEST_CONFIG = "pi05_tiny"


class ServerThread:
    def __init__(self, argv: list[str], backend: InferenceBackend | None = None, start_timeout_s: float = 600.0):
        self.args: argparse.Namespace = parse_args(argv if "--config" in argv else ["--config", TEST_CONFIG, *argv])
        self.endpoints: dict[str, str] = {}
        self._backend = backend
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="policy-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout_s):
            raise TimeoutError(f"the policy server did not get ready in {start_timeout_s} s")
        if self._error is not None:
            raise self._error

    @property
    def ports(self) -> dict[str, int]:
        """The port of each endpoint, as given (0: off)."""
        a = self.args
        return {"router": a.router_port, "pub": a.pub_port, "ws": a.ws_port, "openpi": a.openpi_port}

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.args, self._backend, self._stop, on_ready=self._on_ready)

        try:
            asyncio.run(main())
        except BaseException as e:  # handed to the constructor's caller
            self._error = e
            self._ready.set()

    def _on_ready(self, endpoints: dict[str, str]) -> None:
        self.endpoints = dict(endpoints)
        self._ready.set()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
