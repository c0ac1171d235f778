"""Image and state extraction match openpi's client: PIL resize after a 180° turn; robosuite's quat2axisangle."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from robosuite.utils.transform_utils import quat2axisangle

from pi05eval.env.observation import preprocess_image, quat_to_axis_angle, robot_state


def test_image_is_rotated_180_and_resized_like_pil() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    out = preprocess_image(img)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    reference = np.asarray(Image.fromarray(img[::-1, ::-1].copy()).resize((224, 224), Image.BILINEAR))
    assert np.abs(out.astype(int) - reference.astype(int)).max() <= 1


def test_rotation_moves_the_top_left_corner_to_the_bottom_right() -> None:
    img = np.zeros((256, 256, 3), np.uint8)
    img[:32, :32] = 255  # bright top-left block
    out = preprocess_image(img)
    assert out[-10:, -10:].min() == 255 and out[:10, :10].max() == 0


def test_resize_antialiases_unlike_plain_bilinear_sampling() -> None:
    # a 1-pixel checkerboard averages to grey under PIL's antialiased filter; point sampling would keep 0/255
    img = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    out = preprocess_image(img)
    assert 60 < out.mean() < 195 and out.std() < 60


def test_bad_images_are_rejected() -> None:
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(np.zeros((256, 256, 3), np.float32))
    with pytest.raises(ValueError, match="square"):
        preprocess_image(np.zeros((256, 200, 3), np.uint8))


@pytest.mark.parametrize(
    "quat",
    [
        [0.0, 0.0, 0.0, 1.0],  # identity → zero vector
        [1.0, 0.0, 0.0, 0.0],  # angle π about x
        [0.99937431, -0.02660945, -0.02257722, -0.00576225],  # a real LIBERO eef pose, near π
        [0.0, 0.0, 0.0, -1.0],  # -identity (angle 2π): den = 0 → zeros
        [0.0, 0.7071068, 0.0, -0.7071068],  # negative w: angle > π, sign kept
        [0.0, 0.0, 1e-9, 1.0 + 1e-9],  # w slightly above 1 from rounding: clipped
    ],
)
def test_quat_to_axis_angle_matches_robosuite(quat: list[float]) -> None:
    ours = quat_to_axis_angle(np.array(quat))
    ref = quat2axisangle(np.array(quat, dtype=np.float64).copy())
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_negative_w_is_not_canonicalised() -> None:
    # w < 0 gives an angle in (π, 2π); a canonicalising conversion would return the short rotation instead
    v = quat_to_axis_angle(np.array([0.0, 0.0, np.sin(0.9 * np.pi), np.cos(0.9 * np.pi)]))
    assert np.linalg.norm(v) == pytest.approx(1.8 * np.pi, abs=1e-6)


def test_state_is_pos_axis_angle_gripper() -> None:
    raw = {
        "robot0_eef_pos": np.array([0.1, 0.2, 0.3]),
        "robot0_eef_quat": np.array([1.0, 0.0, 0.0, 0.0]),
        "robot0_gripper_qpos": np.array([0.02, -0.02]),
    }
    np.testing.assert_allclose(robot_state(raw), [0.1, 0.2, 0.3, np.pi, 0, 0, 0.02, -0.02], atol=1e-9)
