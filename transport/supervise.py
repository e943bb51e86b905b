"""Supervised background loops: a loop that fails is logged with its traceback and restarted.

A receive loop that dies silently stops a server for everyone while its process stays up; run
every long-lived loop through `supervise` instead of a bare `create_task`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def supervise(name: str, run: Callable[[], Awaitable[None]], restart_delay_s: float = 0.05) -> None:
    """Runs `run()` until it returns or is cancelled, restarting it after any other exception."""
    while True:
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; restarting it", name)
            await asyncio.sleep(restart_delay_s)
