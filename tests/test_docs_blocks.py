"""Every command and Python block of README.md and docs/*.md runs as written.

A reader copies these blocks; one that no longer runs (a renamed module, a flag gone, an example
missing an import) is a defect the reader finds first unless this test does. Fenced ```bash, ```sh
and ```console blocks run line by line, ```python blocks as scripts, with `python`, `python3` and
`.venv/bin/python` meaning this interpreter. A server command (`runtime.policy_server` without
`--demo-duration`, `runtime.broker`) runs in the background as a reader's other terminal would:
the test adds `--ready-file` to know when it serves, runs the block's next lines against it, and
stops it with SIGINT, expecting exit code 0 and no traceback. A Python block that needs a server
says which with `<!-- docs-test: server: COMMAND -->` right before it (its prose says so too).

Blocks that cannot run here are marked right before the block, with a reason that is printed:
`<!-- docs-test: skip: REASON -->` (installs, downloads, a GPU) or `<!-- docs-test: slow: REASON -->`
(runs in the slow suite). Output, files and unit files use a fence that names no command language
(```text, ```json, ```ini); a bare ``` is refused, since it would hide a command from this test.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
RUNNABLE = {"bash": "bash", "sh": "bash", "console": "bash", "python": "python"}
NOT_RUN = {"text", "json", "ini", "toml", "yaml", "msgpack"}
DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(skip|slow|server):\s*(.*?)\s*-->$")
FENCE = re.compile(r"^\s*```(\S*)\s*$")
# The interpreter a reader names, at the start of a command or after a shell operator.
INTERPRETER = re.compile(r"(^|&&|\|\||;|\|)(\s*)(\.venv/bin/python|python3|python)(?=\s)")
# Commands that serve until stopped; `--demo-duration` makes the server's demo end by itself.
SERVERS = ("runtime.policy_server", "runtime.broker")
COMMAND_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
# Skips are for what cannot run here (installs, downloads, GPUs, a cluster of hosts): few, each with its reason.
MAX_SKIPS = 7


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced block of a Markdown file, with the docs-test directive right before it, if any."""

    path: Path
    line: int
    lang: str
    text: str
    directive: tuple[str, str] | None = None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_blocks(path: Path) -> list[Block]:
    """Every fenced block of `path`, runnable or not, in order."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    previous = ""
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i])
            i += 1
        directive = DIRECTIVE.match(previous)
        blocks.append(
            Block(
                path,
                start + 1,
                opening.group(1),
                "\n".join(body) + "\n",
                (directive.group(1), directive.group(2)) if directive else None,
            )
        )
        previous = ""
        i += 1
    return blocks


def shell_commands(text: str) -> list[str]:
    """The block's commands: continuation lines joined, blank and comment-only lines dropped."""
    commands, pending = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def with_this_python(command: str) -> str:
    """`python ...` as this interpreter: the reader's venv is the one the tests run in."""
    return INTERPRETER.sub(lambda m: f"{m.group(1)}{m.group(2)}{shlex.quote(sys.executable)}", command)


def server_argv(command: str) -> list[str] | None:
    """The argv of a command that serves until stopped, else None."""
    argv = shlex.split(command, comments=True)
    if len(argv) < 3 or argv[1] != "-m" or argv[2] not in SERVERS or "--help" in argv:
        return None
    if "--demo-duration" in argv:
        return None
    if any(token in argv for token in ("&&", "||", ";", "|", ">", "&")):
        raise AssertionError(f"a server command runs alone on its line: {command}")
    return [sys.executable, *argv[1:]]


@dataclasses.dataclass
class Server:
    argv: list[str]
    process: subprocess.Popen
    log: Path
    started_by: str


class Servers:
    """Background servers, kept for the next block that names the same command (each start costs
    seconds of compiling), stopped before a different one starts and at the end."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.running: list[Server] = []

    def ensure(self, index: int, argv: list[str], cwd: Path, block: Block) -> None:
        """The block's index-th server runs `argv`: kept if it already does, else (re)started."""
        kept = self.running[index] if index < len(self.running) else None
        if kept and kept.argv == argv and kept.process.poll() is None:
            return
        self.stop(from_index=index)
        ready = self.scratch / f"ready-{len(os.listdir(self.scratch))}.json"
        log = ready.with_suffix(".log")
        with log.open("w") as out:
            process = subprocess.Popen(
                [*argv, "--ready-file", str(ready)], cwd=cwd, stdout=out, stderr=subprocess.STDOUT
            )
        server = Server(argv, process, log, block.name)
        self.running.append(server)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                self.running.remove(server)
                if process.poll() is None:
                    process.kill()
                    process.wait()
                pytest.fail(f"{block.name}: `{shlex.join(argv)}` never served:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self, from_index: int = 0) -> None:
        """SIGINT to each server from `from_index` on, newest first: each must exit 0, no traceback."""
        problems = []
        while len(self.running) > from_index:
            server = self.running.pop()
            server.process.send_signal(signal.SIGINT)
            try:
                rc = server.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                server.process.kill()
                rc = server.process.wait()
                problems.append(f"`{shlex.join(server.argv)}` ignored SIGINT for {STOP_TIMEOUT_S} s")
            output = server.log.read_text()
            if rc != 0 or "Traceback" in output:
                problems.append(
                    f"`{shlex.join(server.argv)}` (from {server.started_by}) exited {rc}:\n{output[-3000:]}"
                )
        if problems:
            pytest.fail("\n".join(problems))


def run_checked(argv: list[str], cwd: Path, what: str) -> None:
    """Runs one command to its end: exit code 0 and no traceback, else the test fails with its output."""
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what}: still running after {COMMAND_TIMEOUT_S} s:\n{e.stdout or ''}{e.stderr or ''}")
    output = done.stdout + done.stderr
    if done.returncode != 0 or "Traceback" in output:
        pytest.fail(f"{what}: exit code {done.returncode}:\n{output[-4000:]}")


def reader_folder(scratch: Path, block: Block) -> Path:
    """A fresh folder that looks like the checkout (links to its top level) with an empty docs/, so
    the files a block writes (keys, tokens, plots) land there and never in the repository."""
    folder = scratch / re.sub(r"[^A-Za-z0-9]+", "_", block.name)
    folder.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("docs", ".git"):
            (folder / entry.name).symlink_to(entry)
    (folder / "docs").mkdir()
    return folder


def run_block(block: Block, servers: Servers, scratch: Path) -> None:
    """Runs one block as a reader would; fails the test naming the block and the command."""
    if block.directive and block.directive[0] == "skip":
        pytest.skip(f"{block.name}: {block.directive[1]}")
    if RUNNABLE[block.lang] == "python":
        if block.directive and block.directive[0] == "server":
            argv = server_argv(with_this_python(block.directive[1]))
            assert argv, f"{block.name}: `{block.directive[1]}` is not a server command"
            servers.ensure(0, argv, ROOT, block)
        script = scratch / f"{re.sub(r'[^A-Za-z0-9]+', '_', block.name)}.py"
        script.write_text(block.text)
        run_checked([sys.executable, str(script)], ROOT, f"{block.name} (python)")
        return
    cwd = reader_folder(scratch, block)
    started = 0
    for command in shell_commands(block.text):
        command = with_this_python(command)
        argv = server_argv(command)
        if argv:
            servers.ensure(started, argv, cwd, block)
            started += 1
        else:
            run_checked(["bash", "-c", command], cwd, f"{block.name}: `{command}`")
    servers.stop(from_index=started)


def all_blocks() -> list[Block]:
    return [block for path in DOCUMENTS for block in parse_blocks(path)]


def runnable_blocks() -> list[Block]:
    """Runnable blocks in document order, those that share a server command next to each other."""
    blocks = [b for b in all_blocks() if RUNNABLE.get(b.lang)]

    def first_server(block: Block) -> str:
        if block.directive and block.directive[0] == "server":
            return shlex.join(server_argv(with_this_python(block.directive[1])) or [])
        for command in shell_commands(block.text) if RUNNABLE[block.lang] == "bash" else ():
            if argv := server_argv(with_this_python(command)):
                return shlex.join(argv)
        return ""

    order = {}
    for block in blocks:
        order.setdefault(first_server(block), len(order))
    return sorted(blocks, key=lambda b: order[first_server(b)])


def params() -> list:
    return [
        pytest.param(block, id=block.name, marks=[pytest.mark.slow] if (block.directive or ("",))[0] == "slow" else [])
        for block in runnable_blocks()
    ]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("docs_blocks")


@pytest.fixture(scope="module")
def servers(scratch: Path) -> Iterator[Servers]:
    running = Servers(scratch)
    yield running
    running.stop()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("block", params())
def test_block_runs_as_written(block: Block, servers: Servers, scratch: Path) -> None:
    run_block(block, servers, scratch)


def test_every_fence_names_a_known_language() -> None:
    """A bare or unknown fence would hide a command from this test."""
    unknown = [f"{b.name}: ```{b.lang}" for b in all_blocks() if b.lang not in RUNNABLE and b.lang not in NOT_RUN]
    assert not unknown, "fences without a known language:\n" + "\n".join(unknown)


def test_skips_are_few_and_say_why(capsys: pytest.CaptureFixture) -> None:
    directives = [b for b in all_blocks() if b.directive]
    skipped = [b for b in directives if b.directive[0] == "skip"]
    with capsys.disabled():
        print(f"\ndocs blocks: {len(runnable_blocks())} runnable, {len(skipped)} skipped:")
        for block in skipped:
            print(f"  {block.name}: {block.directive[1]}")
    assert all(b.directive[1] for b in directives), "every docs-test directive gives its reason or command"
    assert len(skipped) <= MAX_SKIPS, f"{len(skipped)} skipped docs blocks (at most {MAX_SKIPS})"
    misplaced = [b.name for b in directives if not RUNNABLE.get(b.lang)]
    assert not misplaced, f"docs-test directives before blocks that do not run: {misplaced}"


def test_readme_test_command_is_what_ci_runs() -> None:
    """`.ci/run` runs exactly the README's test command, and the quickstart is the one command."""
    readme = (ROOT / "README.md").read_text()
    script = (ROOT / ".ci/run").read_text().splitlines()
    ci = [line for line in script if line and not line.startswith(("#", "set ", "cd "))]
    tests = [b for b in parse_blocks(ROOT / "README.md") if "pytest" in b.text]
    assert len(tests) == 1 and shell_commands(tests[0].text) == ci
    quickstart = (
        'python3 -m venv .venv && .venv/bin/pip install -q -e ".[server]" && '
        ".venv/bin/python -m runtime.policy_server --demo"
    )
    assert f"```bash\n{quickstart}\n```" in readme


def test_a_broken_block_fails(tmp_path: Path) -> None:
    """The checks above can fail: a failing command, a failing script and a server that never serves."""
    servers = Servers(tmp_path)
    broken = [
        Block(ROOT / "README.md", 1, "bash", 'python -c "import sys; sys.exit(3)"\n'),
        Block(ROOT / "README.md", 2, "python", "import no_such_module_here\n"),
        Block(ROOT / "README.md", 3, "bash", "python -m runtime.policy_server --config no_such_config\n"),
        Block(ROOT / "README.md", 4, "python", "print('Traceback (most recent call last):')\n"),
    ]
    for block in broken:
        with pytest.raises(pytest.fail.Exception):
            run_block(block, servers, tmp_path)
    assert not servers.running
