"""The policy server's `--rerun`: what the model received and answered, per robot session, under
`server/<session>/` beside the robots' own view (`robots.run --rerun`).

The server knows no robot tick, so its `step` timeline is the session's count of results (its
`time` timeline lines it up with the robots'): per result the cameras as the model received them
(resized on the host, before the device), the state, the subtask it decoded (a refresh's marked),
the chunk it planned (one tensor, horizon x dims) and the engine's latency. It hangs on the
service's `on_result`, on the event loop, and only enqueues (`RerunSink`); the device thread never
sees it.
"""

from __future__ import annotations

import collections

from policy.request import InferenceRequest, InferenceResult
from runtime.rerun_sink import RerunSink

# Sessions whose result count is remembered; past it the least recent one starts again from 0 (a
# session table holds at most --max-sessions, but keys come and go over a day).
MAX_COUNTED = 4096


class ServerLog:
    def __init__(self, sink: RerunSink):
        self.sink = sink
        self._counts: collections.OrderedDict[str, int] = collections.OrderedDict()

    def __call__(self, session: str, request: InferenceRequest, result: InferenceResult) -> None:
        """A `PolicyService` `on_result`."""
        step = self._counts.pop(session, 0) + 1
        self._counts[session] = step
        if len(self._counts) > MAX_COUNTED:
            self._counts.popitem(last=False)
        sink, obs = self.sink, request.observation
        sink.log_images(session, step, obs.images, None)  # prepared: at the model's input resolution
        if obs.state is not None:
            sink.log_state(session, step, obs.state)
        if result.subtask is not None:
            refresh = request.priority == "refresh"
            sink.log_subtask(session, step, f"{result.subtask} (refresh)" if refresh else result.subtask)
        if result.actions is not None:
            sink.log_chunk(session, step, result.actions)
        sink.log_latency(session, step, result.timing["total_ms"])
