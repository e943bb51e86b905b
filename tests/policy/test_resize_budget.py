"""The camera-resolution budget of `policy.engine.images.Resizer`: odd resolutions cannot lock a camera out
(the least recently used undeclared one is evicted, declared ones never), an evicted executable still
held keeps working, new compiles are rate-bounded (an injected clock: no wall-clock budgets), and
threads share one compile. Real compiles on the host CPU, no model."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from configs import DEFAULT_IMAGE_RESOLUTIONS, get_model_config
from policy.engine.images import Resizer, resize_with_pad
from policy.engine.validation import RequestValidator
from policy.normalize import IDENTITY
from policy.prompts import Prompts
from policy.request import InferenceRequest, Observation, Options
from policy.tokenizer import load_tokenizer
from runtime.robot.virtual_time import VirtualClock

COMPILING = "compiling the image resize for undeclared camera resolution"
EVICTED = "evicted the image resize for camera resolution"


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def _validator(resizer: Resizer) -> RequestValidator:
    """The engine's validator on the tiny config (its shipped tokenizer), no model."""
    cfg = get_model_config("pi05_tiny")
    return RequestValidator(cfg, Prompts(cfg, load_tokenizer(cfg)), IDENTITY, resizer, 4, 4096)


def _request(image: np.ndarray) -> InferenceRequest:
    return InferenceRequest(Observation({"base_0_rgb": image}), "go", Options(max_decoding_steps=4))


def test_odd_resolutions_no_longer_lock_out_a_normal_camera(caplog):
    """The adversary's case with the engine's defaults: 14 odd resolutions through validation and
    resizing used to fill all 16 slots, and a 480x848 camera was refused until a restart."""
    clock = VirtualClock()
    resizer = Resizer(224, DEFAULT_IMAGE_RESOLUTIONS, 16, clock=clock)
    resizer.warm()
    validator = _validator(resizer)
    with caplog.at_level(logging.WARNING, logger="policy.engine.images"):
        for i in range(14):
            image = _image(50 + i, 60)
            validator.check(_request(image))
            resizer(image, "base_0_rgb")
            clock.advance(resizer.compile_interval_s)  # one per interval: the rate allows each
        camera = _image(480, 848)
        validator.check(_request(camera))  # refused before the fix: "already serves 16 camera resolutions"
        np.testing.assert_array_equal(resizer(camera, "base_0_rgb"), resize_with_pad(camera))
    assert (480, 848) in resizer.compiled and len(resizer.compiled) == 16
    assert set(DEFAULT_IMAGE_RESOLUTIONS) <= set(resizer.compiled)
    # 12 undeclared slots: odd resolutions 13 and 14 and the camera evicted the three oldest.
    assert _messages(caplog, EVICTED) == [
        f"{EVICTED} {h}x60, the least recently used of 12 undeclared ones; it compiles again if it comes back"
        for h in (50, 51, 52)
    ]


def test_the_least_recently_used_is_evicted_and_declared_ones_never(caplog):
    resizer = Resizer(16, [(8, 8), (9, 9)], max_resolutions=4, compile_burst=100)  # 2 undeclared slots
    resizer.warm()
    with caplog.at_level(logging.WARNING, logger="policy.engine.images"):
        resizer(_image(10, 10))
        resizer(_image(11, 11))
        resizer(_image(10, 10))  # 10x10 is now the most recently used: 11x11 goes first
        resizer(_image(12, 12))
        assert resizer.compiled == ((8, 8), (9, 9), (10, 10), (12, 12))
        for side in range(17, 24):  # a stream of odd sizes only ever replaces undeclared ones
            resizer(_image(side, side))
        resizer(_image(8, 8))
        resizer(_image(9, 9))
    assert resizer.compiled[:2] == ((8, 8), (9, 9)) and len(resizer.compiled) == 4
    assert _messages(caplog, EVICTED)[0].startswith(f"{EVICTED} 11x11,")
    assert len(_messages(caplog, EVICTED)) == 8
    assert len(_messages(caplog, COMPILING)) == 10  # 10, 11, 12 and 17..23: the declared ones never again


def test_an_evicted_executable_held_by_a_caller_keeps_working():
    """A request being prepared holds its resolution's executable; another request's new resolution
    evicting it meanwhile must not break it."""
    resizer = Resizer(16, (), max_resolutions=1, compile_burst=100)
    held = resizer.executable((20, 30))
    resizer(_image(21, 31))  # evicts 20x30
    assert resizer.compiled == ((21, 31),)
    image = _image(20, 30, seed=5)
    np.testing.assert_array_equal(np.asarray(held(image)), resize_with_pad(image, 16))


def test_new_compiles_are_rate_bounded_and_the_refusal_recovers(caplog):
    clock = VirtualClock()
    resizer = Resizer(16, [(8, 8)], max_resolutions=8, compile_burst=2, compile_interval_s=5.0, clock=clock)
    resizer.warm()
    validator = _validator(resizer)
    resizer(_image(30, 30))
    resizer(_image(31, 31))
    # The bucket is empty: the validator refuses a new resolution and says when to retry; compiled
    # ones and declared ones pass.
    with pytest.raises(ValueError, match=r"image 'base_0_rgb' is 32x32, .* retry in 5\.0 s"):
        validator.check(_request(_image(32, 32)))
    for side in (30, 31, 8):
        validator.check(_request(_image(side, side)))
    # A request that passed validation before the bucket emptied is refused when it is prepared.
    with pytest.raises(ValueError, match=r"image 'base_0_rgb' is 32x32, .* retry in 5\.0 s"):
        resizer(_image(32, 32), "base_0_rgb")
    clock.advance(2.0)
    with pytest.raises(ValueError, match=r"retry in 3\.0 s"):
        validator.check(_request(_image(32, 32)))
    clock.advance(3.0)
    validator.check(_request(_image(32, 32)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="policy.engine.images"):
        resizer(_image(32, 32))
    assert _messages(caplog, COMPILING) == [
        f"{COMPILING} 32x32 while serving; declare it in the engine's image_resolutions"
    ]


def test_a_flood_of_odd_resolutions_compiles_at_the_rate_and_spares_a_camera_in_use(caplog):
    """10 new resolutions a second for 20 s against the default rate (4 at once, then 1 a second):
    at most 24 compiles, the rest refused, and a camera sending every 2 s compiles only once."""
    clock = VirtualClock()
    resizer = Resizer(16, [(8, 8)], max_resolutions=9, clock=clock)  # 8 undeclared slots
    resizer.warm()
    camera = _image(40, 50)
    refused = 0
    with caplog.at_level(logging.WARNING, logger="policy.engine.images"):
        resizer(camera)
        for tick in range(200):
            clock.t = tick / 10
            if tick % 20 == 0:
                resizer(camera)
            try:
                resizer(_image(10 + tick % 97, 11 + tick // 97))
            except ValueError:
                refused += 1
    compiles = _messages(caplog, COMPILING)
    assert len(compiles) <= 4 + 20, len(compiles)
    assert refused >= 200 - 24
    assert sum("40x50" in m for m in compiles) == 1
    assert (40, 50) in resizer.compiled


def test_threads_share_one_compile_and_survive_evictions(caplog):
    resizer = Resizer(16, (), max_resolutions=2, compile_burst=1000)
    images = [_image(20 + i, 25, seed=i) for i in range(5)]
    expected = [resize_with_pad(image, 16) for image in images]
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def same_new_resolution() -> None:
        try:
            barrier.wait()
            np.testing.assert_array_equal(resizer(images[0]), expected[0])
        except BaseException as e:
            errors.append(e)

    def cycling(offset: int) -> None:
        try:
            barrier.wait()
            for k in range(6):  # 5 resolutions over 2 slots: evictions all the time
                i = (offset + k) % len(images)
                np.testing.assert_array_equal(resizer(images[i]), expected[i])
        except BaseException as e:
            errors.append(e)

    with caplog.at_level(logging.WARNING, logger="policy.engine.images"):
        threads = [threading.Thread(target=same_new_resolution) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len(_messages(caplog, COMPILING)) == 1  # four callers, one compile

    barrier = threading.Barrier(4)
    threads = [threading.Thread(target=cycling, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(resizer.compiled) == 2
