"""One robot's subtask refreshes from the policy server's XPUB (docs/protocol.md, section 2)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from transport.curve import ClientKeys, apply_client, session_key
from transport.zmq_reader import SocketReader
from transport.zmq_requests import zmq_endpoint

log = logging.getLogger(__name__)


class RefreshListener:
    """One robot's subtask refreshes: `callback(message)` for each new one.

    Messages are matched on the exact topic (ZMQ matches prefixes) and a message whose `seq` is not
    newer than the last one seen from the same server `epoch` is dropped, so a replayed last value is
    delivered once and a restarted server (a new epoch) is followed. `run` subscribes on an asyncio
    loop; `PolicyClient.listen_refreshes` feeds `deliver` from its own polling instead. With `keys`
    the topic is `user/robot`: under CURVE the server lets a subscriber have its own topics only.
    """

    def __init__(
        self,
        endpoint: str,
        robot_id: str,
        callback: Callable[[dict[str, Any]], None],
        context: zmq.Context | None = None,
        keys: ClientKeys | None = None,
    ):
        self.endpoint = zmq_endpoint(endpoint)
        self.topic = session_key(keys.user if keys else None, robot_id).encode()
        self.keys = keys
        self._callback = callback
        self._ctx = context or zmq.Context.instance()
        self.last_seq = -1
        self.epoch: Any = None
        self.received = 0

    def deliver(self, frames: list[bytes]) -> None:
        """Calls the callback with the message in `frames` if it is this robot's and new."""
        if len(frames) != 2 or frames[0] != self.topic:
            return
        try:
            message = msgpack.unpackb(frames[1], raw=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            log.warning("dropped an undecodable refresh: %s", e)
            return
        if not isinstance(message, dict):
            return
        seq, epoch = message.get("seq"), message.get("epoch")
        if not isinstance(seq, int):
            return
        if epoch == self.epoch and seq <= self.last_seq:
            return
        self.epoch, self.last_seq = epoch, seq
        self.received += 1
        self._callback(message)

    def subscriber(self) -> zmq.Socket:
        """A SUB socket subscribed to this robot's topic, connected."""
        socket = self._ctx.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            apply_client(socket, self.keys)
        socket.setsockopt(zmq.SUBSCRIBE, self.topic)
        socket.connect(self.endpoint)
        return socket

    async def run(self) -> None:
        """Subscribes and delivers until cancelled."""
        socket = self.subscriber()
        reader = SocketReader(
            asyncio.get_running_loop(), socket, lambda frames: self.deliver([f.bytes for f in frames])
        )
        try:
            await asyncio.Event().wait()
        finally:
            reader.close()
            socket.close(linger=0)
