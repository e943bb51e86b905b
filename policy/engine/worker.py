"""The device thread: runs what the scheduler picks, one batch at a time, and answers the requests.

Only this thread touches the device. It stacks prepared `Row`s, puts them on the device, runs a
compiled executable and turns the outputs into `InferenceResult`s. A failure inside one batch fails
exactly that batch's requests (`EngineError` code `internal`, logged with its traceback) and the
thread goes on with the next. A row whose actions come out NaN or infinite fails alone, the
same way: a robot must never execute such a chunk, and its batch mates are answered as usual.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable

import jax
import numpy as np

from policy.engine.executables import Executables
from policy.engine.host_prep import HostPrep
from policy.engine.scheduler import (
    ActionBatch,
    DecodeJob,
    FollowUp,
    Row,
    Scheduler,
    Segment,
    StartDecode,
    Ticket,
    Work,
    fail,
    stack,
)
from policy.model import decoding, pi05, rtc
from policy.normalize import Normalizer
from policy.request import EngineError, InferenceResult

log = logging.getLogger(__name__)


class DeviceWorker:
    """Executes work items on one device; `run()` is the device thread's body."""

    def __init__(
        self,
        executables: Executables,
        scheduler: Scheduler,
        prep: HostPrep,
        normalizer: Normalizer,
        robot_action_dim: int,
        num_steps: int,
        clock: Callable[[], float],
    ):
        self.x = executables
        self.scheduler = scheduler
        self.prep = prep
        self.normalizer = normalizer
        self.robot_action_dim = robot_action_dim
        self.num_steps = num_steps
        self.clock = clock
        # (phase, real rows) -> executed batches: how well requests are being batched.
        self.batch_counts: collections.Counter[tuple[str, int]] = collections.Counter()
        self.failed_batches = 0
        self.nonfinite_rows = 0

    def run(self) -> None:
        while (work := self.scheduler.next()) is not None:
            try:
                self.execute(work)
            except Exception as e:
                self.failed_batches += 1
                tickets = _tickets(work)
                log.exception(
                    "%s of %d request(s) failed; answering them `internal`", type(work).__name__, len(tickets)
                )
                if isinstance(work, Segment | StartDecode):
                    priority = work.job.priority if isinstance(work, Segment) else work.priority
                    self.scheduler.decoding(None, priority)
                for t in tickets:
                    fail(t, EngineError(f"inference failed inside the model: {type(e).__name__}: {e}"))

    def execute(self, work: Work) -> None:
        if isinstance(work, ActionBatch):
            self._actions(work.tickets)
        elif isinstance(work, StartDecode):
            self._start_decode(work)
        elif isinstance(work, Segment):
            self._segment(work.job)
        elif isinstance(work, FollowUp):
            self._follow_up(work.job)
        else:
            raise TypeError(f"unknown work {work!r}")

    # ------------------------------------------------------------------ phases

    def _actions(self, tickets: list[Ticket]) -> None:
        self._started(tickets)
        b = self.x.bucket_for(len(tickets))
        rows = stack([t.row for t in tickets], b)
        obs = self._put(pi05.Observation(rows.images, rows.image_mask, rows.tokens, rows.token_mask))
        start = time.perf_counter()
        actions = np.asarray(self.x.run("action", b, obs, self._put(rows.seed), self._steps(), self._guide(rows)))
        ms = (time.perf_counter() - start) * 1e3
        self.batch_counts[("action", len(tickets))] += 1
        for i, t in enumerate(tickets):
            t.action_ms = ms
            self._answer(t, actions[i], i, len(tickets))

    def _start_decode(self, work: StartDecode) -> None:
        tickets = work.tickets
        self._started(tickets)
        b = self.x.bucket_for(len(tickets))
        rows = stack([t.row for t in tickets], b)
        obs = self._put(pi05.Observation(rows.images, rows.image_mask, rows.tokens, rows.token_mask))
        job = DecodeJob(work.priority, tickets, b, rows, started=time.perf_counter())
        job.state, job.image_tokens = self.x.run(
            "subtask_start", b, obs, self._put(rows.seed), self._put(rows.limit), self._put(rows.temperature)
        )
        self.batch_counts[("subtask", len(tickets))] += 1
        self.scheduler.decoding(job, work.priority)
        self._finish_if_done(job)

    def _segment(self, job: DecodeJob) -> None:
        job.state = self.x.run("subtask_segment", job.bucket, job.state)  # the old state is donated
        job.segments += 1
        self._finish_if_done(job)

    def _finish_if_done(self, job: DecodeJob) -> None:
        if int(job.state.step) < self.x.max_steps and not np.asarray(job.state.done).all():
            return
        tokens = np.asarray(job.state.tokens)
        lengths = decoding.lengths(tokens, job.rows.limit, self.x.max_steps)
        job.state = None  # frees the KV cache
        ms = (time.perf_counter() - job.started) * 1e3
        tokenizer = self.prep.tokenizer
        for i, t in enumerate(job.tickets):
            ids = [int(v) for v in tokens[i, : lengths[i]]]
            t.subtask_tokens, t.subtask, t.subtask_ms = tuple(ids), tokenizer.decode(ids).strip(), ms
            if t.request.kind == "subtask" and not t.future.done():
                self._answer(t, None, i, len(job.tickets))
        if any(t.request.kind == "infer" and not t.future.done() for t in job.tickets):
            self.scheduler.follow_up(job)
        else:
            self.scheduler.decoding(None, job.priority)

    def _follow_up(self, job: DecodeJob) -> None:
        """The two-stage rows' actions on the job's image tokens: SigLIP does not run again."""
        now = self.clock()
        rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for i, t in enumerate(job.tickets):
            if t.request.kind != "infer" or not t.live(now):
                continue
            try:
                rows[i] = self.prep.action_tokens(t)
            except ValueError as e:  # the prompt with its subtask is over the token budget
                fail(t, e)
        if not rows:
            return
        filler = next(iter(rows.values()))  # other positions are padding; their outputs are ignored
        tokens = np.stack([rows.get(i, filler)[0] for i in range(job.bucket)])
        token_mask = np.stack([rows.get(i, filler)[1] for i in range(job.bucket)])
        obs = self._put(pi05.Observation(None, job.rows.image_mask, tokens, token_mask))
        start = time.perf_counter()
        image_tokens, job.image_tokens = job.image_tokens, None
        out = self.x.run(
            "action_from_image_tokens",
            job.bucket,
            image_tokens,
            obs,
            self._put(job.rows.seed),
            self._steps(),
            self._guide(job.rows),  # the two-stage rows' guidance, prepared with their first phase
        )
        actions = np.asarray(out)
        ms = (time.perf_counter() - start) * 1e3
        self.batch_counts[("action", len(rows))] += 1
        for i in rows:
            t = job.tickets[i]
            t.action_ms = ms
            self._answer(t, actions[i], i, len(job.tickets))

    # ------------------------------------------------------------------ helpers

    def _put(self, tree):
        return jax.device_put(tree, self.x.device)

    def _steps(self) -> jax.Array:
        return self._put(np.int32(self.num_steps))

    def _guide(self, rows: Row) -> rtc.Guide:
        return self._put(rtc.Guide(rows.guide, rows.guide_weights, rows.guide_beta))

    def _started(self, tickets: list[Ticket]) -> None:
        now = self.clock()
        for t in tickets:
            t.started = now

    def _answer(self, t: Ticket, model_actions: np.ndarray | None, row: int = 0, batch: int = 1) -> None:
        """Resolves the ticket with its result; `model_actions` is its row `row` of a batch of `batch`."""
        actions = None
        if model_actions is not None:
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught just below
                actions = self.normalizer.unnormalize_actions(model_actions)[:, : self.robot_action_dim]
            if not (np.isfinite(model_actions).all() and np.isfinite(actions).all()):
                self._fail_nonfinite(t, model_actions, actions, row, batch)
                return
        now = self.clock()
        started = t.started if t.started is not None else now
        timing = {
            "total_ms": (now - t.submitted) * 1e3,
            "queue_ms": (started - t.submitted) * 1e3,
            "subtask_ms": t.subtask_ms,
            "action_ms": t.action_ms,
        }
        returned = None  # a copy: the caller owns it (the batch's array is the device's, read-only)
        if model_actions is not None and t.request.return_model_actions:
            returned = np.array(model_actions, np.float32)
        result = InferenceResult(actions, t.subtask, t.subtask_tokens, t.state, timing, returned, batch)
        try:
            t.future.set_result(result)
        except concurrent.futures.InvalidStateError:  # its waiter gave up (deadline) and cancelled it
            pass

    def _fail_nonfinite(self, t: Ticket, model_actions: np.ndarray, actions: np.ndarray, row: int, batch: int) -> None:
        """Answers `internal` for a row whose chunk holds NaN or infinity (in the model's output, or
        after unnormalizing it), naming the row and the first bad step and dim."""
        self.nonfinite_rows += 1
        where, values = ("model", model_actions) if not np.isfinite(model_actions).all() else ("robot", actions)
        step, dim = (int(k) for k in np.argwhere(~np.isfinite(values))[0])
        log.error(
            "row %d of a batch of %d came out with non-finite actions (%s space, step %d, dim %d); answering it "
            "`internal`",
            row,
            batch,
            where,
            step,
            dim,
        )
        fail(
            t,
            EngineError(
                f"the model's actions for this request (row {row} of its batch of {batch}) are not finite: NaN or "
                f"infinity at step {step}, dim {dim} in {where} space; not answered as a success"
            ),
        )


def _tickets(work: Work) -> list[Ticket]:
    if isinstance(work, ActionBatch | StartDecode):
        return work.tickets
    return work.job.tickets
