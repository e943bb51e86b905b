"""What the server does with a request, whatever transport brought it.

A session per robot (each WebSocket connection is one, through its gateway) keeps the latest
observation, prompt and options that refreshes reuse. Every request is validated in full before it
changes anything: a rejected request leaves the session as it was. What a client can make the
server hold is bounded: a stored observation is reduced to the model's input resolution, a
principal (its CURVE key, else its address: what a client cannot choose freely, unlike its robot
names and identities) holds a bounded number of sessions and the table as a whole too, and the
refresh interval has a floor. The bounds recover instead of locking: a new robot past a bound takes
the place of a session of the principal holding the most, one without a listener on its refresh
topic first, then the one heard from longest ago. Sessions end by `bye`, by disconnect (a refreshing
robot whose refresh topic has lost its subscribers and that has gone quiet), by silence and by
such eviction.

The backend is the engine (`policy.engine.inference.AsyncPi05Inference`) or anything with its calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from policy.request import EngineError, EngineStats, InferenceRequest, InferenceResult, Observation, Options
from runtime.policy_server.refresh import Publish, RefreshScheduler
from transport.curve import session_key
from transport.errors import BadRequest, TransportError
from transport.messages import ACTIONS, BYE, INFER, KEEP, MODEL_ACTIONS, PING, REFRESH, SUBTASK, Request
from transport.server_info import ServerInfo

log = logging.getLogger(__name__)

Reply = tuple[dict[str, Any], dict[str, np.ndarray]]


class InferenceBackend(Protocol):
    healthy: bool

    def check(self, request: InferenceRequest) -> None: ...

    async def prepare_images(self, images: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    async def submit(self, request: InferenceRequest) -> InferenceResult: ...

    def info(self) -> dict[str, Any]: ...

    def stats(self) -> EngineStats: ...


@dataclasses.dataclass(frozen=True)
class ServiceLimits:
    """What one client can make the server hold; each is a `policy_server` flag."""

    max_sessions: int = 1024
    max_sessions_per_peer: int = 64  # per principal: a CURVE key, else a client address
    min_refresh_interval_s: float = 0.1
    # A refreshing robot with no subscriber on its topic expires after this many intervals of
    # silence (at least `min_expiry_s`); any session expires after `session_ttl_s` of silence.
    expiry_intervals: float = 3.0
    min_expiry_s: float = 2.0
    session_ttl_s: float = 600.0


@dataclasses.dataclass
class Session:
    key: str
    principal: str
    observation: Observation | None = None
    prompt: str | None = None
    options: Options = dataclasses.field(default_factory=Options)
    last_seen: float = 0.0


class PolicyService:
    """`publish(topic, message)` delivers refreshes; `subscribers(topic)` counts who listens (the
    XPUB's view), `forget(topic)` drops a gone robot's last value; `on_result(session, request,
    result)` is told of every result the backend gave (the metrics' engine figures, Rerun's log)."""

    def __init__(
        self,
        backend: InferenceBackend,
        publish: Publish,
        subscribers: Callable[[str], int] = lambda topic: 0,
        forget: Callable[[str], None] = lambda topic: None,
        limits: ServiceLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_result: Callable[[str, InferenceRequest, InferenceResult], None] | None = None,
    ):
        self.backend = backend
        self._on_result = on_result
        self.limits = limits or ServiceLimits()
        self.scheduler = RefreshScheduler(self._refresh_subtask, publish)
        self.sessions: dict[str, Session] = {}
        self._subscribers = subscribers
        self._forget = forget
        self._clock = clock
        self._started = clock()
        self.expired = 0
        self.evicted = 0
        self._unheard: dict[str, float] = {}  # refreshing sessions -> since when no subscriber is seen
        # Requests being served per session: a session that ends takes its requests with it, so a
        # client that leaves does not leave model work behind.
        self._running: dict[str, set[asyncio.Task]] = {}

    async def close(self) -> None:
        await self.scheduler.close()

    # ------------------------------------------------------------------ sessions

    def drop_session(self, key: str) -> bool:
        self.scheduler.forget(key)
        self._unheard.pop(key, None)
        self._forget(key)
        for task in self._running.pop(key, ()):
            task.cancel()
        return self.sessions.pop(key, None) is not None

    def expire(self) -> list[str]:
        """Ends the sessions of robots that are gone; returns their keys. Called periodically.

        A refreshing robot is gone when it has been silent, and without a subscriber on its topic,
        for a few intervals: the listener must be missing for that long too, not just at this look,
        so a subscriber that connects again (a network blip, or its host's connections closed for
        another process's subscription flood) keeps its session."""
        now = self._clock()
        gone = []
        for key, session in self.sessions.items():
            silent = now - session.last_seen
            interval = self.scheduler.interval(key)
            if self._subscribers(key) or interval is None:
                self._unheard.pop(key, None)
            else:
                self._unheard.setdefault(key, now)
            if silent > self.limits.session_ttl_s:
                gone.append(key)
            elif interval is not None and key in self._unheard:
                window = max(self.limits.expiry_intervals * interval, self.limits.min_expiry_s)
                if silent > window and now - self._unheard[key] >= window:
                    gone.append(key)
        for key in gone:
            log.info("session %r expired (gone quiet%s)", key, "" if self._subscribers(key) else ", no subscriber")
            self.drop_session(key)
        self.expired += len(gone)
        return gone

    async def run_expiry(self, period_s: float = 0.5) -> None:
        """The periodic `expire()`; the server runs it as a supervised task."""
        while True:
            await asyncio.sleep(period_s)
            self.expire()

    def _make_room(self, principal: str) -> None:
        """Frees a place for a new session of `principal` when it would pass a bound: a session of
        its own at its cap, else, with the table full, one of the principals holding the most. A
        session with a request being served is not taken (its robot is waiting for the reply): when
        every candidate has one, the new robot gets `busy` until one is answered (within the
        engine's deadline), so the table is never locked for long."""
        owned: dict[str, list[Session]] = {}
        for session in self.sessions.values():
            owned.setdefault(session.principal, []).append(session)
        if len(owned.get(principal, ())) >= self.limits.max_sessions_per_peer:
            candidates, whose = owned[principal], "this client's"
        elif len(self.sessions) >= self.limits.max_sessions:
            most = max(len(sessions) for sessions in owned.values())  # all of the principals holding the most
            candidates = [s for sessions in owned.values() if len(sessions) == most for s in sessions]
            whose = "the largest clients'"
        else:
            return
        idle = [s for s in candidates if s.key not in self._running]
        if not idle:
            raise TransportError(
                f"{whose} {len(candidates)} robot sessions all have requests being served; retry shortly", "busy"
            )
        victim = min(idle, key=lambda s: (self._subscribers(s.key) > 0, s.last_seen))
        log.info(
            "session %r of %r ends to make room for a new robot of %r (%d sessions held in all)",
            victim.key, victim.principal, principal, len(self.sessions),
        )  # fmt: skip
        self.drop_session(victim.key)
        self.evicted += 1

    # ------------------------------------------------------------------ requests

    async def handle(self, principal: str, request: Request, user: str | None = None) -> Reply:
        """`principal` is whom the request counts against (`transport.zmq_server.principal_of`); `user`
        is the peer's authenticated key under CURVE: a robot's session (and refresh topic) is then
        `user/robot`, out of reach of every other key."""
        key = session_key(user, request.robot)
        if request.type == PING:
            return self.ping(), {}
        if request.type == BYE:
            return {"dropped": self.drop_session(key)}, {}
        if request.type not in (INFER, SUBTASK, REFRESH):
            raise BadRequest(f"unknown request type {request.type!r}")
        session = self.sessions.get(key)
        prompt, options = self._validate(session, request)
        # Validated: from here on the request changes the session.
        if session is None:
            self._make_room(principal)
            session = self.sessions[key] = Session(key, principal)
        session.principal, session.last_seen = principal, self._clock()
        if request.observation is not None:
            images = await self.backend.prepare_images(request.observation.images)
            session.observation = Observation(images, request.observation.state, request.observation.timestamp)
        if request.prompt is not None:
            session.prompt, session.options = request.prompt, request.options
        if request.refresh_interval is not KEEP:
            self.scheduler.set(session.key, request.refresh_interval)
        if request.type == REFRESH:
            return self._refresh_ack(session), {}
        # This request runs with the observation as it is now; a later request of the same robot
        # may replace the session's while this one waits for the model.
        observation = session.observation
        assert observation is not None and prompt is not None
        kind = "infer" if request.type == INFER else "subtask"
        task = asyncio.current_task()
        running = self._running.setdefault(session.key, set())
        if task is not None:
            running.add(task)
        try:
            result = await self._submit(
                session.key, self._inference_request(request, observation, prompt, options, kind)
            )
        finally:
            running.discard(task)
            if not running and self._running.get(session.key) is running:
                del self._running[session.key]
        data: dict[str, Any] = {
            "subtask": result.subtask,
            "subtask_tokens": [int(t) for t in result.subtask_tokens],
            "timing": {k: float(v) for k, v in result.timing.items()},
            "epoch": self.scheduler.epoch,
            **self._refresh_fields(session.key),
        }
        if request.type == SUBTASK:
            return data, {}
        data["state"] = None if result.state is None else np.asarray(result.state, np.float64).ravel().tolist()
        data["obs_timestamp"] = observation.timestamp
        arrays = {ACTIONS: np.asarray(result.actions, np.float32)}
        if result.model_actions is not None:
            arrays[MODEL_ACTIONS] = np.asarray(result.model_actions, np.float32)
        return data, arrays

    @staticmethod
    def _inference_request(
        request: Request, observation: Observation, prompt: str, options: Options, kind: str
    ) -> InferenceRequest:
        """The engine's request for `request` run as `kind`. Guidance (real-time chunking) and the
        model-space reply belong to an infer's own observation: a refresh never carries them."""
        if kind != "infer":
            return InferenceRequest(observation, prompt, options, kind=kind)
        return InferenceRequest(
            observation, prompt, options, kind=kind, guidance=request.guidance,
            return_model_actions=request.return_model_actions,
        )  # fmt: skip

    def _validate(self, session: Session | None, request: Request) -> tuple[str | None, Options]:
        """The prompt and options the request will run with; raises before anything is stored."""
        interval = request.refresh_interval
        if interval is not KEEP and interval is not None and interval < self.limits.min_refresh_interval_s:
            raise BadRequest(
                f"subtask_refresh_interval must be at least {self.limits.min_refresh_interval_s} s "
                f"(the server's minimum), got {interval}"
            )
        prompt = request.prompt if request.prompt is not None else (session.prompt if session else None)
        options = request.options if request.prompt is not None else (session.options if session else Options())
        if request.type in (INFER, SUBTASK) and request.prompt is None:
            raise BadRequest("high_level_prompt is required")
        if request.observation is not None and not request.observation.images:
            raise BadRequest("an observation needs at least one image ('image/<camera>')")
        if request.observation is not None and prompt is None:
            raise BadRequest("an observation needs a high_level_prompt, in this request or an earlier one")
        if (
            request.type in (INFER, SUBTASK)
            and request.observation is None
            and (session is None or session.observation is None)
        ):
            raise BadRequest("the request carries no observation: send at least one image")
        observation = request.observation or (session.observation if session else None)
        if observation is None or prompt is None:
            return prompt, options
        # What the request runs, and what the session's refreshes will run, must be valid: a
        # stored observation or prompt that a refresh cannot use would fail every tick.
        refreshing = (interval is not KEEP and interval is not None) or (
            interval is KEEP and session is not None and self.scheduler.interval(session.key) is not None
        )
        kinds = {"infer"} if request.type == INFER else {"subtask"} if request.type == SUBTASK else set()
        if refreshing or (request.type == REFRESH and (request.observation is not None or request.prompt is not None)):
            kinds.add("subtask")
        for kind in sorted(kinds):
            self.backend.check(self._inference_request(request, observation, prompt, options, kind))
        return prompt, options

    async def _submit(self, key: str, request: InferenceRequest) -> InferenceResult:
        try:
            result = await self.backend.submit(request)
        except EngineError as e:
            raise TransportError(str(e), e.code) from None
        if self._on_result is not None:
            self._on_result(key, request, result)
        return result

    def _refresh_ack(self, session: Session) -> dict[str, Any]:
        return {
            **self._refresh_fields(session.key),
            "epoch": self.scheduler.epoch,
            "waiting_for_observation": session.observation is None or session.prompt is None,
            "last": self.scheduler.last(session.key),
        }

    def _refresh_fields(self, key: str) -> dict[str, Any]:
        interval = self.scheduler.interval(key)
        return {"subtask_refresh_enabled": interval is not None, "subtask_refresh_interval": interval}

    async def _refresh_subtask(self, key: str) -> InferenceResult | None:
        session = self.sessions.get(key)
        if session is None or session.observation is None or session.prompt is None:
            return None
        # A fresh seed each time: a refresh may change its mind as the scene changes.
        options = dataclasses.replace(session.options, seed=None)
        return await self._submit(
            key, InferenceRequest(session.observation, session.prompt, options, kind="subtask", priority="refresh")
        )

    def ping(self) -> dict[str, Any]:
        server = ServerInfo(
            uptime_s=self._clock() - self._started,
            epoch=self.scheduler.epoch,
            healthy=bool(self.backend.healthy),
            sessions=len(self.sessions),
            refreshing=self.scheduler.active(),
            min_refresh_interval_s=self.limits.min_refresh_interval_s,
            expired_sessions=self.expired,
            evicted_sessions=self.evicted,
        )
        return {"server": server.to_wire(), "model": self.backend.info()}
