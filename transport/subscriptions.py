"""Subscriptions are input: what an XPUB's subscribers may make a process hold, and whose count they may lower.

A subscription costs the publisher far more than its bytes: libzmq (4.3.5, what pyzmq ships) keeps
every subscription it receives in a trie of one node per byte, about 47 bytes of memory per byte
subscribed, an XSUB that forwards it recurses once per byte (a 256 KB topic overflows the stack),
an XPUB queues subscriptions for the application without bound, and the server learns of subscribers
only by counting (un)subscriptions. So an XPUB that faces peers is set up by `configure_xpub` and its
every message goes through a `SubscriptionBook`:

- **Length first, inside libzmq.** `MAXMSGSIZE` on the socket closes a connection that sends a
  subscription longer than any topic this server publishes (`user/` plus a robot id of 256
  characters), before libzmq stores it anywhere.
- **Manual mode.** The socket is `XPUB_MANUAL`: a subscription takes effect for publishing only when
  the book applies it (`setsockopt(SUBSCRIBE)`), so a refused one never reaches the trie messages are
  matched against, and under CURVE a key may hold only its own `user/` topics (`curve.session_key`).
- **Per connection and per principal.** Each connection has a name from the context's ZAP handler
  (`transport.zap`, the socket's ZAP domain `SUBSCRIBERS_DOMAIN`): a connection's subscription of a
  topic counts once however often it is sent, and an unsubscription ends only what that connection
  subscribed, so a forged one ends nobody's refreshes. Subscriptions are counted per principal: its
  CURVE User-Id, else its peer address (the IP of a TCP connection, `host:uid:gid:pid` of an ipc one).
  A principal holds a bounded number of topics, each through a bounded number of its connections, and
  the book a bounded number in all.
- **Departures are anonymous.** When a subscriber leaves, libzmq reports each of its subscriptions
  gone with no metadata at all. Such an unsubscription first settles a subscription the book refused
  or wrote off (libzmq records those too), then lowers the count of the topic's only principal; with
  several principals holding it, it lowers none. Counts may so stay high (a session then ends by its
  silence timeout), never too low.
- **What libzmq keeps regardless.** Each peer address has a budget of subscribed bytes (in manual
  mode libzmq records every subscription a connection sends, accepted or not, until the connection
  ends; an unsubscription of what it holds gives them back) and of subscription messages a second
  (libzmq queues them faster than any reader reads them). Past either, the book asks its owner to
  `cut` the address's connections (`transport.connections`): what the book held for them is written
  off, and what they had queued is dropped unread, while new connections from that address (a robot
  whose connection was closed with the attacker's connects again) are served as usual.

No sockets are read here: the owner feeds each frame to `handle` and acts on the `Change`s it
returns.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable

import zmq

from transport import curve
from transport.messages import MAX_ROBOT_CHARS
from transport.zap import connection_of

log = logging.getLogger(__name__)

# The longest topic this server publishes: a session key under CURVE, `user/robot`, in UTF-8.
MAX_TOPIC_BYTES = curve.USER_CHARS + 1 + 4 * MAX_ROBOT_CHARS
SUBSCRIBERS_DOMAIN = "subscribers"  # the ZAP domain of a public XPUB: its connections are named
# ZMTP 3.1 sends a subscription as a command: a name-length byte and "SUBSCRIBE" before the topic.
_COMMAND_BYTES = 1 + len("SUBSCRIBE")
# What a subscription costs in the byte budget beyond its topic (libzmq's per-message bookkeeping).
_OVERHEAD_BYTES = 64


def configure_xpub(socket: zmq.Socket, zap_domain: str | None = SUBSCRIBERS_DOMAIN) -> None:
    """Makes an XPUB report every (un)subscription with its metadata and apply none by itself, name
    each connection that it accepts (through the ZAP handler of `zap_domain`, which must run in its
    context; None for an XPUB that only connects), and drop the connection of a peer whose
    subscription is longer than `MAX_TOPIC_BYTES`. Call before binding or connecting."""
    socket.setsockopt(zmq.XPUB_VERBOSER, 1)
    socket.setsockopt(zmq.XPUB_MANUAL, 1)
    socket.setsockopt(zmq.MAXMSGSIZE, 1 + MAX_TOPIC_BYTES + _COMMAND_BYTES)
    socket.setsockopt(zmq.RCVHWM, 64)  # what libzmq pulls from one connection ahead of the reader
    if zap_domain is not None:
        socket.setsockopt(zmq.ZAP_DOMAIN, zap_domain.encode())


@dataclasses.dataclass(frozen=True)
class SubscriptionLimits:
    """What subscribers may make the book (and libzmq) hold."""

    topics_per_principal: int = 256
    topics: int = 65536  # (connection, topic) pairs held in all
    copies: int = 16  # connections of one principal holding one topic
    # Subscribed bytes libzmq may record for one peer address before its connections are cut: at
    # about 47 bytes of memory per byte, 1 MiB of topics is about 50 MB.
    bytes_per_address: int = 1 << 20
    # Messages of one peer address, per second on average and at once, before its connections are
    # cut: a host restarting 1000 robots sends 1000. libzmq queues what a connection sends ahead of
    # the reader without bound, so the burst is what bounds that queue.
    per_second: float = 1000.0
    burst: float = 2000.0
    written_off: int = 65536  # refused or written-off subscriptions remembered for their departure
    addresses: int = 4096  # peer addresses whose budget is tracked (least recently heard forgotten)
    # Connections whose subscriptions are remembered (least recently heard forgotten: an
    # unsubscription of a forgotten one changes nothing), and closed ones whose queue is dropped.
    connections: int = 65536
    cut_connections: int = 65536


# A fleet worker's XPUB, whose one subscriber is its broker: the broker has bounded the robots'
# subscriptions already and forwards only each topic's first and last, one per robot it remembers.
FROM_BROKER = SubscriptionLimits(
    topics_per_principal=65536, copies=65536, bytes_per_address=1 << 40, per_second=float("inf"), burst=float("inf")
)


@dataclasses.dataclass(frozen=True)
class Change:
    """A counted subscription of `topic` added (`subscribed`) or removed; `holders` is how many
    counted subscriptions the topic has now, every connection together."""

    topic: bytes
    subscribed: bool
    holders: int


@dataclasses.dataclass
class _Budget:
    """A peer address's subscribed bytes, its bucket of messages, who was seen there."""

    tokens: float
    at: float
    spent: int = 0
    connections: set[str] = dataclasses.field(default_factory=set)
    principals: set[str] = dataclasses.field(default_factory=set)
    refusals: int = 0
    cuts: int = 0


class SubscriptionBook:
    """The counted subscriptions of one XPUB socket in manual mode (`configure_xpub`).

    `own_prefix`: a CURVE subscriber may subscribe only under its own `user/` prefix (the XPUB's tcp
    endpoints are CURVE servers; a plain connection, the server's own gateways over ipc, may subscribe
    to anything). `cut(address)` is called when an address has spent its budget; it should close that
    address's connections and say how many it closed (none: an ipc peer, a local process of the
    server's own user, which is then only refused)."""

    def __init__(
        self,
        socket: zmq.Socket,
        limits: SubscriptionLimits | None = None,
        *,
        own_prefix: bool = False,
        cut: Callable[[str], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._socket = socket
        self.limits = limits or SubscriptionLimits()
        self._own_prefix = own_prefix
        self._cut = cut
        self._clock = clock
        self._held: dict[bytes, collections.Counter[str]] = {}  # topic -> principal -> copies
        self._topics_of: dict[str, set[bytes]] = {}  # principal -> the topics it holds
        self._address_of: dict[str, str] = {}  # principal -> the address it was last seen at
        self._pairs = 0
        # connection -> the topics it subscribed and the book counts (where connections have no
        # names, as on a worker's XPUB, a principal's subscriptions are counted, not checked)
        self._subscribed: collections.OrderedDict[str, set[bytes]] = collections.OrderedDict()
        # topic -> address charged -> subscriptions libzmq records that no count stands for
        self._written_off: dict[bytes, collections.Counter[str]] = {}
        self._forgetful = False  # past `written_off`: departures lower no count (never too low)
        self._budgets: collections.OrderedDict[str, _Budget] = collections.OrderedDict()
        self._cut_connections: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.refused = 0
        self.departures = 0
        self.dropped = 0  # messages of connections already cut, dropped unread
        self.cuts = 0

    # ------------------------------------------------------------------ queries

    def subscribers(self, topic: bytes) -> int:
        """Counted subscriptions to exactly `topic`."""
        held = self._held.get(topic)
        return 0 if held is None else sum(held.values())

    def subscriptions(self) -> dict[bytes, int]:
        """Every counted subscription prefix and how many subscriptions hold it."""
        return {topic: sum(held.values()) for topic, held in self._held.items()}

    @property
    def held_written_off(self) -> int:
        """Refused or written-off subscriptions whose departure has not (as far as is known) come."""
        return sum(sum(by.values()) for by in self._written_off.values())

    # ------------------------------------------------------------------ messages

    def handle(self, frame: zmq.Frame) -> list[Change]:
        """One message the XPUB received (with `copy=False`, so its metadata can be read): the changes
        of counted subscriptions it made (none when it was refused, ignored or not a subscription;
        several when its address was cut)."""
        msg = frame.bytes
        kind = msg[0] if msg and msg[0] in (0, 1) else None  # 1 subscribe, 0 unsubscribe, None upstream
        topic = msg[1:]
        address = _peer_address(frame)
        if address is None:  # libzmq's own: a subscriber left
            return self._departed(topic) if kind == 0 else []
        connection = connection_of(frame)
        if connection is not None and connection in self._cut_connections:
            # Queued by a connection that is closed already: dropped unread, but libzmq recorded its
            # subscriptions as it queued them, and will report them gone: they must lower nothing.
            self.dropped += 1
            if kind == 1:
                self._write_off(topic, 1, address)
            elif kind == 0:
                self._settle(topic, address)
            return []
        user = curve.user_id(frame) if self._own_prefix else None  # a User-Id only under CURVE
        principal = user or address
        budget = self._budget(address)
        budget.principals.add(principal)
        self._address_of[principal] = address
        if connection is not None:
            budget.connections.add(connection)
        if not self._take_token(budget):
            why = f"more than {self.limits.burst:g} messages at once"
            return self._cut_address(address, budget, why, topic if kind == 1 else None)
        if kind is None:
            return []  # an upstream message: an XPUB's subscribers have nothing else to say
        subscribed = None if connection is None else self._subscribed_by(connection)
        if kind == 1:
            return self._subscribe(topic, subscribed, principal, user, address, budget)
        return self._unsubscribe(topic, subscribed, principal, budget)

    def _subscribed_by(self, connection: str) -> set[bytes]:
        subscribed = self._subscribed.get(connection)
        if subscribed is None:
            subscribed = self._subscribed[connection] = set()
            while len(self._subscribed) > self.limits.connections:
                self._subscribed.popitem(last=False)
        self._subscribed.move_to_end(connection)
        return subscribed

    def _subscribe(
        self,
        topic: bytes,
        subscribed: set[bytes] | None,
        principal: str,
        user: str | None,
        address: str,
        budget: _Budget,
    ) -> list[Change]:
        if subscribed is not None and topic in subscribed:
            return []  # this connection holds it already: libzmq keeps one, so does the book
        budget.spent += len(topic) + _OVERHEAD_BYTES
        if budget.spent > self.limits.bytes_per_address:
            why = f"more than {self.limits.bytes_per_address} bytes of subscriptions"
            return self._cut_address(address, budget, why, topic)
        why = self._refusal(topic, principal, user)
        if why is not None:
            self._refuse(topic, address, budget, why)
            return []
        held = self._held.setdefault(topic, collections.Counter())
        if not held[principal]:
            self._topics_of.setdefault(principal, set()).add(topic)
            self._pairs += 1
        held[principal] += 1
        if subscribed is not None:
            subscribed.add(topic)
        self._socket.setsockopt(zmq.SUBSCRIBE, topic)
        return [Change(topic, True, sum(held.values()))]

    def _refusal(self, topic: bytes, principal: str, user: str | None) -> str | None:
        """Why a subscription is refused, or None."""
        limits = self.limits
        if len(topic) > MAX_TOPIC_BYTES:  # configure_xpub keeps these out; a socket set up otherwise does not
            return f"a topic of {len(topic)} bytes, longer than {MAX_TOPIC_BYTES}"
        if self._own_prefix and user is not None and not topic.startswith(f"{user}/".encode()):
            return "not its own topic"
        copies = self._held.get(topic, {}).get(principal, 0)
        if copies >= limits.copies:
            return f"{copies} subscriptions of that topic already"
        if not copies:
            if len(self._topics_of.get(principal, ())) >= limits.topics_per_principal:
                return f"{limits.topics_per_principal} topics already, its limit"
            if self._pairs >= limits.topics:
                return f"the server holds {limits.topics} subscriptions, its limit"
        return None

    def _unsubscribe(
        self, topic: bytes, subscribed: set[bytes] | None, principal: str, budget: _Budget
    ) -> list[Change]:
        """An explicit unsubscription: it ends only what its own connection subscribed."""
        held = self._held.get(topic)
        if (subscribed is not None and topic not in subscribed) or held is None or not held.get(principal):
            return []  # forged, or of a refused subscription: nobody's count changes
        if subscribed is not None:
            subscribed.discard(topic)
        budget.spent = max(0, budget.spent - len(topic) - _OVERHEAD_BYTES)
        self._socket.setsockopt(zmq.UNSUBSCRIBE, topic)
        return [self._lower(topic, held, principal)]

    def _departed(self, topic: bytes) -> list[Change]:
        """A subscription of `topic` ended with its connection; its bytes go back to the address that
        was charged for it, where that is known."""
        self.departures += 1
        written_off = self._written_off.get(topic)
        if written_off:
            self._refund(self._settle(topic, next(iter(written_off))), topic)
            return []
        held = self._held.get(topic)
        if self._forgetful or held is None or len(held) != 1:
            return []  # nobody's, or several principals': whose connection left is unknown
        (principal,) = held
        self._refund(self._address_of.get(principal), topic)
        return [self._lower(topic, held, principal)]

    def _settle(self, topic: bytes, address: str) -> str | None:
        """One written-off subscription of `topic` charged to `address` is over (reported gone, or
        unsubscribed by the closed connection that made it); returns that address, or None."""
        written_off = self._written_off.get(topic)
        if not written_off or not written_off[address]:
            return None
        written_off[address] -= 1
        if not written_off[address]:
            del written_off[address]
        if not written_off:
            del self._written_off[topic]
        return address

    def _lower(self, topic: bytes, held: collections.Counter[str], principal: str, copies: int = 1) -> Change:
        held[principal] -= copies
        if held[principal] <= 0:
            del held[principal]
            topics = self._topics_of[principal]
            topics.discard(topic)
            if not topics:
                del self._topics_of[principal]
                self._address_of.pop(principal, None)
            self._pairs -= 1
        holders = sum(held.values())
        if not holders:
            del self._held[topic]
        return Change(topic, False, holders)

    # ------------------------------------------------------------------ budgets

    def _budget(self, address: str) -> _Budget:
        budget = self._budgets.get(address)
        if budget is None:
            budget = self._budgets[address] = _Budget(self.limits.burst, self._clock())
            while len(self._budgets) > self.limits.addresses:
                self._budgets.popitem(last=False)
        self._budgets.move_to_end(address)
        return budget

    def _refund(self, address: str | None, topic: bytes) -> None:
        budget = None if address is None else self._budgets.get(address)
        if budget is not None:
            budget.spent = max(0, budget.spent - len(topic) - _OVERHEAD_BYTES)

    def _take_token(self, budget: _Budget) -> bool:
        now = self._clock()
        budget.tokens = min(self.limits.burst, budget.tokens + (now - budget.at) * self.limits.per_second)
        budget.at = now
        if budget.tokens < 1:
            return False
        budget.tokens -= 1
        return True

    def _refuse(self, topic: bytes, address: str, budget: _Budget, why: str) -> None:
        self.refused += 1
        budget.refusals += 1
        if budget.refusals & (budget.refusals - 1) == 0:  # the 1st, 2nd, 4th, 8th ...: a flood logs little
            log.info(
                "refused a subscription of %d bytes from %r: %s (%d refused)", len(topic), address, why, budget.refusals
            )
        self._write_off(topic, 1, address)

    def _write_off(self, topic: bytes, n: int, address: str) -> None:
        """`n` subscriptions libzmq records under `topic` that no count stands for (charged to
        `address`): their departures must lower nothing."""
        if topic in self._written_off or len(self._written_off) < self.limits.written_off:
            self._written_off.setdefault(topic, collections.Counter())[address] += n
        elif not self._forgetful:
            self._forgetful = True
            log.warning(
                "more than %d refused subscriptions outstanding: from now on a subscriber leaving lowers no "
                "count (sessions of robots that are gone end by their silence timeout)",
                self.limits.written_off,
            )

    def _cut_address(self, address: str, budget: _Budget, why: str, trigger: bytes | None) -> list[Change]:
        """Closes the connections of `address` (`trigger`: the subscription that spent its budget,
        which libzmq has recorded too). What they hold is written off (libzmq reports each of their
        subscriptions gone when they end) and what they queued is dropped unread; a new connection
        from the address (a robot's SUB connects again by itself) is served as usual, as the budget
        refills. An address whose connections cannot be closed (ipc) is only refused."""
        if trigger is not None:
            self._refuse(trigger, address, budget, why)
        closed = self._cut(address) if self._cut is not None else 0
        self.cuts += 1
        budget.cuts += 1
        if budget.cuts & (budget.cuts - 1) == 0:  # the 1st, 2nd, 4th ... cut of this address
            log.warning(
                "the subscribers at %r sent %s: %d connection(s) closed (cut %d)", address, why, closed, budget.cuts
            )
        if not closed:
            return []
        changes = []
        for connection in budget.connections:
            self._cut_connections[connection] = None
            self._subscribed.pop(connection, None)
        while len(self._cut_connections) > self.limits.cut_connections:
            self._cut_connections.popitem(last=False)
        for principal in budget.principals:
            for topic in list(self._topics_of.get(principal, ())):
                held = self._held[topic]
                copies = held[principal]
                self._write_off(topic, copies, address)
                changes.append(self._lower(topic, held, principal, copies))
        budget.connections.clear()
        budget.principals.clear()
        budget.spent = 0
        return changes


def _peer_address(frame: zmq.Frame) -> str | None:
    """The frame's `Peer-Address`; None for a message libzmq made itself (no metadata)."""
    try:
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return None
