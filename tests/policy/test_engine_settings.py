"""`EngineSettings`: every bad value is a `ValueError` naming its field when the settings are made,
and what the engine compiles (its buckets) follows from them. No engine, no device work."""

from __future__ import annotations

import dataclasses
import math

import pytest

from policy.engine.settings import EngineSettings


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"config_name": "pi05_tiyn"}, "unknown model config 'pi05_tiyn'. Did you mean 'pi05_tiny'"),
        ({"gpu_id": -1}, "gpu_id must be >= 0"),
        ({"param_dtype": "bfloat17"}, "param_dtype 'bfloat17' is not a dtype"),
        ({"param_dtype": "int8"}, "param_dtype must be a floating dtype"),
        ({"max_batch": 0}, "max_batch must be >= 1"),
        ({"batch_buckets": (1, 0)}, r"batch_buckets must all be >= 1, got \(1, 0\)"),
        ({"batch_window_ms": -1.0}, "batch_window_ms must be finite and >= 0"),
        ({"batch_window_ms": math.inf}, "batch_window_ms must be finite and >= 0"),
        ({"batch_window_ms": math.nan}, "batch_window_ms must be finite and >= 0"),
        ({"max_decoding_steps_limit": 0}, "max_decoding_steps_limit must be >= 1"),
        ({"decode_segment_tokens": 0}, "decode_segment_tokens must be >= 1"),
        ({"num_steps": 0}, "num_steps must be >= 1"),
        ({"deadline_s": 0.0}, "deadline_s must be finite and > 0"),
        ({"deadline_s": math.inf}, "deadline_s must be finite and > 0"),
        ({"max_queue": 0}, "max_queue must be >= 1"),
        ({"host_workers": 0}, "host_workers must be >= 1"),
        ({"image_resolutions": ((480, 0),)}, r"image_resolutions must be \(height, width\) pairs of 1..4096"),
        ({"image_resolutions": ((480, 640, 3),)}, r"image_resolutions must be \(height, width\) pairs"),
        ({"image_resolutions": ((480, 640),), "max_image_side": 600}, r"pairs of 1..600 .*got \(480, 640\)"),
        ({"max_image_resolutions": 0}, "max_image_resolutions must be >= 1"),
        ({"max_image_side": 0}, "max_image_side must be >= 1"),
        ({"rtc_method": "exact"}, "rtc_method must be one of"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_a_bad_value_names_its_field(changes, message):
    with pytest.raises(ValueError, match=message):
        EngineSettings(**{"config_name": "pi05_tiny", **changes})


def test_the_defaults_and_the_bounds_themselves_are_accepted():
    EngineSettings()
    EngineSettings(
        "pi05_tiny",
        gpu_id=0,
        param_dtype="bfloat16",
        max_batch=1,
        batch_buckets=(),
        batch_window_ms=0.0,
        max_decoding_steps_limit=1,
        decode_segment_tokens=1,
        num_steps=1,
        max_queue=1,
        host_workers=1,
        image_resolutions=((1, 4096),),
        max_image_resolutions=1,
        rtc_method="identity",
        seed=0,
    )


def test_buckets_stop_at_max_batch_and_include_it():
    assert EngineSettings("pi05_tiny", max_batch=6, batch_buckets=(8, 1, 4, 2)).buckets == (1, 2, 4, 6)
    assert EngineSettings("pi05_tiny", max_batch=4, batch_buckets=(4, 2, 2)).buckets == (2, 4)
    assert EngineSettings("pi05_tiny", max_batch=3, batch_buckets=()).buckets == (3,)


def test_sequences_are_kept_as_tuples_and_the_settings_cannot_change():
    buckets, resolutions = [1, 2], [[480, 640]]
    settings = EngineSettings("pi05_tiny", max_batch=2, batch_buckets=buckets, image_resolutions=resolutions)
    buckets.append(4)
    resolutions[0][0] = 1
    assert settings.batch_buckets == (1, 2) and settings.image_resolutions == ((480, 640),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.max_batch = 4  # type: ignore[misc]
    assert dataclasses.replace(settings, max_batch=1).buckets == (1,)
    with pytest.raises(ValueError, match="max_queue must be >= 1"):
        dataclasses.replace(settings, max_queue=0)  # a changed copy is checked too
