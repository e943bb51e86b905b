"""The shipped demo policy through the whole stack: how often it does the task, and how RTC helps.

Two parts, one server (the real engine on `configs/assets/pi05_demo`, ZMQ on 127.0.0.1):

- as a robot runs it: wall-clock 50 Hz, subtask refreshes on the PUB every 0.5 s, crossfade, the
  latency whatever this machine's inference takes (`robots.eval`'s defaults);
- at 200 ms injected latency, on virtual time (`runtime.robot.virtual_time`: each reply lands 10 steps
  after its observation, however fast the CPU), naive switching, crossfade and RTC side by side
  on the same scenes and seeds.

Every episode draws a new scene (`robots.tasks`); success is the simulator's.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
from pathlib import Path

from bench.report import write_section
from configs import DEMO_MODEL, SHIPPED_CHECKPOINTS, get_model_config
from policy.engine.inference import AsyncPi05Inference
from policy.engine.settings import EngineSettings
from robots import eval as robots_eval
from robots.tasks import PickPlaceTask
from runtime.robot.chunk_buffer import BufferSettings
from runtime.robot.control_loop import LoopSettings
from tests.support.ports import free_local_ports
from tests.support.server_thread import ServerThread

MODES = ("replace", "crossfade", "rtc")
_ROOT = Path(__file__).resolve().parents[1]  # the checkpoint is shown relative to the repository


def evaluate(settings: robots_eval.EvalSettings, task: PickPlaceTask) -> dict:
    episodes = [robots_eval.run_episode(settings, task, k) for k in range(settings.episodes)]
    return robots_eval.summarize(episodes, task, settings)


def row(label: str, s: dict) -> str:
    t = s["mean_time_to_success_s"]
    return (
        f"| {label} | {s['episodes']} | {s['success_rate']:.2f} | {'-' if t is None else f'{t:.2f}'} | "
        f"{s['subtask_transitions_mean']:.1f} | {s['subtask_phase_agreement']:.2f} | "
        f"{s['subtask_text_agreement']:.2f} | {s['subtask_order_rate']:.2f} | {s['underruns']:.0f} |"
    )


def run(args: argparse.Namespace) -> str:
    cfg = get_model_config(DEMO_MODEL)
    size = cfg.siglip.image_size
    engine = AsyncPi05Inference(
        EngineSettings(
            DEMO_MODEL,
            checkpoint_dir=str(args.checkpoint),
            max_batch=1,
            batch_buckets=(1,),
            max_decoding_steps_limit=12,
            image_resolutions=((size, size),),
            compile_in_background=False,
        )
    )
    asyncio.run(engine.start())
    router, pub = free_local_ports(2)
    argv = ["--config", DEMO_MODEL, "--router-port", str(router), "--pub-port", str(pub), "--ws-port", "0",
            "--openpi-port", "0", "--log-level", "WARNING"]  # fmt: skip
    task = PickPlaceTask()
    loop = LoopSettings(hz=50.0, buffer=BufferSettings(request_when_left=15), max_decoding_steps=12)
    results: list[tuple[str, dict]] = []
    try:
        with ServerThread(argv, backend=engine) as server:
            base = robots_eval.EvalSettings(
                router=server.endpoints["router"],
                pub=server.endpoints["pub"],
                episodes=args.episodes,
                seed=args.seed,
                image_size=size,
                max_episode_s=args.max_episode_s,
                loop=dataclasses.replace(loop, subtask_mode="refresh", refresh_interval_s=0.5),
            )
            results.append(("wall clock, refreshes on the PUB, crossfade", evaluate(base, task)))
            print(results[-1], flush=True)
            for mode in MODES:
                buffer = BufferSettings(
                    request_when_left=15,
                    blend=mode,
                    rtc_execute_horizon=args.execute_horizon,
                    rtc_max_guidance_weight=10.0,
                )
                settings = dataclasses.replace(
                    base, latency_ms=200.0, virtual_time=True, loop=dataclasses.replace(loop, buffer=buffer)
                )
                results.append((f"200 ms injected (virtual time), {mode}", evaluate(settings, task)))
                print(results[-1], flush=True)
    finally:
        asyncio.run(engine.close())
    checkpoint = Path(args.checkpoint).resolve()
    shown = checkpoint.relative_to(_ROOT) if checkpoint.is_relative_to(_ROOT) else checkpoint
    body = (
        f"`{DEMO_MODEL}` from `{shown}` (trained by `python -m runtime.training`), the real engine on CPU, "
        f"{args.episodes} episodes per row (seed {args.seed}: the same scenes in every row), at most "
        f"{args.max_episode_s:g} s each, 50 Hz, a chunk requested when 15 of its 30 actions are left (RTC: every "
        f"s = {args.execute_horizon} steps, beta 10). Subtasks: decoded by the periodic refresh in the first row, with "
        "each chunk on virtual time. Phase agreement: the share of ticks whose subtask names the simulator's phase "
        "(the place it names aside); text agreement: the share whose subtask is the simulator's word for word, "
        "the place included; in order: episodes whose subtasks went through at least two phases, never back.\n\n"
        "| run | episodes | success rate | mean time to success, s | subtask changes per episode | phase agreement "
        "| text agreement | in order | underruns |\n|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(row(label, s) for label, s in results)
        + "\n"
    )
    command = f"python -m bench.demo_policy --episodes {args.episodes} --seed {args.seed}"
    return write_section("demo_policy", "Demo policy: the task through the whole stack", body, command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINTS[DEMO_MODEL]))
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=100, help="scenes: not the training demonstrations' seeds")
    parser.add_argument("--max-episode-s", type=float, default=10.0)
    parser.add_argument("--execute-horizon", type=int, default=15, help="RTC's s")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(run(args))


if __name__ == "__main__":
    main()
