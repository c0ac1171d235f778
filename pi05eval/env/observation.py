"""From a robosuite observation dict to what openpi's LIBERO client sends its policy.

Images: 180° rotation (`img[::-1, ::-1]`) then PIL bilinear 256 → 224 (PIL antialiases when shrinking; openpi's
`resize_with_pad` adds no padding for a square input). State: eef position, axis-angle of the eef quaternion,
gripper joint positions (8-d).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from pi05eval.env.protocol import IMAGE_SIZE
from pi05eval.policy.base import Observation

IMAGE_KEYS = ("agentview_image", "robot0_eye_in_hand_image")


def preprocess_image(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """[H, W, 3] uint8 camera image → [size, size, 3] uint8, rotated 180° and resized like openpi's client."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] uint8 image, got {image.dtype} {image.shape}")
    rotated = np.ascontiguousarray(image[::-1, ::-1])
    if rotated.shape[:2] == (size, size):
        return rotated
    if rotated.shape[0] != rotated.shape[1]:
        raise ValueError(f"expected a square camera image, got {rotated.shape[:2]}")
    return np.asarray(Image.fromarray(rotated).resize((size, size), resample=Image.BILINEAR))


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion → axis-angle [3] with the angle in [0, 2π), as robosuite and openpi compute it.

    The sign of w is kept (no canonicalisation): the Panda gripper points down, near an angle of π, where
    canonicalising (e.g. scipy's `as_rotvec`) flips the vector by ≈2π.
    """
    q = np.asarray(quat, dtype=np.float64)
    w = float(np.clip(q[3], -1.0, 1.0))
    den = np.sqrt(1.0 - w * w)
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * np.arccos(w) / den


def robot_state(raw: Mapping[str, Any]) -> np.ndarray:
    """[8]: eef pos (3), eef axis-angle (3), gripper qpos (2)."""
    return np.concatenate(
        [
            np.asarray(raw["robot0_eef_pos"], dtype=np.float64),
            quat_to_axis_angle(raw["robot0_eef_quat"]),
            np.asarray(raw["robot0_gripper_qpos"], dtype=np.float64),
        ]
    )


def make_observation(
    raw: Mapping[str, Any], prompt: str, goal: tuple[tuple[str, ...], ...] | None = None, privileged: bool = False
) -> Observation:
    """Build the policy's observation; `privileged=True` adds every non-image simulator key and the goal."""
    extra = None
    if privileged:
        extra = {k: np.array(v) for k, v in raw.items() if k not in IMAGE_KEYS}
        extra["goal"] = goal or ()
    return Observation(
        image=preprocess_image(raw["agentview_image"]),
        wrist_image=preprocess_image(raw["robot0_eye_in_hand_image"]),
        state=robot_state(raw),
        prompt=prompt,
        privileged=extra,
    )
