"""Writes a benchmark's section into docs/benchmarks.md, stamped with machine, date and versions.

Each benchmark owns one section between HTML comment markers, so re-running one benchmark leaves
the others' results in place.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    import jax

    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores ({cpu}), backend {jax.default_backend()} [{devices}]"
    )


def versions(*packages: str) -> str:
    parts = [f"python {platform.python_version()}"]
    for name in packages:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


def percentiles_ms(samples_s: list[float]) -> tuple[float, float]:
    ms = np.asarray(samples_s) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def write_section(
    name: str, title: str, body: str, command: str, packages: tuple[str, ...] = ("jax", "jaxlib", "flax")
) -> str:
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    section = (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"- command: `{command}`\n"
        f"- machine: {machine()}\n- date: {stamp}\n- versions: {versions(*packages)}\n\n"
        f"{body.rstrip()}\n<!-- /bench:{name} -->\n"
    )
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    BENCHMARKS_MD.parent.mkdir(exist_ok=True)
    BENCHMARKS_MD.write_text(text)
    return section


def time_rounds(
    calls: dict[str, Callable[[], None]], per_round: dict[str, int], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Each call `per_round[name]` times per round, the order rotating each round."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            call, out = calls[name], samples[name]
            for _ in range(per_round[name]):
                start = time.perf_counter()
                call()
                out.append(time.perf_counter() - start)
    return samples
