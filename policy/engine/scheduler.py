"""What the device runs next: batches of typed rows from per-phase queues, actions first.

Pure host logic, no JAX, so the order is testable with an injected clock. Classes of work, in the
order the device thread takes them (a class with work waiting in its batch window holds the device
for that window rather than letting a lower class start):

1. the action phase of two-stage requests whose subtask is decoded (a robot is waiting on them);
2. action-only requests;
3. the next segment of the robots' subtask decoding in flight, else a new one;
4. the next segment of periodic refreshes in flight, else a new refresh batch.

So an action request waits behind at most one segment of somebody's subtask decoding, refreshes
batch with each other and never run ahead of a robot's request, and a request past its deadline
is answered `DeadlineExceeded` instead of being run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from policy.request import DeadlineExceeded, EngineError, InferenceRequest, Priority


@dataclasses.dataclass(frozen=True)
class Row:
    """One request's model inputs for one phase, prepared on the host: what the device stacks.

    A new model input is a field here and in the phase's signature; `stack` needs no change.
    Real-time chunking's columns are there for every row (zeros without guidance), so guided and
    plain rows stack into one batch of fixed shapes.
    """

    images: np.ndarray  # (C, S, S, 3) uint8, cameras in config order, a masked camera black
    image_mask: np.ndarray  # (C,) bool
    tokens: np.ndarray  # (L,) int32
    token_mask: np.ndarray  # (L,) bool
    seed: np.uint32
    limit: np.int32  # decoding budget (subtask phase)
    temperature: np.float32  # (subtask phase)
    guide: np.ndarray  # (A, E) float32: the leftover in model space, zero-padded (action phase)
    guide_weights: np.ndarray  # (A,) float32: RTC's prefix weights, zeros without guidance
    guide_beta: np.float32  # the guidance weight's clip; 0 without guidance


def stack(rows: Sequence[Row], size: int) -> Row:
    """The rows as one batch of `size`, padded with copies of the first row (outputs ignored)."""
    padded = list(rows) + [rows[0]] * (size - len(rows))
    return Row(*(np.stack([getattr(r, f.name) for r in padded]) for f in dataclasses.fields(Row)))


@dataclasses.dataclass(eq=False)
class Ticket:
    """One admitted request on its way through the engine (times on the engine's clock)."""

    request: InferenceRequest
    seed: int
    deadline: float
    submitted: float
    future: concurrent.futures.Future
    decodes: bool
    row: Row | None = None  # the first phase's inputs, set by the host preparation
    state: np.ndarray | None = None  # the robot's state, float32
    normalized_state: np.ndarray | None = None
    subtask: str | None = None
    subtask_tokens: tuple[int, ...] = ()
    enqueued: float = 0.0
    started: float | None = None
    subtask_ms: float = 0.0
    action_ms: float = 0.0
    abandoned: bool = False  # the caller stopped waiting (its deadline passed)

    def live(self, now: float) -> bool:
        """Whether the ticket still deserves device time; answers it `DeadlineExceeded` if not."""
        if self.future.done():
            return False
        if self.abandoned or now >= self.deadline:
            fail(self, DeadlineExceeded("the request's deadline passed before the engine could run it"))
            return False
        return True


def fail(ticket: Ticket, error: BaseException) -> None:
    """Resolves the ticket with `error` unless it is resolved already (or was cancelled)."""
    if ticket.future.done():
        return
    try:
        ticket.future.set_exception(error)
    except concurrent.futures.InvalidStateError:  # cancelled by its waiter in the meantime
        pass


@dataclasses.dataclass(eq=False)
class DecodeJob:
    """A subtask batch being decoded: its device state stays here between segments."""

    priority: Priority
    tickets: list[Ticket]
    bucket: int
    rows: Row  # the stacked subtask-phase inputs (their image masks, seeds and guidance serve the action phase)
    state: Any = None  # decoding.DecodeState on the device
    image_tokens: Any = None  # (bucket, C * P, D) on the device, for the action phase
    segments: int = 0
    started: float = 0.0  # perf_counter at the start call (subtask_ms)


@dataclasses.dataclass(frozen=True)
class ActionBatch:
    tickets: list[Ticket]


@dataclasses.dataclass(frozen=True)
class StartDecode:
    tickets: list[Ticket]
    priority: Priority


@dataclasses.dataclass(frozen=True)
class Segment:
    job: DecodeJob


@dataclasses.dataclass(frozen=True)
class FollowUp:
    """The action phase of a decoded job's two-stage rows, on the job's image tokens."""

    job: DecodeJob


Work = ActionBatch | StartDecode | Segment | FollowUp


class Scheduler:
    """Thread-safe queues and the choice of the next batch; `next()` blocks the device thread.

    `capacity()` is the most rows a batch may have now (the largest compiled bucket);
    `window_s` is how long the first request of a batch waits for others to join it. A request
    that arrived within that window but is still in host preparation (resizing its images) is
    waited for too: the window is about when requests arrive, not when their preparation ends, so
    robots that send together are batched together.
    """

    def __init__(
        self,
        capacity: Callable[[], int],
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
        starvation_s: float = 1.0,
    ):
        self._capacity = capacity
        self._window_s = window_s
        # Subtask decoding (a robot's, or a refresh) that has had no device turn for this long gets
        # one segment ahead of the action requests: a steady stream of actions delays subtasks by
        # at most this, and never starves them past their deadline.
        self._starvation_s = starvation_s
        self._last_turn: dict[str, float] = {"action": clock(), "refresh": clock()}
        self._clock = clock
        self._cond = threading.Condition()
        self._followups: collections.deque[DecodeJob] = collections.deque()
        self._actions: collections.deque[Ticket] = collections.deque()
        self._subtasks: dict[str, collections.deque[Ticket]] = {
            "action": collections.deque(),
            "refresh": collections.deque(),
        }
        self._decoding: dict[str, DecodeJob | None] = {"action": None, "refresh": None}
        self._preparing: set[Ticket] = set()
        self._closed: EngineError | None = None  # why, once closed

    # ------------------------------------------------------------------ producers

    def expect(self, ticket: Ticket) -> None:
        """A ticket admitted and now in host preparation: a batch of its class may wait for it."""
        with self._cond:
            self._preparing.add(ticket)

    def unexpect(self, ticket: Ticket) -> None:
        """An expected ticket that will not be `put` (its preparation failed)."""
        with self._cond:
            self._preparing.discard(ticket)
            self._cond.notify()

    def put(self, ticket: Ticket) -> None:
        """Queues a prepared ticket for its first phase (once closed, fails it with the reason)."""
        with self._cond:
            self._preparing.discard(ticket)
            if self._closed:
                fail(ticket, self._closed)
                return
            ticket.enqueued = self._clock()
            if ticket.decodes:
                self._subtasks[ticket.request.priority].append(ticket)
            else:
                self._actions.append(ticket)
            self._cond.notify()

    def follow_up(self, job: DecodeJob) -> None:
        """A decoded job whose two-stage rows now need their actions."""
        with self._cond:
            self._decoding[job.priority] = None
            if self._closed:
                for t in job.tickets:
                    fail(t, self._closed)
                return
            self._followups.append(job)
            self._cond.notify()

    def decoding(self, job: DecodeJob | None, priority: Priority) -> None:
        """Records the job in flight for `priority` (None: that decoding ended)."""
        with self._cond:
            self._decoding[priority] = job

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ the device thread

    def next(self) -> Work | None:
        """The next work item, waiting for one; None once closed."""
        with self._cond:
            while not self._closed:
                work, wait_s = self._choose()
                if work is not None:
                    return work
                self._cond.wait(wait_s)
            return None

    def _choose(self) -> tuple[Work | None, float | None]:
        """(work, None), or (None, how long to wait before choosing again; None: until notified)."""
        now = self._clock()
        if self._followups:
            return FollowUp(self._followups.popleft()), None
        for priority in ("action", "refresh"):
            starved = self._starved(priority, now)
            if starved is not None:
                return starved, None
        work, wait_s = self._take(self._actions, ActionBatch, now, lambda t: not t.decodes)
        if work is not None or wait_s is not None:
            return work, wait_s
        for priority in ("action", "refresh"):
            job = self._decoding[priority]
            if job is not None:
                self._last_turn[priority] = now
                return Segment(job), None
            make = functools.partial(StartDecode, priority=priority)
            work, wait_s = self._take(
                self._subtasks[priority], make, now, lambda t, p=priority: t.decodes and t.request.priority == p
            )
            if work is not None:
                self._last_turn[priority] = now
            if work is not None or wait_s is not None:
                return work, wait_s
        return None, None

    def _starved(self, priority: Priority, now: float) -> Work | None:
        """A subtask decoding turn for `priority` if it has waited `starvation_s` for one."""
        job = self._decoding[priority]
        if job is not None:
            if now - self._last_turn[priority] < self._starvation_s:
                return None
            self._last_turn[priority] = now
            return Segment(job)
        queue = self._subtasks[priority]
        while queue and not queue[0].live(now):
            queue.popleft()
        if not queue or now - queue[0].enqueued < self._starvation_s:
            return None
        tickets = [t for t in (queue.popleft() for _ in range(min(self._capacity(), len(queue)))) if t.live(now)]
        if not tickets:
            return None
        self._last_turn[priority] = now
        return StartDecode(tickets, priority)

    def _take(
        self, queue: collections.deque[Ticket], make, now: float, same_class: Callable[[Ticket], bool]
    ) -> tuple[Work | None, float | None]:
        """A batch from `queue` once it is full, or its first ticket has waited its window and no
        ticket of its class that arrived within the window is still in preparation; otherwise how
        long until then (None: until a ticket arrives). This class holds the device meanwhile."""
        while queue and not queue[0].live(now):
            queue.popleft()
        if not queue:
            return None, None
        cap = self._capacity()
        waited = now - queue[0].enqueued
        if len(queue) < cap and waited < self._window_s:
            return None, self._window_s - waited
        closes = queue[0].submitted + self._window_s
        if len(queue) < cap and any(same_class(t) and t.submitted <= closes for t in self._preparing):
            return None, None
        tickets = [t for t in (queue.popleft() for _ in range(min(cap, len(queue)))) if t.live(now)]
        return (make(tickets), None) if tickets else (None, 0.0)

    # ------------------------------------------------------------------ shutdown

    def close(self, error: EngineError) -> list[Ticket]:
        """Stops `next()` and fails every queued or decoding ticket with `error`; returns them."""
        with self._cond:
            self._closed = error
            dropped = list(self._actions)
            for q in self._subtasks.values():
                dropped += q
                q.clear()
            self._actions.clear()
            for job in [*self._followups, *(j for j in self._decoding.values() if j is not None)]:
                dropped += job.tickets
            self._followups.clear()
            self._decoding = {"action": None, "refresh": None}
            self._cond.notify_all()
        for t in dropped:
            fail(t, error)
        return dropped

    def depth(self) -> dict[str, int]:
        """Queued tickets per class (for `info()`)."""
        with self._cond:
            return {
                "actions": len(self._actions),
                "subtasks": len(self._subtasks["action"]),
                "refreshes": len(self._subtasks["refresh"]),
                "followups": len(self._followups),
            }
