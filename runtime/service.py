"""What the server does with a request, whatever transport brought it.

Sessions (one per robot on ZMQ, one per connection on WebSocket) keep the latest observation and
the prompt and decoding options that refreshes reuse. The backend is the engine
(`policy.engine.AsyncPi05Inference`) or anything with the same three calls.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from runtime.refresh import Publish, RefreshScheduler
from transport.codec import PROTOCOL_VERSION
from transport.errors import BadRequest
from transport.messages import ACTIONS, INFER, KEEP, PING, REFRESH, SUBTASK, Observation, Options, Request

Reply = tuple[dict[str, Any], dict[str, np.ndarray]]


class InferenceBackend(Protocol):
    async def infer(
        self,
        images: Mapping[str, np.ndarray],
        high_level_prompt: str,
        low_level_prompt: str | None = None,
        state: Any = None,
        generate_subtask: bool = True,
        max_decoding_steps: int = 25,
        temperature: float = 0.1,
        seed: int | None = None,
    ) -> dict[str, Any]: ...

    async def generate_subtask(
        self,
        images: Mapping[str, np.ndarray],
        high_level_prompt: str,
        state: Any = None,
        max_decoding_steps: int = 25,
        temperature: float = 0.1,
        seed: int | None = None,
    ) -> dict[str, Any]: ...

    def info(self) -> dict[str, Any]: ...


@dataclasses.dataclass
class Session:
    key: str
    observation: Observation | None = None
    options: Options | None = None
    last_seen: float = dataclasses.field(default_factory=time.monotonic)


def _version() -> str:
    try:
        return importlib.metadata.version("pi05-runtime")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class PolicyService:
    def __init__(self, backend: InferenceBackend, publish: Publish, max_sessions: int = 4096):
        self.backend = backend
        self.scheduler = RefreshScheduler(self._refresh_subtask, publish)
        self.sessions: dict[str, Session] = {}
        self.max_sessions = max_sessions
        self._started = time.monotonic()

    async def close(self) -> None:
        await self.scheduler.close()

    def session(self, key: str) -> Session:
        session = self.sessions.get(key)
        if session is None:
            if len(self.sessions) >= self.max_sessions:
                self._evict()
            session = self.sessions[key] = Session(key)
        session.last_seen = time.monotonic()
        return session

    def drop_session(self, key: str) -> None:
        self.sessions.pop(key, None)
        self.scheduler.forget(key)

    def _evict(self) -> None:
        idle = [s for s in self.sessions.values() if self.scheduler.interval(s.key) is None]
        if not idle:
            raise BadRequest(f"the server holds {self.max_sessions} sessions with refreshes, its limit", "busy")
        self.drop_session(min(idle, key=lambda s: s.last_seen).key)

    async def handle(self, key: str, request: Request) -> Reply:
        if request.type == PING:
            return self.ping(), {}
        session = self.session(key)
        if request.observation is not None:
            if not request.observation.images:
                raise BadRequest("an observation needs at least one image ('image/<camera>')")
            session.observation = request.observation
        if request.options.high_level_prompt is not None:
            session.options = request.options
        if request.type == INFER:
            return await self._infer(session, request.options)
        if request.type == SUBTASK:
            return await self._subtask(session, request.options), {}
        if request.type == REFRESH:
            return self._set_refresh(session, request.options), {}
        raise BadRequest(f"unknown request type {request.type!r}")

    def _require(self, session: Session, options: Options) -> Observation:
        if not options.high_level_prompt:
            raise BadRequest("high_level_prompt is required")
        if session.observation is None:
            raise BadRequest("the request carries no observation: send at least one image")
        return session.observation

    async def _infer(self, session: Session, options: Options) -> Reply:
        obs = self._require(session, options)
        self._apply_refresh(session, options)
        out = await self.backend.infer(
            images=obs.images,
            high_level_prompt=options.high_level_prompt,
            low_level_prompt=options.low_level_prompt,
            state=obs.state,
            generate_subtask=options.generate_subtask,
            max_decoding_steps=options.max_decoding_steps,
            temperature=options.temperature,
            seed=options.seed,
        )
        state = out.get("state")
        data = {
            "subtask": out.get("subtask"),
            "subtask_tokens": [int(t) for t in out.get("subtask_tokens", [])],
            "state": None if state is None else [float(x) for x in np.asarray(state).ravel()],
            "timing": {k: float(v) for k, v in out["timing"].items()},
            "obs_timestamp": obs.timestamp,
            **self._refresh_fields(session.key),
        }
        return data, {ACTIONS: np.asarray(out["actions"], np.float32)}

    async def _subtask(self, session: Session, options: Options) -> dict[str, Any]:
        obs = self._require(session, options)
        self._apply_refresh(session, options)
        out = await self._generate(obs, options, options.seed)
        return {
            "subtask": out["subtask"],
            "subtask_tokens": [int(t) for t in out["subtask_tokens"]],
            "timing": {k: float(v) for k, v in out["timing"].items()},
            **self._refresh_fields(session.key),
        }

    def _apply_refresh(self, session: Session, options: Options) -> None:
        if options.subtask_refresh_interval is not KEEP:
            self.scheduler.set(session.key, options.subtask_refresh_interval)

    def _set_refresh(self, session: Session, options: Options) -> dict[str, Any]:
        self._apply_refresh(session, options)
        return {
            **self._refresh_fields(session.key),
            "waiting_for_observation": session.observation is None or session.options is None,
            "last": self.scheduler.last(session.key),
        }

    def _refresh_fields(self, key: str) -> dict[str, Any]:
        interval = self.scheduler.interval(key)
        return {"subtask_refresh_enabled": interval is not None, "subtask_refresh_interval": interval}

    async def _refresh_subtask(self, key: str) -> dict[str, Any] | None:
        session = self.sessions.get(key)
        if session is None or session.observation is None or session.options is None:
            return None
        # A fresh seed each time: a refresh may change its mind as the scene changes.
        return await self._generate(session.observation, session.options, seed=None)

    async def _generate(self, obs: Observation, options: Options, seed: int | None) -> dict[str, Any]:
        return await self.backend.generate_subtask(
            images=obs.images,
            high_level_prompt=options.high_level_prompt,
            state=obs.state,
            max_decoding_steps=options.max_decoding_steps,
            temperature=options.temperature,
            seed=seed,
        )

    def ping(self) -> dict[str, Any]:
        return {
            "server": {
                "name": "pi05-runtime",
                "version": _version(),
                "protocol": PROTOCOL_VERSION,
                "uptime_s": time.monotonic() - self._started,
                "sessions": len(self.sessions),
                "refreshing": sum(1 for k in self.sessions if self.scheduler.interval(k) is not None),
            },
            "model": self.backend.info(),
        }
