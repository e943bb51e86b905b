"""Robot layout adapters: openpi's DROID, LIBERO and ALOHA mappings, number for number."""

from __future__ import annotations

import math

import numpy as np
import pytest

from robots.adapters import BASE, LEFT_WRIST, RIGHT_WRIST, get_adapter, gripper_from_angular


def test_droid_maps_cameras_state_and_actions():
    rng = np.random.default_rng(0)
    obs = get_adapter("droid").example(rng)
    obs["observation/gripper_position"] = 0.25  # a scalar is accepted, as openpi does
    inputs = get_adapter("droid").to_model(obs)
    assert set(inputs.images) == {BASE, LEFT_WRIST}  # right wrist masked, not invented
    np.testing.assert_array_equal(inputs.images[BASE], obs["observation/exterior_image_1_left"])
    np.testing.assert_allclose(inputs.state, [*obs["observation/joint_position"], 0.25])
    assert inputs.prompt == "do something"
    assert get_adapter("droid").from_model(np.ones((15, 32))).shape == (15, 8)


def test_libero_and_chw_float_images():
    obs = get_adapter("libero").example(np.random.default_rng(1))
    chw = np.random.default_rng(2).uniform(0, 1, (3, 64, 48))
    obs["observation/image"] = chw
    inputs = get_adapter("libero").to_model(obs)
    assert inputs.images[BASE].shape == (64, 48, 3) and inputs.images[BASE].dtype == np.uint8
    np.testing.assert_array_equal(inputs.images[BASE], (255 * chw).astype(np.uint8).transpose(1, 2, 0))
    assert inputs.state.shape == (8,)
    assert get_adapter("libero").from_model(np.ones((10, 32))).shape == (10, 7)


def test_aloha_flips_joints_and_converts_grippers():
    state = np.linspace(0.1, 1.4, 14)
    obs = {
        "images": {"cam_high": np.zeros((3, 8, 8), np.uint8), "cam_left_wrist": np.zeros((3, 8, 8), np.uint8)},
        "state": state,
    }
    inputs = get_adapter("aloha").to_model(obs)
    assert set(inputs.images) == {BASE, LEFT_WRIST} and RIGHT_WRIST not in inputs.images
    flip = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1])
    expected = flip * state
    # Gripper: linear position -> Interbotix angle -> pi0's normalized range, by hand for index 6.
    linear = state[6] * (0.05800 - 0.01844) + 0.01844
    angle = math.asin(max(-1.0, min(1.0, (0.022**2 + linear**2 - 0.036**2) / (2 * 0.022 * linear))))
    assert inputs.state[6] == pytest.approx((angle - 0.5476) / (1.6296 - 0.5476))
    np.testing.assert_allclose(np.delete(inputs.state, [6, 13]), np.delete(expected, [6, 13]))
    actions = np.full((50, 32), 0.3)
    out = get_adapter("aloha").from_model(actions)
    assert out.shape == (50, 14)
    assert out[0, 1] == pytest.approx(-0.3) and out[0, 0] == pytest.approx(0.3)
    assert out[0, 6] == pytest.approx((0.3 + 0.5476 + 0.6213) / (1.4910 + 0.6213))
    assert gripper_from_angular(np.array([-0.5476]))[0] == pytest.approx(0.6213 / 2.1123)


def test_lerobot_passes_the_fine_tunes_names_through():
    obs = get_adapter("lerobot").example(np.random.default_rng(3))
    chw = np.random.default_rng(4).uniform(0, 1, (3, 48, 64)).astype(np.float32)  # as LeRobot's frames are
    obs["observation.images.wrist"] = chw
    obs["observation.velocity"] = np.zeros(6)  # another feature of the dataset: not the model's
    inputs = get_adapter("lerobot").to_model(obs)
    assert set(inputs.images) == {"observation.images.front", "observation.images.wrist"}  # the engine's aliases
    np.testing.assert_array_equal(inputs.images["observation.images.front"], obs["observation.images.front"])
    np.testing.assert_array_equal(
        inputs.images["observation.images.wrist"], (255 * chw).astype(np.uint8).transpose(1, 2, 0)
    )
    np.testing.assert_array_equal(inputs.state, obs["observation.state"])
    assert inputs.prompt == "do something"  # LeRobot's `task`
    assert get_adapter("lerobot").to_model({**obs, "prompt": "stack"}).prompt == "stack"  # `prompt` wins
    actions = np.random.default_rng(5).uniform(-1, 1, (10, 6))
    np.testing.assert_array_equal(get_adapter("lerobot").from_model(actions), actions)


def test_lerobot_takes_the_served_models_action_dim():
    assert get_adapter("lerobot").action_dim is None
    assert get_adapter("lerobot").for_model(6).action_dim == 6
    assert get_adapter("droid").for_model(6) is get_adapter("droid")  # a fixed layout keeps its own


@pytest.mark.parametrize(
    ("layout", "obs", "message"),
    [
        ("droid", {"observation/joint_position": [0] * 7}, "missing 'observation/gripper_position'"),
        ("droid", {"observation/joint_position": [0] * 6, "observation/gripper_position": 0}, "7 values"),
        ("aloha", {"images": {"cam_top": np.zeros((3, 4, 4), np.uint8)}, "state": [0] * 14}, "cameras must be"),
        ("aloha", {"images": {"cam_low": np.zeros((3, 4, 4), np.uint8)}, "state": [0] * 14}, "'cam_high'"),
        ("libero", {"observation/image": np.zeros((4, 4), np.uint8)}, "3 dims"),
        (
            "lerobot",
            {"front": np.zeros((4, 4, 3), np.uint8)},
            r"missing 'observation.images.<camera>'; it has \['front'\]",
        ),
        ("lerobot", {"observation.images.front": np.zeros((4, 4, 3), np.uint8)}, "missing 'observation.state'"),
        (
            "lerobot",
            {"observation.images.a": np.zeros((4, 4, 3), np.uint8), "observation.state": [0], "task": 1},
            "task must be a string",
        ),
    ],
)
def test_bad_observations_name_the_problem(layout, obs, message):
    with pytest.raises(ValueError, match=message):
        get_adapter(layout).to_model(obs)


def test_unknown_layout():
    with pytest.raises(ValueError, match="unknown robot layout 'ur5'"):
        get_adapter("ur5")
