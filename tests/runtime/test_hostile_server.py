"""Hostile input at a live policy server, one per wire protocol (issue 9).

The server runs in its own process (`--fixed-reply`: no model, the same request checks), so a crash
shows as a dead process. Thousands of random and mutated messages go to the ZMQ ROUTER, the JSON
API and openpi's port; each must be answered with a typed error or a valid reply:

- ZMQ: a reply header with `type` `error` and a documented code, or the reply of the request type;
- JSON: `{"status": "error", "error": {"code", "message"}}` with a documented code on a connection
  that stays open, or a success reply;
- openpi: an `Error: ...` text frame and a close with 1011 (openpi's way), or a reply.

`internal` is not an acceptable answer to malformed input: it is the code of a failure inside the
server (an exception a decoder let escape), which is what these tests look for. After each batch a
well-formed request must succeed, and at the end the server process must be alive.

Hypothesis runs derandomized with a fixed number of examples and no shrinking (each input is shown
in full on failure instead), so every run sends the same inputs and takes a bounded time.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import socket
import time
from typing import Any

import msgpack
import numpy as np
import pytest
import websockets.sync.client as ws_client
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed

from tests.support.openpi_exchange import MAX_ERROR_MESSAGE_CHARS, REPLY_TIMEOUT_S, openpi_exchange
from tests.support.raw_dealer import RawDealer, image, infer_arrays, infer_header
from tests.support.server_process import ServerProcess
from tests.support.strategies import (
    ARRAY_NAMES,
    DEEP,
    DESCRIPTOR_FIELDS,
    FRAMES,
    HEADER_FIELDS,
    HEADER_TYPES,
    INVALID_UTF8,
    JSON_FIELDS,
    LONE_SURROGATE,
    OPTION_KEYS,
    T_DATA,
    VALID_DTYPES,
    dumps,
    json_keys,
    json_scalars,
    json_values,
    msgpack_values,
    mutate_bytes,
    mutate_frames,
    mutate_text,
    nd,
    nested,
    openpi_arrays,
    packb,
    valid_json_request,
    valid_openpi_observation,
)
from transport import codec
from transport.errors import RemoteError
from transport.messages import REPLY_TYPE
from transport.openpi_msgpack import RTC_KEYS
from transport.zmq_client import PolicyClient

# Codes the docs list for the ZMQ ROUTER, less `internal` (see the module docstring).
ZMQ_CODES = frozenset(
    {"bad_message", "bad_header", "bad_version", "bad_frames", "bad_dtype", "unknown_type", "oversize", "bad_request",
     "busy"}
)  # fmt: skip
JSON_CODES = frozenset({"bad_request", "invalid_json", "oversize"})

pytestmark = pytest.mark.filterwarnings(
    # openpi-client 0.1.2 opens its connection outside a `with` block; not ours to change.
    "ignore:connect\\(\\) must be used as a context manager:DeprecationWarning"
)

SETTINGS = settings(
    deadline=None,
    derandomize=True,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    print_blob=False,
)


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--fixed-reply") as s:
        yield s


@pytest.fixture(scope="module")
def model(server) -> dict[str, Any]:
    with RawDealer(server.router) as dealer:
        pong = dealer.request({"type": "ping", "id": 1})
    assert pong["type"] == "pong", pong
    return pong["data"]["model"]


def _assert_serving(server: ServerProcess, model: dict[str, Any], what: str) -> None:
    """The process is alive and a well-formed infer from a fresh peer is served."""
    assert server.alive(), f"the server died after {what}:\n{server.log[-4000:]}"
    with RawDealer(server.router) as dealer:
        reply = dealer.request(infer_header(77, robot="after-check"), infer_arrays())
    assert reply["type"] == "result" and reply["id"] == 77, f"after {what}: {reply}"
    assert reply["_arrays"]["actions"].shape == (model["action_horizon"], model["action_dim"])


def _no_tracebacks(server: ServerProcess, since: int) -> None:
    text = "".join(server.lines[since:])
    assert "Traceback" not in text, "the server logged a traceback for client input:\n" + text[-6000:]


# ============================================================================ ZMQ ROUTER


def _valid_zmq(request_id: int, seed: int = 0) -> tuple[dict[str, Any], list[bytes]]:
    frames = codec.encode(infer_header(request_id), infer_arrays(seed))
    return msgpack.unpackb(frames[0]), [bytes(f) for f in frames[1:]]


@st.composite
def zmq_messages(draw, request_id: int) -> list[bytes]:
    """A valid infer request with 1 to 4 mutations of its header, descriptors, frames or bytes."""
    header, frames = _valid_zmq(request_id, seed=draw(st.integers(0, 3)))
    header_bytes: bytes | None = None
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(
                ["field", "delete", "type", "option", "descriptor", "descriptors", "frames", "consistent_array",
                 "header_bytes", "whole", "rtc"]
            )
        )  # fmt: skip
        if op == "field":
            header[draw(st.sampled_from(HEADER_FIELDS))] = draw(msgpack_values)
        elif op == "delete" and header:
            del header[draw(st.sampled_from(sorted(header)))]
        elif op == "type":
            header["type"] = draw(HEADER_TYPES)
        elif op == "option":
            options = header.get("options")
            if not isinstance(options, dict):
                options = header["options"] = {}
            options[draw(OPTION_KEYS)] = draw(msgpack_values)
        elif op == "rtc" and isinstance(header.get("arrays"), list):
            # Real-time chunking: a well-framed prev_actions array of any dtype and shape, with options.
            dtype = draw(st.sampled_from(["<f4", "<f8", "|u1", "<i8", "<c8", "|b1"]))
            shape = draw(st.sampled_from([[0, 32], [3, 32], [50, 32], [51, 32], [3, 7], [3], [1, 1, 1], [200, 32]]))
            data = bytes(np.dtype(dtype).itemsize * int(np.prod(shape)))
            header["arrays"].append({"name": "prev_actions", "dtype": dtype, "shape": shape})
            frames.append(data)
            options = header.setdefault("options", {})
            if isinstance(options, dict):
                options.update({"inference_delay": draw(msgpack_values | st.integers(-2, 60)),
                                "execute_horizon": draw(msgpack_values | st.integers(-2, 60))})  # fmt: skip
        elif op == "descriptor" and isinstance(header.get("arrays"), list) and header["arrays"]:
            descs = header["arrays"]
            i = draw(st.integers(0, len(descs) - 1))
            if isinstance(descs[i], dict):
                field = draw(st.sampled_from(sorted(DESCRIPTOR_FIELDS)))
                descs[i][field] = draw(DESCRIPTOR_FIELDS[field])
            else:
                descs[i] = draw(msgpack_values)
        elif op == "descriptors" and isinstance(header.get("arrays"), list):
            descs = header["arrays"]
            action = draw(st.sampled_from(["append", "pop", "duplicate", "many"]))
            if action == "append":
                descs.append(draw(msgpack_values))
            elif action == "pop" and descs:
                descs.pop()
            elif action == "duplicate" and descs:
                descs.append(descs[0])
                frames.append(frames[0])
            elif action == "many":
                header["arrays"] = [{"name": f"image/c{i}", "dtype": "|u1", "shape": [1, 1, 3]} for i in range(65)]
        elif op == "frames":
            if draw(st.booleans()) or not frames:  # frames dropped, added, cut, extended, emptied
                frames[:] = mutate_frames(frames, draw(st.randoms(use_true_random=False)))
            else:  # same length, other bytes: a state of NaNs or infinities, say
                i = draw(st.integers(0, len(frames) - 1))
                pattern = draw(st.sampled_from([b"\xff", b"\x00\x00\x80\x7f", b"\x00\x00\xc0\xff"]))
                frames[i] = (pattern * len(frames[i]))[: len(frames[i])]
        elif op == "consistent_array":
            # An array whose frame matches its descriptor, so checks past the frame sizes run.
            dtype = draw(st.sampled_from(VALID_DTYPES))
            shape = draw(
                st.sampled_from([[1, 1, 3], [8, 8, 4], [8, 8], [0, 8, 3], [4097, 1, 3], [1100, 2, 3], [2, 2000, 3],
                                 [1], [0], [257], [], [2, 2]])
            )  # fmt: skip
            name = draw(ARRAY_NAMES)
            fill = draw(st.sampled_from([b"\x00", b"\xff", b"\x7f"]))
            header["arrays"] = [{"name": name, "dtype": dtype, "shape": shape}]
            frames[:] = [fill * (math.prod(shape) * np.dtype(dtype).itemsize)]
        elif op == "header_bytes":
            header_bytes = packb(header)
            action = draw(st.sampled_from(["edit", "edit", "random", "oversize"]))
            if action == "edit":  # bytes flipped, inserted, deleted, or the frame cut short
                header_bytes = mutate_bytes(header_bytes, draw(st.randoms(use_true_random=False)))
            elif action == "random":
                header_bytes = draw(st.binary(max_size=64))
            else:
                header_bytes = packb({**header, "extra": "x" * (70 * 1024)})
        elif op == "whole":
            return [packb(draw(msgpack_values)), *frames[: draw(st.integers(0, 2))]]
    try:
        head = header_bytes if header_bytes is not None else packb(header)
    except (OverflowError, ValueError, TypeError):  # not even msgpack can carry it: send garbage instead
        head = b"\xc1"
    return [head, *frames]


def _describe_frames(frames: list[bytes]) -> str:
    try:
        header = msgpack.unpackb(frames[0], strict_map_key=False)
        shown = repr(header)
    except Exception:
        shown = repr(frames[0][:200])
    return f"header {shown[:2000]}, then {len(frames) - 1} frames of {[len(f) for f in frames[1:]]} bytes"


def _scanned_id(header_frame: bytes) -> Any:
    """The id of a header that does not unpack whole, read key by key up to the id: the server scans a
    header too large to unpack that way, so a value after the id that no unpacker reads (2000-deep
    nesting, invalid UTF-8) leaves the id its error reply carries."""
    unpacker = msgpack.Unpacker(io.BytesIO(header_frame), strict_map_key=False)
    with contextlib.suppress(Exception):
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == "id":
                return unpacker.unpack()
            unpacker.skip()
    return None


def _zmq_problem(sent: list[bytes], reply: list[bytes] | None, model: dict[str, Any]) -> str | None:
    """What is wrong with the server's answer to `sent` (None: a typed error or a valid reply)."""
    if reply is None:
        return f"no reply within {REPLY_TIMEOUT_S} s"
    try:
        header, arrays = codec.decode(reply)
    except Exception as e:
        return f"the reply does not decode: {e}"
    try:
        sent_header = msgpack.unpackb(sent[0], strict_map_key=False, unicode_errors="surrogatepass")
        sent_id = sent_header.get("id") if isinstance(sent_header, dict) else None
    except Exception:
        sent_header, sent_id = None, _scanned_id(sent[0])
    if header.get("id") is not None and header.get("id") != sent_id:
        return f"the reply carries id {header.get('id')!r}, the request had {sent_id!r}"
    if header.get("type") == "error":
        error = header.get("error")
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            return f"malformed error reply {header}"
        if error.get("code") not in ZMQ_CODES:
            return f"error code {error.get('code')!r} ({error['message'][:300]})"
        if len(error["message"]) > MAX_ERROR_MESSAGE_CHARS:
            return f"an error message of {len(error['message'])} characters"
        return None
    kind = sent_header.get("type") if isinstance(sent_header, dict) else None
    if not isinstance(kind, str) or header.get("type") != REPLY_TYPE.get(kind):
        return f"a {header.get('type')!r} reply to a {kind!r} request"
    if header.get("id") != sent_id:
        return f"the reply carries id {header.get('id')!r}, the request had {sent_id!r}"
    if kind == "infer" and arrays.get("actions", np.zeros(0)).shape != (model["action_horizon"], model["action_dim"]):
        return f"a result without a {model['action_horizon']}x{model['action_dim']} actions array: {arrays}"
    return None


def _exchange_all(server: ServerProcess, model: dict[str, Any], messages: list[list[bytes]]) -> list[str]:
    """Sends each message from one fresh DEALER, waiting for its answer; the problems found."""
    problems = []
    with RawDealer(server.router) as dealer:
        for frames in messages:
            reply = dealer.exchange(frames, REPLY_TIMEOUT_S)
            problem = _zmq_problem(frames, reply, model)
            if problem is not None:
                problems.append(f"{problem}\n    for {_describe_frames(frames)}")
                if reply is None or not server.alive():
                    break  # the server is stuck or gone: every later message would wait in vain
    return problems


@settings(SETTINGS, max_examples=200)
@given(st.lists(zmq_messages(request_id=5), min_size=5, max_size=15))
def test_zmq_router_answers_mutated_requests_with_typed_errors(server, model, messages):
    """~2000 mutated requests (types of every field swapped for lists, maps, huge integers, bytes,
    None; wrong frame counts and sizes; odd dtypes and shapes; corrupt header bytes)."""
    since = len(server.lines)
    problems = _exchange_all(server, model, messages)
    assert not problems, "\n".join(problems[:10])
    _assert_serving(server, model, "a batch of mutated ZMQ requests")
    _no_tracebacks(server, since)


@settings(SETTINGS, max_examples=100)
@given(st.lists(st.lists(FRAMES, min_size=1, max_size=4), min_size=5, max_size=10))
def test_zmq_router_answers_random_frames_with_typed_errors(server, model, messages):
    """~750 messages of random bytes and random msgpack values, 1 to 4 frames each."""
    since = len(server.lines)
    problems = _exchange_all(server, model, messages)
    assert not problems, "\n".join(problems[:10])
    _assert_serving(server, model, "a batch of random ZMQ frames")
    _no_tracebacks(server, since)


DELETE = object()


def _named_zmq_inputs() -> dict[str, list[bytes]]:
    """The inputs issue 9 names, each on its own."""
    header, frames = _valid_zmq(9)

    def with_header(**fields: Any) -> list[bytes]:
        h = {**header, **fields}
        return [packb({k: v for k, v in h.items() if v is not DELETE}), *frames]

    def with_descriptor(i: int, **fields: Any) -> list[bytes]:
        descs = [dict(d) for d in header["arrays"]]
        descs[i].update(fields)
        return [packb({**header, "arrays": descs}), *frames]

    def with_options(options: Any) -> list[bytes]:
        return with_header(options=options)

    def pixels(n: int) -> list[dict[str, Any]]:
        return [{"name": f"image/c{i}", "dtype": "|u1", "shape": [1, 1, 3]} for i in range(n)]

    image_desc = header["arrays"][0]
    cases = {
        "no arrays key": with_header(arrays=DELETE),
        "type is a list": with_header(type=["infer"]),
        "type is a map": with_header(type={"infer": 1}),
        "dtype is a list": with_descriptor(0, dtype=["|u1"]),
        "dtype is a map": with_descriptor(0, dtype={"a": 1}),
        "dtype T (variable-width strings)": with_descriptor(0, dtype="T"),
        "dtype object": with_descriptor(0, dtype="|O"),
        "shape [0] + [2**31-1] * 7": with_descriptor(0, shape=[0] + [2**31 - 1] * 7),
        "shape [2**63-1]": with_descriptor(1, shape=[2**63 - 1]),
        "shape is a map": with_descriptor(0, shape={"0": 8}),
        "options with an integer key": with_options({1: "go", "high_level_prompt": "go"}),
        "options with a bytes key": with_options({b"high_level_prompt": "go"}),
        "options is a list": with_options(["high_level_prompt", "go"]),
        "prompt with a lone surrogate": with_options({"high_level_prompt": LONE_SURROGATE}),
        "prompt of invalid UTF-8": with_options({"high_level_prompt": INVALID_UTF8}),
        "temperature 1e308 * 10 (inf)": with_options({"high_level_prompt": "go", "temperature": math.inf}),
        "temperature nan": with_options({"high_level_prompt": "go", "temperature": math.nan}),
        "refresh interval 5e-324": with_options({"high_level_prompt": "go", "subtask_refresh_interval": 5e-324}),
        "refresh interval 2**64-1": with_options({"high_level_prompt": "go", "subtask_refresh_interval": 2**64 - 1}),
        "seed 2**64-1": with_options({"high_level_prompt": "go", "seed": 2**64 - 1}),
        "max_decoding_steps 2**64-1": with_options({"high_level_prompt": "go", "max_decoding_steps": 2**64 - 1}),
        "id 2**64-1": with_header(id=2**64 - 1),
        "id -2**63": with_header(id=-(2**63)),
        "id a 5000-character string": with_header(id="i" * 5000),
        "id a float": with_header(id=1.5),
        "id a map": with_header(id={"a": 1}),
        "ts inf": with_header(ts=math.inf),
        "ts 2**64-1": with_header(ts=2**64 - 1),
        "robot @json/1-1": with_header(robot="@json/1-1"),
        "robot of 300 characters": with_header(robot="r" * 300),
        "robot a list": with_header(robot=["r"]),
        "v 2**64-1": with_header(v=2**64 - 1),
        "v '1'": with_header(v="1"),
        "header nested 2000 deep": with_header(extra=DEEP),
        "header of 70 KiB": with_header(extra="x" * (70 * 1024)),
        "header an array": [packb([header]), *frames],
        "header an ext type": [packb(msgpack.ExtType(1, b"\x00" * 8)), *frames],
        "empty header frame": [b"", *frames],
        "only an empty frame": [b""],
        "one frame too many": [packb(header), *frames, b"x"],
        "one frame too few": [packb(header), frames[0]],
        "image frame one byte short": [packb(header), frames[0][:-1], frames[1]],
        "image 1100 x 2 (over the fixed backend's 1080 rows)": [
            packb({**header, "arrays": [{**image_desc, "shape": [1100, 2, 3]}]}),
            bytes(1100 * 2 * 3),
        ],
        "image of float32": [packb({**header, "arrays": [{**image_desc, "dtype": "<f4"}]}), bytes(8 * 8 * 3 * 4)],
        "state of NaN": [packb(header), frames[0], b"\x00\x00\xc0\x7f" * 8],
        "65 arrays": [packb({**header, "arrays": pixels(65)}), *[bytes(3)] * 65],
        "9 cameras": [packb({**header, "arrays": pixels(9)}), *[bytes(3)] * 9],
    }
    return cases


def test_zmq_router_answers_the_inputs_issue_9_names(server, model):
    since = len(server.lines)
    problems = []
    with RawDealer(server.router) as dealer:
        for name, frames in _named_zmq_inputs().items():
            problem = _zmq_problem(frames, dealer.exchange(frames, REPLY_TIMEOUT_S), model)
            if problem is not None:
                problems.append(f"{name}: {problem}")
            if not server.alive():
                break
    assert not problems, "\n".join(problems)
    _assert_serving(server, model, "the named ZMQ inputs")
    _no_tracebacks(server, since)


def test_zmq_router_answers_a_33_mib_message_with_oversize(server, model):
    header, _ = _valid_zmq(3)
    header["arrays"] = [{"name": "image/base_0_rgb", "dtype": "|u1", "shape": [3400, 3400, 3]}]
    with RawDealer(server.router) as dealer:
        frames = dealer.exchange([packb(header), bytes(3400 * 3400 * 3)], 30.0)
    assert frames is not None, "no reply to an oversize message"
    reply, _ = codec.decode(frames)
    assert reply["type"] == "error" and reply["error"]["code"] == "oversize" and reply["id"] == 3, reply
    _assert_serving(server, model, "an oversize message")


def test_a_robot_whose_header_is_over_the_limit_gets_an_error_it_can_match(server):
    """A 100 KB prompt makes a header frame past the server's 64 KiB: the robot must hear
    `oversize` (or `bad_request`) at once, not wait out its timeout and retries."""
    with PolicyClient(server.router, "long-prompt", timeout_s=5.0, retries=0) as client:
        with pytest.raises(RemoteError) as raised:
            client.infer({"base_0_rgb": image()}, "p" * 100_000)
    assert raised.value.code in ("oversize", "bad_request"), raised.value


# ============================================================================ JSON API


@st.composite
def json_requests(draw) -> dict[str, Any] | Any:
    request: Any = valid_json_request(draw(st.integers(0, 3)))
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(request, dict):
            break
        op = draw(st.sampled_from(["field", "delete", "camera", "pixel", "ragged", "state", "interval", "whole"]))
        if op == "field":
            request[draw(st.sampled_from(JSON_FIELDS))] = draw(json_values)
        elif op == "delete" and request:
            del request[draw(st.sampled_from(sorted(request)))]
        elif op == "camera":
            images = request["images"] if isinstance(request.get("images"), dict) else {}
            name = draw(st.sampled_from(["bogus", "", "left_wrist_0_rgb", "c" * 100]) | json_keys)
            images[name] = draw(st.sampled_from([image(2, 2).tolist(), [], [[]], [[[]]], nested(50)]) | json_values)
            request["images"] = images
        elif op == "pixel" and isinstance(request.get("images"), dict) and "base_0_rgb" in request["images"]:
            img = request["images"]["base_0_rgb"]
            rows = (
                [r for r in img if isinstance(r, list) and r and isinstance(r[0], list) and len(r[0]) == 3]
                if isinstance(img, list)
                else []
            )
            if rows:  # an earlier `ragged` may have emptied a row: pick among those with a pixel
                draw(st.sampled_from(rows))[0][draw(st.integers(0, 2))] = draw(
                    st.sampled_from([256, -1, 1.5, "1", None, True, 2**64, "\x00raw:1e400\x00", [1, 2, 3], {}])
                )
        elif op == "ragged" and isinstance(request.get("images"), dict) and "base_0_rgb" in request["images"]:
            img = request["images"]["base_0_rgb"]
            if isinstance(img, list) and len(img) > 1 and isinstance(img[1], list) and img[1]:
                img[1] = img[1][: draw(st.integers(0, len(img[1]) - 1))]
        elif op == "state":
            request["state"] = draw(
                st.sampled_from([[], [1] * 300, ["1"], [None], [True], ["\x00raw:1e400\x00"], [3.5e38], [1e39]])
                | st.lists(json_scalars, max_size=4)
            )
        elif op == "interval":
            request["subtask_refresh_interval"] = draw(
                st.sampled_from([0, -1, 1e-9, 5e-324, 0.05, 3601, "1", True, "\x00raw:1e400\x00", "\x00raw:digits\x00"])
            )
        elif op == "whole":
            request = draw(json_values)
    return request


@st.composite
def json_messages(draw) -> str | bytes:
    kind = draw(st.sampled_from(["request", "request", "request", "batch", "text", "bytes", "garbled"]))
    if kind == "request":
        return dumps(draw(json_requests()))
    if kind == "batch":
        items = draw(st.lists(json_requests() | st.just(valid_json_request()), min_size=0, max_size=10))
        extra = draw(st.sampled_from([{}, {"extra": 1}]))
        return dumps({"batch": items, **extra} if draw(st.booleans()) else {"batch": draw(json_values)})
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    return mutate_text(dumps(draw(json_requests())), draw(st.randoms(use_true_random=False)))


def _json_problem(reply: Any, batch_size: int | None, model: dict[str, Any]) -> str | None:
    if not isinstance(reply, dict):
        return f"a reply that is not an object: {str(reply)[:300]}"
    if reply.get("status") == "error":
        error = reply.get("error")
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            return f"malformed error {reply}"
        if error.get("code") not in JSON_CODES:
            return f"error code {error.get('code')!r} ({error['message'][:300]})"
        if len(error["message"]) > MAX_ERROR_MESSAGE_CHARS:
            return f"an error message of {len(error['message'])} characters"
        return None
    if reply.get("status") != "success":
        return f"a reply that is neither success nor error: {str(reply)[:300]}"
    replies = reply.get("results") if batch_size is not None else [reply]
    if not isinstance(replies, list) or len(replies) != (batch_size or 1):
        return f"a success reply with {replies!r:.200} for a batch of {batch_size}"
    for r in replies:
        actions = np.asarray(r.get("actions"))
        if actions.shape != (1, model["action_horizon"], model["action_dim"]):
            return f"actions of shape {actions.shape}"
    return None


def _batch_size(message: str | bytes) -> int | None:
    try:
        value = json.loads(message)
    except Exception:
        return None
    if isinstance(value, dict) and isinstance(value.get("batch"), list):
        return len(value["batch"])
    return None


def _json_recv(connection: ws_client.ClientConnection) -> Any:
    """The next reply, skipping refresh pushes (a mutated request may have asked for refreshes)."""
    while True:
        text = connection.recv(timeout=REPLY_TIMEOUT_S)
        try:
            value = json.loads(text)
        except (TypeError, ValueError):
            return text
        if isinstance(value, dict) and value.get("type") == "subtask_refresh":
            continue
        return value


def _json_exchange_all(server: ServerProcess, model: dict[str, Any], messages: list[str | bytes]) -> list[str]:
    problems = []
    with ws_client.connect(server.ws, max_size=None, open_timeout=10) as connection:
        for message in messages:
            shown = repr(message[:300]) + (f"... ({len(message)} chars)" if len(message) > 300 else "")
            try:
                connection.send(message)
                problem = _json_problem(_json_recv(connection), _batch_size(message), model)
            except TimeoutError:
                problems.append(f"no reply within {REPLY_TIMEOUT_S} s to {shown}")
                break
            except ConnectionClosed as e:
                problems.append(f"the server closed the connection ({e}) after {shown}")
                break
            if problem is not None:
                problems.append(f"{problem}\n    for {shown}")
        else:
            connection.send(dumps(valid_json_request()))
            reply = _json_recv(connection)
            if _json_problem(reply, None, model) is not None or reply.get("status") != "success":
                problems.append(f"a well-formed request after the batch failed: {str(reply)[:500]}")
    return problems


@settings(SETTINGS, max_examples=120)
@given(st.lists(json_messages(), min_size=5, max_size=15))
def test_json_api_answers_mutated_requests_with_typed_errors_on_an_open_connection(server, model, messages):
    """~1200 mutated JSON requests and batches, random text and binary frames: 1e400, 5000-digit
    numbers, NaN, lone surrogates, wrong types in every field, ragged images."""
    since = len(server.lines)
    problems = _json_exchange_all(server, model, messages)
    assert not problems, "\n".join(problems[:10])
    _assert_serving(server, model, "a batch of mutated JSON requests")
    _no_tracebacks(server, since)


def _named_json_inputs() -> dict[str, str | bytes]:
    base = valid_json_request()

    def with_fields(**fields: Any) -> str:
        return dumps({**base, **fields})

    return {
        "nested 100k deep": "[" * 100_000 + "]" * 100_000,
        "an object nested 100k deep": '{"a":' * 100_000 + "1" + "}" * 100_000,
        "image nested 100k deep": dumps({**base, "images": {"base_0_rgb": "\x00raw:deep-image\x00"}}).replace(
            json.dumps("\x00raw:deep-image\x00"), "[" * 100_000 + "]" * 100_000
        ),
        "a 5000-digit number": "1" * 5000,
        "temperature of 5000 digits": with_fields(temperature="\x00raw:digits\x00"),
        "temperature 1e400": with_fields(temperature="\x00raw:1e400\x00"),
        "state [1e400]": with_fields(state=["\x00raw:1e400\x00"]),
        "state [-1e400]": with_fields(state=["\x00raw:-1e400\x00"]),
        "state [5000 digits]": with_fields(state=["\x00raw:digits\x00"]),
        "subtask_refresh_interval 1e400": with_fields(subtask_refresh_interval="\x00raw:1e400\x00"),
        "subtask_refresh_interval 5e-324": with_fields(subtask_refresh_interval=5e-324),
        "max_decoding_steps 1e400": with_fields(max_decoding_steps="\x00raw:1e400\x00"),
        "seed 2**200": with_fields(seed=2**200),
        "seed 1.5": with_fields(seed=1.5),
        "temperature NaN": with_fields(temperature="\x00raw:NaN\x00"),
        "temperature Infinity": with_fields(temperature="\x00raw:Infinity\x00"),
        "prompt with a lone surrogate": with_fields(high_level_prompt="\x00raw:surrogate\x00"),
        "prompt with a trailing lone surrogate": with_fields(high_level_prompt="\x00raw:surrogate2\x00"),
        "low_level_prompt with a lone surrogate": with_fields(low_level_prompt="\x00raw:surrogate\x00"),
        "camera name with a lone surrogate": with_fields(images={"\x00raw:surrogate\x00": image(2, 2).tolist()}),
        "unknown option with a lone surrogate": with_fields(**{"\x00raw:surrogate\x00": 1}),
        "prompt of 1 MB": with_fields(high_level_prompt="p" * 1_000_000),
        "prompt a list": with_fields(high_level_prompt=["go"]),
        "images a list": with_fields(images=[image(2, 2).tolist()]),
        "image a string": with_fields(images={"base_0_rgb": "AAAA"}),
        "image of floats": with_fields(images={"base_0_rgb": (image(2, 2) / 255).tolist()}),
        "image of 256s": with_fields(images={"base_0_rgb": np.full((2, 2, 3), 256).tolist()}),
        "image 2 x 2 x 4": with_fields(images={"base_0_rgb": np.zeros((2, 2, 4), int).tolist()}),
        "image of 2**64": with_fields(images={"base_0_rgb": np.full((1, 1, 3), 2**64, object).tolist()}),
        "image 1 x 4097 x 3": with_fields(images={"base_0_rgb": np.zeros((1, 4097, 3), int).tolist()}),
        "image of nulls": with_fields(images={"base_0_rgb": [[[None, None, None]]]}),
        "image of booleans": with_fields(images={"base_0_rgb": [[[True, False, True]]]}),
        "unknown camera": with_fields(images={"bogus": image(2, 2).tolist()}),
        "9 cameras": with_fields(images={f"c{i}": image(1, 1).tolist() for i in range(9)}),
        "state of 300 numbers": with_fields(state=[0.0] * 300),
        "state of strings": with_fields(state=["1"]),
        "generate_subtask 1": with_fields(generate_subtask=1),
        "batch of 65": dumps({"batch": [base] * 65}),
        "batch empty": dumps({"batch": []}),
        "batch a map": dumps({"batch": {"0": base}}),
        "batch with a bad item": dumps({"batch": [base, {**base, "state": ["x"]}]}),
        "batch inside a batch": dumps({"batch": [{"batch": [base]}]}),
        "a JSON string": '"hello"',
        "null": "null",
        "empty text": "",
        "a binary frame": dumps(base).encode(),
        "NaN alone": "NaN",
        "truncated": dumps(base)[:-1],
        "trailing garbage": dumps(base) + "x",
    }


def test_json_api_answers_the_inputs_issue_9_names(server, model):
    since = len(server.lines)
    problems = []
    for name, message in _named_json_inputs().items():
        with ws_client.connect(server.ws, max_size=None, open_timeout=10) as connection:
            try:
                connection.send(message)
                problem = _json_problem(_json_recv(connection), _batch_size(message), model)
                connection.send(dumps(valid_json_request()))
                after = _json_recv(connection)
                if problem is None and (not isinstance(after, dict) or after.get("status") != "success"):
                    problem = f"the next well-formed request on the connection got {str(after)[:300]}"
            except TimeoutError:
                problem = f"no reply within {REPLY_TIMEOUT_S} s"
            except ConnectionClosed as e:
                problem = f"the server closed the connection: {e}"
        if problem is not None:
            problems.append(f"{name}: {problem}")
        if not server.alive():
            break
    assert not problems, "\n".join(problems)
    _assert_serving(server, model, "the named JSON inputs")
    _no_tracebacks(server, since)


# ============================================================================ openpi's protocol


OPENPI_KEYS = [*sorted(valid_openpi_observation()), *RTC_KEYS, "bogus", 1, b"prompt", None]


@st.composite
def openpi_messages(draw) -> bytes | str:
    obs: Any = valid_openpi_observation(draw(st.integers(0, 3)))
    kind = draw(st.sampled_from(["mutate", "mutate", "mutate", "whole", "bytes", "text"]))
    if kind == "whole":
        return packb(draw(msgpack_values))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "text":
        return draw(st.text(max_size=50))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["array", "value", "delete", "map_as_array", "prompt"]))
        key = draw(st.sampled_from(OPENPI_KEYS))
        if op == "array":
            obs[key] = draw(openpi_arrays())
        elif op == "value":
            obs[key] = draw(msgpack_values)
        elif op == "delete":
            obs.pop(key, None)
        elif op == "map_as_array":
            obs[key] = {b"shape": [7], b"dtype": "<f8"} if draw(st.booleans()) else {"a": 1}
        else:
            obs["prompt"] = draw(st.sampled_from([LONE_SURROGATE, INVALID_UTF8, "", "p" * 100_000, None, 3, b"go"]))
    try:
        return packb(obs)
    except (OverflowError, ValueError, TypeError):
        return b"\xc1"


def _describe_openpi(message: bytes | str) -> str:
    if isinstance(message, str):
        return f"text frame {message[:200]!r}"
    try:
        return repr(msgpack.unpackb(message, strict_map_key=False))[:1500]
    except Exception:
        return f"bytes {message[:200]!r} ({len(message)} bytes)"


def _openpi_well_formed(server: ServerProcess, model: dict[str, Any]) -> None:
    """openpi's own client, unchanged, is served."""
    policy = WebsocketClientPolicy(server.openpi)
    try:
        rng = np.random.default_rng(1)
        out = policy.infer(
            {
                "observation/exterior_image_1_left": image(8, 8),
                "observation/wrist_image_left": image(8, 8, 1),
                "observation/joint_position": rng.uniform(-1, 1, 7),
                "observation/gripper_position": rng.uniform(0, 1, 1),
                "prompt": "do something",
            }
        )
    finally:
        policy._ws.close()
    assert out["actions"].shape == (model["action_horizon"], 8)


@settings(SETTINGS, max_examples=40)
@given(st.lists(openpi_messages(), min_size=5, max_size=10))
def test_openpi_port_answers_mutated_observations_with_an_error_frame(server, model, messages):
    """~300 mutated openpi messages ('T', object, complex dtypes, odd shapes, maps as arrays, a
    map where data should be, invalid UTF-8, random msgpack), each on its own connection."""
    since = len(server.lines)
    problems = []
    for message in messages:
        problem = openpi_exchange(server.openpi, message)
        if problem is not None:
            problems.append(f"{problem}\n    for {_describe_openpi(message)}")
        if not server.alive():
            break
    assert not problems, "\n".join(problems[:10])
    _openpi_well_formed(server, model)
    _assert_serving(server, model, "a batch of mutated openpi messages")
    _no_tracebacks(server, since)


def test_openpi_port_answers_the_inputs_issue_9_names(server, model):
    obs = valid_openpi_observation()
    joint = "observation/joint_position"
    image_key = "observation/exterior_image_1_left"
    cases: dict[str, bytes | str] = {
        "dtype T with pointer data": packb(
            {**obs, image_key: {b"__ndarray__": True, b"data": T_DATA, b"dtype": "T", b"shape": [2]}}
        ),
        "dtype T, a bogus pointer": packb(
            {**obs, joint: {b"__ndarray__": True, b"data": b"\x01" * 16, b"dtype": "T", b"shape": [1]}}
        ),
        "dtype <U4": packb({**obs, joint: nd(np.array(["abcd"] * 7))}),
        "dtype object": packb(
            {**obs, joint: {b"__ndarray__": True, b"data": b"\x00" * 56, b"dtype": "|O", b"shape": [7]}}
        ),
        "dtype complex": packb({**obs, joint: nd(np.zeros(7, np.complex64))}),
        "a map as the joint array": packb({**obs, joint: {"a": 1}}),
        "a map as an image": packb({**obs, image_key: {"shape": [8, 8, 3]}}),
        "a list as the joint array": packb({**obs, joint: [0.0] * 7}),
        "a string as the joint array": packb({**obs, joint: "seven"}),
        "joint of 2**64-1 as a list": packb({**obs, joint: [2**64 - 1] * 7}),
        "shape [0] + [2**31-1] * 7": packb({**obs, joint: {**nd(np.zeros(0)), b"shape": [0] + [2**31 - 1] * 7}}),
        "shape [2**63-1]": packb({**obs, joint: {**nd(np.zeros(7)), b"shape": [2**63 - 1]}}),
        "data a map": packb({**obs, joint: {**nd(np.zeros(7)), b"data": {"a": 1}}}),
        "scalar of 2**64-1 as int8": packb(
            {**obs, joint: {b"__npgeneric__": True, b"data": 2**64 - 1, b"dtype": "|i1"}}
        ),
        "image of float NaN": packb({**obs, image_key: nd(np.full((8, 8, 3), np.nan, np.float32))}),
        "image of float 1e30": packb({**obs, image_key: nd(np.full((8, 8, 3), 1e30, np.float32))}),
        "image 2 dims": packb({**obs, image_key: nd(np.zeros((8, 8), np.uint8))}),
        "image of int64": packb({**obs, image_key: nd(np.zeros((8, 8, 3), np.int64))}),
        "image 2600 x 2600": packb({**obs, image_key: nd(np.zeros((2600, 2600, 3), np.uint8))}),
        "image 5000 x 5000": packb({**obs, image_key: nd(np.zeros((5000, 5000, 3), np.uint8))}),
        "joint of NaN": packb({**obs, joint: nd(np.full(7, np.nan))}),
        "joint of 6 values": packb({**obs, joint: nd(np.zeros(6))}),
        "mixed key types and a missing key": packb({1: 2, "observation/joint_position": nd(np.zeros(7))}),
        "bytes keys": packb({k.encode(): v for k, v in obs.items()}),
        "10k other keys, a required one missing": packb({f"key-{i}": 0 for i in range(10_000)}),
        "prompt a lone surrogate": packb({**obs, "prompt": LONE_SURROGATE}),
        "prompt invalid UTF-8": packb({**obs, "prompt": INVALID_UTF8}),
        "prompt a list": packb({**obs, "prompt": ["go"]}),
        "prompt of 1 MB": packb({**obs, "prompt": "p" * 1_000_000}),
        "nested 100 deep": packb({**obs, "extra": nested(100)}),
        "nested 100k deep": b"\x91" * 100_000 + b"\x00",
        "an ext type": packb({**obs, "extra": msgpack.ExtType(1, b"x")}),
        "not a map": packb([obs]),
        "a text frame": "hello",
        "empty": b"",
        "truncated": packb(obs)[:-3],
    }
    since = len(server.lines)
    problems = []
    for name, message in cases.items():
        problem = openpi_exchange(server.openpi, message)
        if problem is not None:
            problems.append(f"{name}: {problem}")
        if not server.alive():
            problems.append(f"the server died after {name}")
            break
    assert not problems, "\n".join(problems)
    _openpi_well_formed(server, model)
    _assert_serving(server, model, "the named openpi inputs")
    _no_tracebacks(server, since)


# ============================================================================ below the protocols


def test_websocket_ports_survive_raw_garbage_and_broken_handshakes(server, model):
    """Bytes that are not a WebSocket handshake, a handshake cut short, an HTTP request without
    upgrade, an oversized header line: each connection ends, and both ports serve afterwards."""
    openers = [
        b"\x00\xff" * 100,
        b"GET / HTTP/1.1\r\nHost: x\r\n",  # never finished: the client goes away
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: not-base64\r\nSec-WebSocket-Version: 13\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 100_000 + b"\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\nabc",
    ]
    for port in server.ports[2:]:
        for opener in openers:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.settimeout(0.3)  # an answer is not required, only that the server lives on
                with contextlib.suppress(OSError):
                    sock.sendall(opener)
                    sock.recv(4096)
    with ws_client.connect(server.ws, max_size=None, open_timeout=10) as connection:
        connection.send(dumps(valid_json_request()))
        assert _json_recv(connection)["status"] == "success"
    _openpi_well_formed(server, model)
    _assert_serving(server, model, "raw garbage at the WebSocket ports")


def test_xpub_survives_hostile_subscription_traffic(server, model):
    """An XSUB peer may send the XPUB anything: random frames, (un)subscriptions for topics it never
    subscribed to, thousands of prefixes. A robot's refreshes keep arriving and requests are served."""
    ctx = zmq.Context.instance()
    with RawDealer(server.router) as dealer:
        ack = dealer.request(
            {"type": "refresh", "id": 1, "robot": "xpub-robot",
             "options": {"subtask_refresh_interval": 0.2, "high_level_prompt": "tidy up"}},
            {"image/base_0_rgb": image()},
        )  # fmt: skip
        assert ack["type"] == "refresh_ack", ack
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"xpub-robot")
        sub.connect(server.pub)
        hostile = ctx.socket(zmq.XSUB)
        hostile.connect(server.pub)
        try:
            rng = np.random.default_rng(0)
            for i in range(3000):
                kind = i % 5
                if kind == 0:
                    hostile.send(b"\x00xpub-robot")  # an unsubscription it never subscribed
                elif kind == 1:
                    hostile.send(b"\x01" + rng.bytes(int(rng.integers(0, 64))))
                elif kind == 2:
                    hostile.send(rng.bytes(int(rng.integers(0, 64))))
                elif kind == 3:
                    hostile.send_multipart([b"\x01x", rng.bytes(8), b""])
                else:
                    hostile.send(b"")
            # Refreshes still reach the robot's own subscriber, well after the traffic.
            deadline = time.monotonic() + 10
            counts = []
            while time.monotonic() < deadline and len(counts) < 5:
                if sub.poll(200):
                    frames = sub.recv_multipart()
                    if frames[0] == b"xpub-robot":
                        counts.append(msgpack.unpackb(frames[1])["refresh_count"])
            assert len(counts) >= 5, f"refreshes stopped reaching the robot: {counts}"
            state = dealer.request({"type": "ping", "id": 2})["data"]["server"]
            assert state["refreshing"] >= 1, state
        finally:
            hostile.close(linger=0)
            sub.close(linger=0)
            dealer.request({"type": "bye", "id": 3, "robot": "xpub-robot"})
    _assert_serving(server, model, "hostile XPUB traffic")


def test_every_port_still_serves_at_the_end(server, model):
    """Runs last in this module: after all of the above the process is up on every port."""
    assert server.alive()
    _assert_serving(server, model, "every hostile test")
    with ws_client.connect(server.ws, max_size=None, open_timeout=10) as connection:
        connection.send(dumps(valid_json_request()))
        assert _json_recv(connection)["status"] == "success"
    _openpi_well_formed(server, model)
