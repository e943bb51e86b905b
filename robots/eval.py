"""`python -m robots.eval`: the pick-and-place task through the whole stack, episode after episode.

    python -m robots.eval [--server 127.0.0.1:5555] --episodes 50 --seed 0 [--json eval.json] [--png eval.png]
        [--latency-ms 200] [--blend rtc]

Each episode draws a new scene (`robots.tasks`), and drives the simulated arm with a fresh control
loop and client: the server over ZMQ, subtask refreshes on its PUB, the action-chunk buffer, the
fixed-rate loop. It ends at the task's success or after `--max-episode-s`. `--latency-ms` delays
every chunk reply by that much on the robot's side, as a slower inference would.

The JSON summary has flat keys: `success_rate`, `episodes`, `successes`, `mean_time_to_success_s`,
`subtask_transitions_mean` (changes of the model's subtask text per episode),
`subtask_phase_agreement` (the share of ticks whose subtask names the simulator's phase, for the
named block and plate, wherever it says they are), `subtask_text_agreement` (the share whose subtask
text is the simulator's exactly, the place included),
`subtask_order_rate` (episodes whose subtasks went through the phases in order), and the loop's own
counts summed or averaged over episodes (written with `--json`; the success rate is always printed).
The PNG (`--png`, or beside `--json`) shows the first few episodes: the gripper's path over the
overhead view, and the simulator's phase beside the model's subtask over time, on an axis of phases.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from robots import plot
from robots.adapters import BASE
from robots.run import default_pub, endpoint_arg
from robots.server_model import Mismatch, ServerModel, fit_sim
from robots.sim import BASE_VIEW, CAMERAS, SimArm
from robots.tasks import PHASES, PickPlaceTask, Scene, without_place
from runtime.robot.chunk_buffer import BLENDS, BufferSettings
from runtime.robot.control_loop import ControlLoop, LoopSettings, LoopStatus
from runtime.robot.virtual_time import InjectedLatency, VirtualClock
from transport.errors import TransportError
from transport.zmq_client import PolicyClient

log = logging.getLogger("robots.eval")

EVAL_TASK = "pick-place"


class DelayedClient:
    """A loop client whose chunk replies arrive `delay_s` after they were sent at the earliest:
    injected inference latency, on the robot's side. Everything else goes to the wrapped client."""

    def __init__(self, client: Any, delay_s: float, clock: Callable[[], float] = time.monotonic, sleep=time.sleep):
        self._client = client
        self._delay_s = delay_s
        self._clock = clock
        self._sleep = sleep
        self._pending: list[tuple[concurrent.futures.Future, float, concurrent.futures.Future]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def start_infer(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        inner = self._client.start_infer(*args, **kwargs)
        outer: concurrent.futures.Future = concurrent.futures.Future()
        self._pending.append((inner, self._clock() + self._delay_s, outer))
        return outer

    def poll(self, timeout_s: float = 0.0) -> None:
        self._client.poll(timeout_s)
        self._release()

    def wait(self, future: concurrent.futures.Future) -> dict[str, Any]:
        for inner, due, outer in list(self._pending):
            if outer is future:
                try:
                    self._client.wait(inner)
                except Exception:  # handed over to `future` below
                    pass
                remaining = due - self._clock()
                if remaining > 0:
                    self._sleep(remaining)
        self._release()
        return future.result()

    def _release(self) -> None:
        now = self._clock()
        for item in list(self._pending):
            inner, due, outer = item
            if outer.cancelled():
                inner.cancel()
                self._pending.remove(item)
            elif inner.done() and now >= due:
                self._pending.remove(item)
                if inner.cancelled():
                    outer.cancel()
                elif inner.exception() is not None:
                    outer.set_exception(inner.exception())
                else:
                    outer.set_result(inner.result())


@dataclasses.dataclass
class Episode:
    """What one episode did, tick by tick (times in simulated seconds from the first tick)."""

    index: int
    prompt: str
    scene: Scene  # at the start
    q0: np.ndarray
    success: bool = False
    time_to_success_s: float | None = None
    times: list[float] = dataclasses.field(default_factory=list)
    ee: list[np.ndarray] = dataclasses.field(default_factory=list)
    phases: list[str] = dataclasses.field(default_factory=list)
    subtasks: list[str | None] = dataclasses.field(default_factory=list)
    expected: list[str] = dataclasses.field(default_factory=list)  # the phase's subtask text
    loop: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def transitions(self) -> int:
        seen = [s for s in self.subtasks if s is not None]
        return sum(a != b for a, b in itertools.pairwise(seen))

    def subtask_phases(self, task: PickPlaceTask) -> list[int]:
        """The phase index of each tick's subtask text, the place it names aside (-1 for text that
        names no phase of this episode's task)."""
        texts = {without_place(task.subtask(self.scene, p)): i for i, p in enumerate(PHASES)}
        return [texts.get(without_place(s), -1) if s is not None else -1 for s in self.subtasks]

    def in_order(self, task: PickPlaceTask) -> bool:
        """The subtasks named at least two phases, and never went back to an earlier one."""
        indices = [i for i in self.subtask_phases(task) if i >= 0]
        distinct = [i for j, i in enumerate(indices) if j == 0 or i != indices[j - 1]]
        return len(distinct) >= 2 and all(a < b for a, b in itertools.pairwise(distinct))


class Recorder:
    """The loop's per-tick callback: records the arm and the subtask, and stops the loop at success."""

    def __init__(self, arm: SimArm, episode: Episode, hz: float):
        self.arm = arm
        self.episode = episode
        self.hz = hz
        self.loop: ControlLoop | None = None

    def __call__(self, status: LoopStatus) -> None:
        ep, arm = self.episode, self.arm
        t = status.step / self.hz
        phase = arm.phase
        ep.times.append(t)
        ep.ee.append(arm.joint_positions()[-1])
        ep.phases.append(phase)
        ep.subtasks.append(status.subtask)
        ep.expected.append(arm.subtask)
        if arm.success and not ep.success:
            ep.success, ep.time_to_success_s = True, t
            if self.loop is not None:
                self.loop.stop()


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    router: str
    pub: str
    episodes: int
    seed: int
    image_size: int
    cameras: tuple[str, ...] = CAMERAS
    max_episode_s: float = 10.0
    latency_ms: float = 0.0
    loop: LoopSettings = dataclasses.field(default_factory=LoopSettings)
    timeout_s: float = 60.0
    connect_timeout_s: float = 3.0
    # On virtual time (`runtime.robot.virtual_time`): replies land exactly latency_ms later in control
    # steps, however long the model takes, so the outcome does not depend on the machine.
    virtual_time: bool = False


def run_episode(settings: EvalSettings, task: PickPlaceTask, index: int) -> Episode:
    seed = int(np.random.SeedSequence([settings.seed, index]).generate_state(1)[0])
    arm = SimArm(
        control_hz=settings.loop.hz, image_size=settings.image_size, seed=seed, task=task, cameras=settings.cameras
    )
    episode = Episode(index, arm.prompt, arm.scene.copy(), arm.q.copy())
    recorder = Recorder(arm, episode, settings.loop.hz)
    real = PolicyClient(
        settings.router,
        f"eval-{settings.seed}-{index}",
        timeout_s=settings.timeout_s,
        connect_timeout_s=settings.connect_timeout_s,
    )
    client: Any = real
    try:
        buffer = dataclasses.replace(settings.loop.buffer, safe_action=arm.safe_action)
        loop_settings = dataclasses.replace(settings.loop, prompt=arm.prompt, buffer=buffer)
        if settings.virtual_time:
            # No refresh ticker runs on virtual time: each chunk request decodes its own subtask.
            clock = VirtualClock()
            steps = round(settings.latency_ms * settings.loop.hz / 1e3)
            client = InjectedLatency(client, arm, clock, steps, settings.loop.hz)
            loop_settings = dataclasses.replace(loop_settings, subtask_mode="per_chunk")
            loop = ControlLoop(arm, client, loop_settings, on_tick=recorder, clock=clock, sleep=clock.sleep)
        else:
            if settings.latency_ms > 0:
                client = DelayedClient(client, settings.latency_ms / 1e3)
            loop = ControlLoop(arm, client, loop_settings, settings.pub, on_tick=recorder)
        recorder.loop = loop
        episode.loop = loop.run(settings.max_episode_s)
    finally:
        real.close()
    return episode


def summarize(episodes: list[Episode], task: PickPlaceTask, settings: EvalSettings) -> dict[str, Any]:
    """Flat keys only: one number (or string) per key."""
    n = len(episodes)
    times = [e.time_to_success_s for e in episodes if e.success]
    ticks = sum(len(e.phases) for e in episodes)
    exact = sum(s == x for e in episodes for s, x in zip(e.subtasks, e.expected, strict=True))
    agree = sum(
        said == PHASES.index(p) for e in episodes for said, p in zip(e.subtask_phases(task), e.phases, strict=True)
    )

    def loop_sum(key: str) -> float:
        return float(sum(e.loop.get(key) or 0 for e in episodes))

    def loop_mean(key: str) -> float | None:
        values = [e.loop[key] for e in episodes if e.loop.get(key) is not None]
        return float(np.mean(values)) if values else None

    return {
        "success_rate": sum(e.success for e in episodes) / n if n else 0.0,
        "episodes": n,
        "successes": sum(e.success for e in episodes),
        "mean_time_to_success_s": float(np.mean(times)) if times else None,
        "subtask_transitions_mean": float(np.mean([e.transitions for e in episodes])) if n else 0.0,
        "subtask_transitions_total": sum(e.transitions for e in episodes),
        "subtask_phase_agreement": agree / ticks if ticks else 0.0,
        "subtask_text_agreement": exact / ticks if ticks else 0.0,
        "subtask_order_rate": sum(e.in_order(task) for e in episodes) / n if n else 0.0,
        "seed": settings.seed,
        "latency_ms": settings.latency_ms,
        "blend": settings.loop.buffer.blend,
        "subtask_mode": "per_chunk" if settings.virtual_time else settings.loop.subtask_mode,
        "virtual_time": settings.virtual_time,
        "max_episode_s": settings.max_episode_s,
        "ticks": ticks,
        "underruns": loop_sum("underruns"),
        "chunks_received": loop_sum("chunks_received"),
        "request_errors": loop_sum("request_errors"),
        "outages": loop_sum("outages"),
        "inference_delay_ms_p50": loop_mean("inference_delay_ms_p50"),
        "achieved_hz": loop_mean("achieved_hz"),
    }


def trajectory_panel(episode: Episode, task: PickPlaceTask, size: int = 240) -> Image.Image:
    """The gripper's path (white, ending in a ring) over the episode's first overhead view."""
    arm = SimArm(image_size=size, task=task)
    arm.q, arm.gripper, arm.scene = episode.q0, 0.0, episode.scene
    img = Image.fromarray(arm.render()[BASE])
    draw = ImageDraw.Draw(img)
    centre, half = BASE_VIEW
    pts = [((x - centre[0]) / (2 * half) * size + size / 2, (centre[1] - y) / (2 * half) * size + size / 2)
           for x, y in episode.ee]  # fmt: skip
    if len(pts) > 1:
        draw.line(pts, fill=(255, 255, 255), width=2)
    if pts:
        x, y = pts[-1]
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), outline=(0, 0, 0), width=2)
    verdict = f"success {episode.time_to_success_s:.2f} s" if episode.success else "no success"
    draw.text((4, 4), f"#{episode.index}: {verdict}", fill=(0, 0, 0))
    return img


def timeline_panel(episode: Episode, task: PickPlaceTask, size: tuple[int, int] = (560, 240)) -> Image.Image:
    t = np.asarray(episode.times)
    phase = np.array([PHASES.index(p) for p in episode.phases], float)
    said = np.array(episode.subtask_phases(task), float)
    said[said < 0] = np.nan  # no subtask yet, or one that names no phase
    return plot.line_chart(
        [plot.Series("simulator phase", t, phase), plot.Series("model subtask", t, said + 0.05)],
        f"{episode.prompt} | time, s",
        size,
        y_range=(-0.2, len(PHASES) - 0.8),
        y_labels=list(enumerate(PHASES)),
    )


def episodes_png(episodes: list[Episode], task: PickPlaceTask, path: Path, count: int) -> Path:
    rows = [plot.stack([trajectory_panel(e, task), timeline_panel(e, task)], columns=2) for e in episodes[:count]]
    return plot.save(plot.stack(rows), path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m robots.eval", description=__doc__.splitlines()[0])
    p.add_argument(
        "--server",
        type=endpoint_arg,
        default="tcp://127.0.0.1:5555",
        help="the server's ROUTER: host:port or tcp://... (default: the server's defaults, on this host)",
    )
    p.add_argument("--pub", type=endpoint_arg, default=None, help="the server's refresh PUB (default: ROUTER port + 1)")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the summary here")
    p.add_argument(
        "--png", type=Path, default=None, help="trajectories and subtask timelines (default: beside --json, if given)"
    )
    p.add_argument("--plot-episodes", type=int, default=4)
    p.add_argument("--latency-ms", type=float, default=0.0, help="injected delay of every chunk reply")
    p.add_argument(
        "--virtual-time",
        action="store_true",
        help="run the loop on virtual time (replies land --latency-ms later, whatever the machine; subtask per chunk)",
    )
    p.add_argument("--blend", choices=BLENDS, default="crossfade")
    p.add_argument("--crossfade-steps", type=int, default=8)
    p.add_argument("--request-when-left", type=int, default=15, help="actions left when the next chunk is requested")
    p.add_argument("--subtask", choices=("off", "per_chunk", "refresh"), default="refresh")
    p.add_argument("--refresh-interval", type=float, default=0.5, help="seconds between subtask refreshes")
    p.add_argument("--max-decoding-steps", type=int, default=12)
    p.add_argument("--hz", type=float, default=50.0)
    p.add_argument("--max-episode-s", type=float, default=10.0)
    p.add_argument("--image-size", type=int, default=None, help="camera resolution (default: the server model's)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds the first chunk may take (compiles)")
    p.add_argument("--connect-timeout", type=float, default=3.0)
    p.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper)
    return p


def fitted_arm(args: argparse.Namespace) -> SimArm:
    """The task's arm as the server's model takes it (its cameras, at its input resolution unless
    `--image-size`): what every episode's arm copies. Raises `Mismatch` where it cannot be."""
    with PolicyClient(args.server, "eval-probe", timeout_s=args.timeout, connect_timeout_s=args.connect_timeout) as c:
        model = ServerModel.from_ping(c.ping())
    return fit_sim(model, EVAL_TASK, args.image_size, args.hz)[0]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.latency_ms < 0 or args.max_episode_s <= 0:
        parser.error("--episodes must be >= 1, --latency-ms >= 0 and --max-episode-s > 0")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    task = PickPlaceTask()
    try:
        arm = fitted_arm(args)
        settings = EvalSettings(
            router=args.server,
            pub=args.pub or default_pub(args.server),
            episodes=args.episodes,
            seed=args.seed,
            image_size=arm.image_size,
            cameras=arm.cameras,
            max_episode_s=args.max_episode_s,
            latency_ms=args.latency_ms,
            loop=LoopSettings(
                hz=args.hz,
                buffer=BufferSettings(
                    request_when_left=args.request_when_left,
                    blend=args.blend,
                    crossfade_steps=args.crossfade_steps,
                ),
                subtask_mode=args.subtask,
                refresh_interval_s=args.refresh_interval,
                max_decoding_steps=args.max_decoding_steps,
            ),
            timeout_s=args.timeout,
            connect_timeout_s=args.connect_timeout,
            virtual_time=args.virtual_time,
        )
        episodes = []
        for k in range(args.episodes):
            ep = run_episode(settings, task, k)
            episodes.append(ep)
            verdict = f"success in {ep.time_to_success_s:.2f} s" if ep.success else "no success"
            seen = [s for i, s in enumerate(ep.subtasks) if s is not None and (i == 0 or s != ep.subtasks[i - 1])]
            print(f"episode {k + 1}/{args.episodes}: {verdict}; subtasks: {' -> '.join(seen) or '-'}", file=sys.stderr)
    except TransportError as e:
        print(f"robots.eval: error: {e}", file=sys.stderr)
        return 1
    except Mismatch as e:
        print(f"robots.eval: {e}", file=sys.stderr)
        return 2
    summary = summarize(episodes, task, settings)
    written = []
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        written.append(str(args.json))
    png = args.png or (args.json.with_suffix(".png") if args.json is not None else None)
    if png is not None:
        written.append(str(episodes_png(episodes, task, png, args.plot_episodes)))
    wrote = f"; wrote {', '.join(written)}" if written else ""
    print(f"success rate {summary['success_rate']:.2f} over {len(episodes)} episodes{wrote}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
