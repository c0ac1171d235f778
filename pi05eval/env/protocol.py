"""Constants of openpi's LIBERO evaluation client, each with where it comes from.

Source: openpi `examples/libero/main.py` (see ../shared/SPEC-pi05.md §8). Changing any of these is a deviation from
the published protocol and must be an explicit, named runner option.
"""

from __future__ import annotations

SEED = 7  # `env.seed(7)` once per task env, trials then run in order on it
NUM_STEPS_WAIT = 10  # objects settle while the robot holds still
DUMMY_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # `LIBERO_DUMMY_ACTION`: no motion, gripper open
CAMERA_SIZE = 256  # `OffScreenRenderEnv(camera_heights=256, camera_widths=256)`
IMAGE_SIZE = 224  # `resize_with_pad(img, 224, 224)`: PIL bilinear, no padding for a square 256 input
REPLAN_STEPS = 5  # actions of each chunk executed open-loop before the next query
NUM_INIT_STATES = 50  # LIBERO ships 50 fixed initial states per task

# Max policy steps per suite: "longest training demo" of each suite, rounded up (openpi main.py).
MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
SUITES = tuple(MAX_STEPS)
# `suite=libero_4`: the four standard suites openpi reports (spatial, object, goal, long).
SUITE_GROUPS = {"libero_4": ("libero_spatial", "libero_object", "libero_goal", "libero_10")}
