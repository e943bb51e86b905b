"""Soak: many DEALER, JSON and openpi clients against one policy server for a bounded time.

`python -m runtime.policy_server` runs in its own process as deployed (the tiny model with random
weights, or `--fixed-reply`). Each kind of client runs in a process of its own, every client
sending its next request as soon as its last one is answered:

- DEALER: `PolicyClient.start_infer` with `--dealer-in-flight` requests in flight (a control loop
  that pipelines its chunks), three 224x224 cameras, a state and a timestamp;
- JSON: `JsonApiClient` with the same observation as nested lists;
- openpi: openpi-client's `WebsocketClientPolicy` with a DROID observation.

Every reply is matched to its request: each request carries a state drawn for it alone, which the
server echoes (ZMQ and JSON, with the DEALER's timestamp as `obs_timestamp`); an openpi reply must
be DROID's 50x8 chunk (openpi's protocol carries no id: its replies come in order on a connection).
Reported: requests served and errors by code per client kind, replies that did not match, p50/p99,
and the resident memory of the server and its gateway processes, sampled every second after the
warm-up (the first and the last third compared by their medians). Afterwards every client has left:
the server must hold no sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import numpy as np

from bench.report import percentiles_ms, write_section
from bench.transport_latency import (
    ACTION_DIM,
    DROID_ACTION_DIM,
    HORIZON,
    IMAGE_HW,
    PROMPT,
    complaint_counts,
    droid_observation,
    wait_compiled,
)
from robots.adapters import BASE, LEFT_WRIST, RIGHT_WRIST
from tests.support.server_process import ServerProcess
from transport.errors import RequestTimeout, TransportError
from transport.messages import ACTIONS
from transport.ws_client import JsonApiClient, build_request
from transport.zmq_client import PolicyClient

CAMERAS = (BASE, LEFT_WRIST, RIGHT_WRIST)
KINDS = ("DEALER", "JSON", "openpi")
nan = float("nan")

# One finished request: (kind, client, when it was sent on CLOCK_MONOTONIC, round trip s, outcome).
# The outcome is "ok", an error code, or "mismatch: ..." for a reply that is not its request's.
Sample = tuple[str, int, float, float, str]


def _images(client: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(client)
    return {name: rng.integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8) for name in CAMERAS}


def _state(client: int, seq: int, dim: int) -> np.ndarray:
    """This request's own state, so that the echo in its reply names it."""
    return np.random.default_rng((client, seq)).uniform(-1, 1, dim).astype(np.float32)


def _mismatch(echoed: Any, state: np.ndarray) -> str | None:
    if echoed is None or not np.array_equal(np.asarray(echoed, np.float32), state):
        return "mismatch: the reply's state is another request's"
    return None


def _shape(actions: Any, shape: tuple[int, int]) -> str | None:
    if np.shape(actions) != shape:
        return f"mismatch: actions of shape {np.shape(actions)}"
    if not np.isfinite(np.asarray(actions, np.float64)).all():
        return "mismatch: actions not finite"
    return None


def _error_code(e: BaseException) -> str:
    if isinstance(e, RequestTimeout):
        return "no reply (client timeout)"
    if isinstance(e, TransportError):
        return e.code
    if isinstance(e, RuntimeError) and str(e).startswith("Error in inference server"):
        # openpi's protocol: the server's text frame "Error: <code>: <message>", then 1011.
        text = str(e).split("\n", 1)[-1].removeprefix("Error: ")
        return text.split(":", 1)[0]
    return type(e).__name__


# ----------------------------------------------------------------------------- client processes


class Recorder:
    """A client process's finished requests, and a count of the served ones that the main process
    reads to end the warm-up."""

    def __init__(self, served: Any):
        self.samples: list[Sample] = []
        self._served = served

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        if sample[4] == "ok":
            with self._served.get_lock():
                self._served.value += 1


def _dealer_client(
    endpoint: str, client: int, state_dim: int, in_flight: int, stop: threading.Event, out: Recorder
) -> None:
    """Keeps `in_flight` requests in flight, as a control loop that pipelines its chunks does."""
    images = _images(client)
    waiting: collections.deque[tuple[Any, np.ndarray, float, float]] = collections.deque()
    with PolicyClient(endpoint, f"soak-{client}", timeout_s=30.0, retries=0) as policy:
        seq = 0
        while not stop.is_set() or waiting:
            while not stop.is_set() and len(waiting) < in_flight:
                seq += 1
                state, ts = _state(client, seq, state_dim), time.time()
                future = policy.start_infer(images, PROMPT, state, ts, generate_subtask=False)
                waiting.append((future, state, ts, time.monotonic()))
            future, state, ts, sent = waiting.popleft()
            try:
                reply = policy.wait(future)
                outcome = (
                    _shape(reply[ACTIONS], (HORIZON, ACTION_DIM))
                    or _mismatch(reply.get("state"), state)
                    or (None if reply.get("obs_timestamp") == ts else "mismatch: obs_timestamp is another request's")
                    or "ok"
                )
            except Exception as e:  # every failure is counted by its code; the client goes on
                outcome = _error_code(e)
            out.add(("DEALER", client, sent, time.monotonic() - sent, outcome))
        policy.bye()


def _openpi_client(host: str, port: int, client: int, stop: threading.Event, out: Recorder) -> None:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    images = _images(client)
    policy = WebsocketClientPolicy(host=host, port=port)
    seq = 0
    while not stop.is_set():
        seq += 1
        obs = droid_observation(images, _state(client, seq, 8))
        sent = time.monotonic()
        try:
            outcome = _shape(policy.infer(obs)["actions"], (HORIZON, DROID_ACTION_DIM)) or "ok"
        except Exception as e:  # the server closes the connection after an error: open a new one
            outcome = _error_code(e)
            policy._ws.close()
            policy = WebsocketClientPolicy(host=host, port=port)
        out.add(("openpi", client, sent, time.monotonic() - sent, outcome))
    policy._ws.close()


async def _json_client(url: str, client: int, state_dim: int, stop: threading.Event, out: Recorder) -> None:
    images = {name: image.tolist() for name, image in _images(client).items()}
    async with JsonApiClient(url, timeout_s=60.0, retries=0) as api:
        seq = 0
        while not stop.is_set():
            seq += 1
            state = _state(client, seq, state_dim)
            request = build_request({}, PROMPT, state, generate_subtask=False)
            request["images"] = images
            sent = time.monotonic()
            try:
                reply = await api.request(request)
                outcome = (
                    _shape(np.asarray(reply["actions"])[0], (HORIZON, ACTION_DIM))
                    or _mismatch(reply.get("state"), state)
                    or "ok"
                )
            except Exception as e:  # every failure is counted by its code; the client goes on
                outcome = _error_code(e)
            out.add(("JSON", client, sent, time.monotonic() - sent, outcome))


@dataclasses.dataclass(frozen=True)
class Settings:
    duration_s: float = 60.0
    warmup_s: float = 30.0
    # Eight requests in flight in all, one batch of the default --max-batch: on two CPU cores a
    # batch of eight takes the tiny model about 1.5 s, so more would wait past the 5 s deadline.
    dealers: int = 2
    dealer_in_flight: int = 2
    json: int = 2
    openpi: int = 2
    max_batch: int = 8
    deadline_s: float = 5.0  # the server's --deadline: on a busy CPU a batch can take longer than 5 s
    fixed_reply: bool = False

    def count(self, kind: str) -> int:
        return {"DEALER": self.dealers, "JSON": self.json, "openpi": self.openpi}[kind]

    def flags(self) -> str:
        return (
            f"--duration {self.duration_s:g} --warmup {self.warmup_s:g} --dealers {self.dealers} "
            f"--dealer-in-flight {self.dealer_in_flight} --json {self.json} --openpi {self.openpi} "
            f"--max-batch {self.max_batch} --deadline {self.deadline_s:g}"
            + (" --fixed-reply" if self.fixed_reply else "")
        )


@dataclasses.dataclass(frozen=True)
class Endpoints:
    """What a client process needs to know of the server."""

    router: str
    json: str
    openpi_port: int
    state_dim: int


@dataclasses.dataclass
class Outcome:
    """What one soak run observed."""

    samples: list[Sample]
    warmup_s: float
    measured_from: float
    end: float
    rss: list[dict[str, float]]  # each second of the measured window
    after: dict[str, Any]  # the server's `ping` once every client has left
    alive: bool
    exit_code: int | None
    complaints: dict[str, int]
    complaint_lines: list[str]
    load: tuple[float, float]
    config: str


def _client_process(
    kind: str, endpoints: Endpoints, settings: Settings, clients: range, go: Any, stop: Any, served: Any, results: Any
) -> None:
    """One process per client kind: its clients on threads (blocking clients) or one event loop (JSON)."""
    logging.basicConfig(level=logging.WARNING)
    out = Recorder(served)
    halt = threading.Event()
    go.wait()
    if kind == "JSON":

        async def main() -> None:
            tasks = [
                asyncio.create_task(_json_client(endpoints.json, c, endpoints.state_dim, halt, out)) for c in clients
            ]
            await asyncio.to_thread(stop.wait)
            halt.set()
            await asyncio.gather(*tasks)

        asyncio.run(main())
    else:

        def run(c: int) -> None:
            if kind == "DEALER":
                _dealer_client(endpoints.router, c, endpoints.state_dim, settings.dealer_in_flight, halt, out)
            else:
                _openpi_client("127.0.0.1", endpoints.openpi_port, c, halt, out)

        threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        stop.wait()
        halt.set()
        for t in threads:
            t.join(120)
    results.put((kind, out.samples))


# ----------------------------------------------------------------------------- the run


def run(settings: Settings) -> Outcome:
    extra = ["--max-batch", str(settings.max_batch), "--deadline", str(settings.deadline_s)]
    extra += ["--fixed-reply"] if settings.fixed_reply else []
    ctx = multiprocessing.get_context("spawn")
    go, stop, results, served = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Value("q", 0)
    with ServerProcess(*extra) as server:
        with PolicyClient(server.router, "soak-probe", timeout_s=30.0) as probe:
            wait_compiled(probe)
            model = probe.ping()["model"]
            endpoints = Endpoints(server.router, server.ws, server.ports[3], model.get("state_dim") or 8)
            first = 0
            procs = []
            for kind in KINDS:
                clients = range(first, first + settings.count(kind))
                first += len(clients)
                if clients:
                    args = (kind, endpoints, settings, clients, go, stop, served, results)
                    procs.append(ctx.Process(target=_client_process, args=args))
                    procs[-1].start()
            go.set()
            started = time.monotonic()
            # The warm-up lasts its time and until every client has had two replies on average (the
            # first batches of each size allocate), but no more than four times its time.
            while time.monotonic() - started < settings.warmup_s or (
                served.value < 2 * first and time.monotonic() - started < 4 * settings.warmup_s
            ):
                time.sleep(0.5)
            measured_from = time.monotonic()
            end = measured_from + settings.duration_s
            load_start = os.getloadavg()[0]
            rss: list[dict[str, float]] = []
            while time.monotonic() < end:
                rss.append(server.rss_mb())
                time.sleep(1.0)
            load = (load_start, os.getloadavg()[0])
            stop.set()
            samples: list[Sample] = []
            for _ in procs:
                samples += results.get(timeout=300)[1]
            for proc in procs:
                proc.join(60)
            time.sleep(1.0)  # the gateways' `bye` for each closed connection
            after = probe.ping()["server"]
        alive = server.proc.poll() is None
        complaints, complaint_lines = complaint_counts(server), server.complaints()
        exit_code = server.stop(signal.SIGTERM)
    return Outcome(
        samples, measured_from - started, measured_from, end, rss, after, alive, exit_code, complaints,
        complaint_lines, load, model.get("config", "?"),
    )  # fmt: skip


def report(settings: Settings, o: Outcome) -> str:
    seconds = o.end - o.measured_from
    window = [s for s in o.samples if o.measured_from <= s[2] < o.end]
    rows = []
    mismatched = collections.Counter(s[4] for s in window if s[4].startswith("mismatch"))
    for kind in KINDS:
        if not settings.count(kind):
            continue
        mine = [s for s in window if s[0] == kind]
        ok = [s[3] for s in mine if s[4] == "ok"]
        errors = collections.Counter(s[4] for s in mine if s[4] != "ok" and not s[4].startswith("mismatch"))
        p50, p99 = percentiles_ms(ok) if ok else (float("nan"), float("nan"))
        rows.append(
            f"| {kind} | {settings.count(kind)} | {len(mine)} | {len(ok)} | {len(ok) / seconds:.1f} | "
            f"{', '.join(f'{code} {n}' for code, n in errors.most_common()) or 'none'} | "
            f"{sum(1 for s in mine if s[4].startswith('mismatch'))} | {p50:.1f} | {p99:.1f} |"
        )
    warm_up = sum(1 for s in o.samples if s[2] < o.measured_from)
    # A leak raises the typical size; a parser's transient buffers only move the peak. So the first
    # and the last third of the window are compared by their medians.
    third = max(1, len(o.rss) // 3)
    names = list(o.rss[0])

    def median(samples: list[dict[str, float]], name: str | None = None) -> float:
        return float(np.median([sum(r.values()) if name is None else r.get(name, nan) for r in samples]))

    early, late = o.rss[:third], o.rss[-third:]
    mem_rows = [
        f"| {name} | {o.rss[0][name]:.0f} | {median(early, name):.0f} | {median(late, name):.0f} | "
        f"{o.rss[-1].get(name, nan):.0f} | {max(r.get(name, 0.0) for r in o.rss):.0f} | "
        f"{median(late, name) - median(early, name):+.0f} |"
        for name in names
    ]
    total_early, total_late = median(early), median(late)
    grew = total_late - total_early > max(16.0, 0.05 * total_early)
    backend = "`--fixed-reply` (no model)" if settings.fixed_reply else f"`{o.config}` (random weights, CPU)"
    mismatch_text = "yes" if not mismatched else "NO: " + ", ".join(f"{n} {text}" for text, n in mismatched.items())
    body = (
        f"`python -m runtime.policy_server --max-batch {settings.max_batch} --deadline {settings.deadline_s:g}` "
        f"with {backend}, in its own process with "
        "its gateway processes. Every client sends its next request as soon as its last is answered, each kind in a "
        f"process of its own: DEALER, `PolicyClient.start_infer` with {settings.dealer_in_flight} requests in "
        "flight (a control loop that pipelines its chunks), three 224x224 cameras + state + timestamp; JSON, "
        "`JsonApiClient`, the same as nested lists; openpi, openpi-client's `WebsocketClientPolicy`, a DROID "
        f"observation. Measured for {seconds:.0f} s after a warm-up of {o.warmup_s:.0f} s ({warm_up} "
        "requests, not counted). A reply matches when it echoes its own request's state (and, over ZMQ, its "
        "timestamp as `obs_timestamp`) and has the right shape. 1-minute load average "
        f"{o.load[0]:.2f} at the start of the measured window, {o.load[1]:.2f} at its end (2 cores).\n\n"
        "| clients | count | requests | served | served/s | errors by code | replies not matching | p50 ms | p99 ms |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"Resident memory (VmRSS), MB, sampled every second of the measured window ({len(o.rss)} samples); "
        "growth is the median of its last third less the median of its first:\n\n"
        "| process | after warm-up | first third | last third | end | peak | growth |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(mem_rows) + "\n\n"
        f"- all replies matched their requests: **{mismatch_text}**\n"
        f"- memory after the warm-up, all processes: {total_early:.0f} MB in the first third, {total_late:.0f} MB "
        f"in the last: **{'GREW' if grew else 'no growth'}** ({total_late - total_early:+.0f} MB; threshold "
        "max(16 MB, 5%))\n"
        f"- after every client left: the server held {o.after.get('sessions')} sessions "
        f"({o.after.get('refreshing')} refreshing; {o.after.get('expired_sessions')} had expired); the server process "
        f"was {'alive' if o.alive else 'DEAD'} and exited with {o.exit_code} on SIGTERM\n"
        f"- server log lines at WARNING or above: "
        f"{', '.join(f'{k} {v}' for k, v in o.complaints.items()) or 'none'}\n"
    )
    if o.complaint_lines:
        body += "\nThe last of them:\n\n```\n" + "\n".join(line[:300] for line in o.complaint_lines[-5:]) + "\n```\n"
    name = "soak_fixed_reply" if settings.fixed_reply else "soak"
    title = "Soak: many clients of every kind, " + ("fixed reply" if settings.fixed_reply else o.config)
    return write_section(
        name, title, body, f"python -m bench.soak {settings.flags()}", packages=("jax", "jaxlib", "pyzmq", "websockets")
    )


def main() -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="seconds measured after warm-up")
    parser.add_argument("--warmup", type=float, default=defaults.warmup_s, help="seconds of load before measuring")
    parser.add_argument("--dealers", type=int, default=defaults.dealers)
    parser.add_argument("--dealer-in-flight", type=int, default=defaults.dealer_in_flight)
    parser.add_argument("--json", type=int, default=defaults.json)
    parser.add_argument("--openpi", type=int, default=defaults.openpi)
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="the server's --max-batch")
    parser.add_argument("--deadline", type=float, default=defaults.deadline_s, help="the server's --deadline, s")
    parser.add_argument("--fixed-reply", action="store_true", help="no model: the transports and the service alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings(
        args.duration, args.warmup, args.dealers, args.dealer_in_flight, args.json, args.openpi, args.max_batch,
        args.deadline, args.fixed_reply,
    )  # fmt: skip
    print(report(settings, run(settings)))


if __name__ == "__main__":
    main()
