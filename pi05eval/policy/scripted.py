"""A privileged-state oracle for libero_spatial: grasp the bowl by its rim, carry it over the plate, set it down.

`ScriptedPolicy` reads ground-truth poses from `Observation.privileged` (the robosuite observation dict plus the
task's BDDL goal) and servos the end effector with OSC_POSE deltas (±1 = ±5 cm / ±0.5 rad per step). It is a
baseline and a harness check, not a learned policy: it only attempts goals of the form `(on <bowl> <plate>)`.

The episode is a small phase machine (approach → descend → close → carry → lower → release). Each call
re-reads the scene and moves between phases on observed facts (gripper aligned and at rest, fingers settled,
bowl following the hand, bowl over the plate), so a dropped bowl, a missed grasp or a stalled arm sends it back
to approach (on another side of the rim when stalled); no transition counts calls. Each chunk is a saturated PD
servo rolled forward through a fitted model of the arm's response, so the open-loop tail does not overshoot.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pi05eval.policy.base import ACTION_DIM, ActionChunk, Observation, TaskInfo, UnsupportedTaskError

logger = logging.getLogger(__name__)

SUPPORTED_SUITE = "libero_spatial"
POS_SCALE = 0.05  # m per unit of position action (robosuite OSC_POSE output_max)
ROT_SCALE = 0.5  # rad per unit of rotation action
GRIPPER_OPEN, GRIPPER_CLOSE = -1.0, 1.0
OPEN_WIDTH = 0.07  # finger separation (m) above which the gripper counts as open (fully open ≈ 0.078)
MISSED_WIDTH = 0.004  # closed on nothing (≈ 0.002); on the bowl's rim the fingers stop at ≈ 0.007
# Arm response to position actions (per axis), fitted by least squares on 600 steps of random piecewise-constant
# actions (one-step rmse 0.2-0.6 mm): d_k = Σ_j ARM_D[j] d_{k-1-j} + Σ_j ARM_A[j] u_{k-j}, where d is the eef
# displacement over a step and u = action * POS_SCALE. Steady state ≈ 0.21 u (≈ 1.1 cm/step at |a| = 1); the
# arm keeps drifting ~2 cm after a full-speed move stops, which is why the servo brakes through this model.
ARM_D = (1.15, -0.22)
ARM_A = (0.094, -0.016, -0.063)
ROT_RESPONSE = 0.22  # fraction of a commanded rotation delta covered per step (step response, 20 Hz)
SUPPORTED_GOALS = "a single goal predicate ('on', <…bowl…>, <…plate…>), e.g. ('on', 'akita_black_bowl_1', 'plate_1')"
# Gripper pointing straight down with fingers closing along world y: 180° about x.
_R_DOWN = np.diag([1.0, -1.0, -1.0])


class Phase(enum.Enum):
    APPROACH = "approach"  # gripper open, move above the grasp point (rising first when low)
    DESCEND = "descend"  # straight down onto the rim
    CLOSE = "close"  # hold still, close the fingers until they stop moving
    CARRY = "carry"  # lift and bring the bowl over the plate
    LOWER = "lower"  # set the bowl down onto the plate
    RELEASE = "release"  # open and back off


@dataclass(frozen=True)
class Scene:
    """The quantities the oracle reads from one privileged observation (world frame, metres)."""

    eef_pos: np.ndarray  # [3]
    eef_rot: np.ndarray  # [3, 3]
    gripper_width: float  # finger separation
    bowl_pos: np.ndarray  # [3] body origin (bottom centre)
    plate_pos: np.ndarray  # [3]
    others: dict[str, np.ndarray]  # name -> [3], every other object in the scene

    @classmethod
    def from_privileged(cls, priv: Mapping[str, Any], bowl: str, plate: str) -> Scene:
        need = (f"{bowl}_pos", f"{plate}_pos", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
        if missing := [k for k in need if k not in priv]:
            raise KeyError(f"privileged observation lacks {missing}; it has {sorted(priv)}")
        arr = {k: np.asarray(v, dtype=np.float64) for k, v in priv.items() if k != "goal"}
        objects = {k[:-4]: v for k, v in arr.items() if k.endswith("_pos") and "_to_" not in k and "robot0_" not in k}
        others = {k: v for k, v in objects.items() if k not in (bowl, plate)}
        qpos = arr["robot0_gripper_qpos"]  # [2]
        eef_rot = quat_to_mat(arr["robot0_eef_quat"])
        return cls(arr["robot0_eef_pos"], eef_rot, float(qpos[0] - qpos[1]), objects[bowl], objects[plate], others)


def quat_to_mat(q: np.ndarray) -> np.ndarray:
    """Rotation matrix [3, 3] of a unit quaternion in robosuite's (x, y, z, w) order."""
    x, y, z, w = q / np.linalg.norm(q)
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])  # cross-product matrix of the vector part
    return np.eye(3) + 2.0 * w * k + 2.0 * k @ k


def mat_to_rotvec(r: np.ndarray) -> np.ndarray:
    """Axis-angle vector [3] (angle in [0, π]) of a rotation matrix [3, 3]."""
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = float(np.arccos(cos))
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    if angle > np.pi - 1e-3:  # near π the skew part vanishes: take the axis from the symmetric part
        d = np.sqrt(np.clip((np.diag(r) + 1.0) / 2.0, 0.0, None))
        k = int(np.argmax(d))
        axis = (r[:, k] + r[k, :]) / 2.0
        axis[k] = d[k] ** 2 * 2.0
    return axis / np.linalg.norm(axis) * angle


def yaw_rot(yaw: float) -> np.ndarray:
    """Target gripper orientation [3, 3]: pointing down, turned by `yaw` about world z."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ _R_DOWN


def parse_goal(goal: tuple[tuple[str, ...], ...]) -> tuple[str, str] | None:
    """(bowl, plate) for a goal this policy can execute, else None."""
    if len(goal) != 1 or len(goal[0]) != 3:
        return None
    pred, obj, target = (str(s) for s in goal[0])
    if pred.lower() != "on" or "bowl" not in obj or "plate" not in target:
        return None
    return obj, target


def wrap_half_turn(angle: float) -> float:
    """`angle` folded into [-π/2, π/2): the two-finger gripper looks the same after a half turn."""
    return (angle + np.pi / 2) % np.pi - np.pi / 2


class ScriptedPolicy:
    """Grasp-and-place oracle for libero_spatial's `(on <bowl> <plate>)` tasks, driven by privileged state."""

    name = "scripted"
    needs_privileged = True
    uses_cuda = False

    stateful = True  # keeps the grasp and phase of its episode: the runner gives each env its own copy

    def __init__(
        self,
        name: str = "scripted",
        action_horizon: int = 10,
        pos_gain: float = 2.0,  # position action per (error / 5 cm)
        vel_gain: float = 5.0,  # position action per (predicted displacement per step / 5 cm), damping
        rot_gain: float = 1.5,  # rotation action per (angle error / 0.5 rad)
        max_action: float = 1.0,  # saturation of position and rotation actions
        lift_action: float = 0.4,  # saturation while lifting the bowl off its support (a jerk tears the rim loose)
        replan_steps: int = 5,  # actions the runner executes per call (openpi: 5); to estimate the arm's speed
        grasp_radius: float = 0.046,  # m from bowl centre to the grip point on the rim
        grasp_height: float = 0.035,  # m from bowl origin (its base) up to the grip site when grasping
        hover_height: float = 0.07,  # m above the grasp point before the vertical descent
        funnel_slope: float = 0.5,  # m of extra height per m of horizontal distance while travelling
        funnel_max: float = 0.12,  # m, cap on that extra height
        carry_clearance: float = 0.09,  # m between bowl base and plate while carrying
        lift_height: float = 0.08,  # m to lift straight up after grasping, before any sideways move
        place_height: float = 0.015,  # m of bowl base above plate origin that counts as set down
        pregrasp_width: float = 0.045,  # m finger opening while descending (narrower fits next to objects)
        robot_base_xy: tuple[float, float] = (-0.66, 0.0),  # LIBERO's Panda mount in world xy
        comfortable_reach: float = 0.70,  # m from the base (xy) beyond which grasp points are penalized
        pos_tol: float = 0.006,  # m, "arrived"
        yaw_tol: float = 0.08,  # rad, "aligned"
    ) -> None:
        if action_horizon < 1:
            raise ValueError(f"action_horizon must be >= 1, got {action_horizon}")
        self.name = name
        self.action_horizon = action_horizon
        self.pos_gain, self.vel_gain, self.rot_gain, self.max_action = pos_gain, vel_gain, rot_gain, max_action
        self.replan_steps, self.lift_action, self.pregrasp_width = replan_steps, lift_action, pregrasp_width
        self.grasp_radius, self.grasp_height, self.hover_height = grasp_radius, grasp_height, hover_height
        self.funnel_slope, self.funnel_max, self.lift_height = funnel_slope, funnel_max, lift_height
        self.carry_clearance, self.place_height = carry_clearance, place_height
        self.robot_base_xy, self.comfortable_reach = np.asarray(robot_base_xy, dtype=np.float64), comfortable_reach
        self.pos_tol, self.yaw_tol = pos_tol, yaw_tol
        self.reset()

    @property
    def phase(self) -> Phase:
        """The phase the last call acted in (APPROACH after `reset()`)."""
        return self._phase

    @property
    def grasp_direction(self) -> np.ndarray | None:
        """Unit xy vector [2] from the bowl centre to the chosen rim point; None until chosen."""
        return None if self._grasp_dir is None else self._grasp_dir.copy()

    @property
    def grasp_yaw(self) -> float:
        """Gripper yaw (rad about world z, 0 = fingers closing along world y) for the chosen grasp."""
        return self._grasp_yaw

    # -- Policy protocol ---------------------------------------------------------------------------------------
    def check_task(self, task: TaskInfo) -> None:
        if task.suite != SUPPORTED_SUITE:
            raise UnsupportedTaskError(
                f"policy 'scripted' supports only suite '{SUPPORTED_SUITE}' (goals: {SUPPORTED_GOALS}); "
                f"got suite '{task.suite}' (task {task.task_id}: {task.language!r})"
            )
        if parse_goal(task.goal) is None:
            raise UnsupportedTaskError(
                f"policy 'scripted' supports only {SUPPORTED_GOALS}; task {task.task_id} of '{task.suite}' "
                f"has goal {task.goal}"
            )

    def warmup(self) -> float:
        return 0.0

    def reset(self) -> None:
        self._phase = Phase.APPROACH
        self._grasp_dir: np.ndarray | None = None  # [2] unit vector, bowl centre → grip point
        self._grasp_yaw = 0.0
        self._last_width: float | None = None
        self._hold_offset: np.ndarray | None = None  # [3] eef − bowl when the fingers closed
        self._blocked: list[np.ndarray] = []  # grasp directions where the descent got stuck
        self._last_eef: np.ndarray | None = None  # [3] at the previous call
        self._last_u: np.ndarray | None = None  # [2, 3] last two position deltas executed (m), newest first
        self._prev_phase: Phase | None = None
        self._lift_z = -np.inf  # eef height to reach before carrying sideways
        self._lifted = False
        self._stalls = 0  # consecutive calls that barely moved while far from the waypoint

    def infer(self, obs: Observation) -> ActionChunk:
        priv = obs.privileged
        if priv is None or "goal" not in priv:
            raise ValueError("policy 'scripted' needs Observation.privileged with the task 'goal' (needs_privileged)")
        objs = parse_goal(tuple(tuple(p) for p in priv["goal"]))
        if objs is None:
            raise UnsupportedTaskError(f"policy 'scripted' supports only {SUPPORTED_GOALS}; goal {priv['goal']}")
        scene = Scene.from_privileged(priv, *objs)
        for _ in range(len(Phase)):  # settle: one call may pass several satisfied phases
            nxt = self._next_phase(scene)
            if nxt is self._phase:
                break
            logger.debug("phase %s -> %s", self._phase.value, nxt.value)
            self._phase = nxt
        goal, gripper, mode = self._target(scene)
        actions = self._servo(scene, goal, gripper, mode)  # [H, 7]
        self._last_width, self._last_eef, self._prev_phase = scene.gripper_width, scene.eef_pos.copy(), self._phase
        k = min(self.replan_steps, self.action_horizon)
        self._last_u = actions[max(k - 2, 0) : k, :3][::-1] * POS_SCALE if k >= 2 else None
        return ActionChunk(actions=actions)

    # -- grasp choice ------------------------------------------------------------------------------------------
    def _choose_grasp(self, scene: Scene) -> None:
        """Pick the rim point: closing axis near the robot→bowl line, outer finger clear of other objects."""
        c = scene.bowl_pos
        radial = c[:2] - self.robot_base_xy
        radial /= np.linalg.norm(radial)
        reach = self.grasp_radius + self.pregrasp_width / 2 + 0.026  # outer face of the outer finger
        best, best_score = None, -np.inf
        for theta in np.linspace(-np.pi, np.pi, 16, endpoint=False):
            u = np.array([np.cos(theta), np.sin(theta)])  # [2]
            if any(float(u @ b) > np.cos(np.pi / 6) for b in self._blocked):
                continue
            off_axis = float(np.arccos(min(abs(float(u @ radial)), 1.0)))  # 0 = along the robot→bowl line
            dist = float(np.linalg.norm(c[:2] + u * self.grasp_radius - self.robot_base_xy))
            tip = c[:2] + u * reach
            clear = min(
                (np.linalg.norm(tip - o[:2]) - 0.05 for o in scene.others.values() if o[2] > c[2] - 0.015),
                default=1.0,
            )
            # free space first, then a short reach (a stretched arm is near the elbow's singularity), little twist
            score = min(clear, 0.04) - 0.02 * off_axis - 0.1 * dist - max(dist - self.comfortable_reach, 0.0)
            if score > best_score:
                best, best_score = u, score
        if best is None:  # every direction blocked once: forget and start over
            self._blocked.clear()
            return self._choose_grasp(scene)
        self._grasp_dir = best
        cur = self._current_yaw(scene)
        want = float(np.arctan2(best[1], best[0])) + np.pi / 2  # fingers close along the gripper's y axis
        self._grasp_yaw = cur + wrap_half_turn(want - cur)
        logger.debug("grasp dir %s yaw %.2f (score %.3f)", best.round(2), self._grasp_yaw, best_score)

    @staticmethod
    def _current_yaw(scene: Scene) -> float:
        m = scene.eef_rot @ _R_DOWN.T  # ≈ R_z(yaw) while pointing down
        return float(np.arctan2(m[1, 0], m[0, 0]))

    def _grasp_point(self, scene: Scene) -> np.ndarray:
        if self._grasp_dir is None:
            self._choose_grasp(scene)
        assert self._grasp_dir is not None
        p = scene.bowl_pos.copy()
        p[:2] += self._grasp_dir * self.grasp_radius
        p[2] += self.grasp_height
        return p  # [3]

    def _attached(self, scene: Scene) -> bool:
        if self._hold_offset is None:
            return False
        return float(np.linalg.norm(scene.eef_pos - scene.bowl_pos - self._hold_offset)) < 0.03

    # -- phase machine -----------------------------------------------------------------------------------------
    def _next_phase(self, scene: Scene) -> Phase:
        phase = self._phase
        if phase in (Phase.APPROACH, Phase.DESCEND, Phase.CLOSE) and self._grasp_dir is None:
            self._choose_grasp(scene)
        if phase in (Phase.APPROACH, Phase.DESCEND) and self._stalled(scene):
            logger.debug("arm stalled short of the grasp; trying another side")
            self._blocked.append(self._grasp_dir.copy())
            return self._restart()
        if phase is Phase.APPROACH:
            err = self._grasp_point(scene) - scene.eef_pos
            err[2] += self.hover_height
            yaw_err = abs(wrap_half_turn(self._grasp_yaw - self._current_yaw(scene)))
            ready = abs(scene.gripper_width - self.pregrasp_width) < 0.008 and self._speed(scene) < 0.001
            if np.linalg.norm(err[:2]) < self.pos_tol and abs(err[2]) < 0.02 and yaw_err < self.yaw_tol and ready:
                return Phase.DESCEND
        elif phase is Phase.DESCEND:
            err = self._grasp_point(scene) - scene.eef_pos
            if np.linalg.norm(err[:2]) > 0.025:
                return self._restart()
            if abs(err[2]) < self.pos_tol and np.linalg.norm(err[:2]) < 1.5 * self.pos_tol:
                return Phase.CLOSE
        elif phase is Phase.CLOSE:
            settled = self._last_width is not None and self._last_width - scene.gripper_width < 0.001
            if settled and scene.gripper_width < MISSED_WIDTH:
                return self._restart()
            if settled and scene.gripper_width < self.pregrasp_width - 0.01:
                self._hold_offset = scene.eef_pos - scene.bowl_pos
                self._lift_z = float(scene.eef_pos[2]) + self.lift_height
                return Phase.CARRY
        elif phase in (Phase.CARRY, Phase.LOWER):
            if not self._attached(scene):
                return self._restart()
            self._lifted = self._lifted or scene.eef_pos[2] > self._lift_z - 0.01
            over = np.linalg.norm(scene.bowl_pos[:2] - scene.plate_pos[:2]) < 0.012
            if phase is Phase.CARRY and over:
                return Phase.LOWER
            if phase is Phase.LOWER and scene.bowl_pos[2] < scene.plate_pos[2] + self.place_height:
                return Phase.RELEASE
        elif phase is Phase.RELEASE and scene.gripper_width > OPEN_WIDTH:
            return self._restart()
        return phase

    def _speed(self, scene: Scene) -> float:
        """Mean eef displacement per step (m) since the previous call (inf on the first call)."""
        if self._last_eef is None:
            return np.inf
        return float(np.linalg.norm(scene.eef_pos - self._last_eef)) / self.replan_steps

    def _stalled(self, scene: Scene) -> bool:
        """True on the second consecutive call in this phase that barely moved while far from its goal."""
        goal, _, mode = self._target(scene)
        way = self._waypoint(scene.eef_pos, goal, mode)
        far = float(np.linalg.norm(way - scene.eef_pos)) > 0.015
        slow = self._speed(scene) < 0.0004
        self._stalls = self._stalls + 1 if self._prev_phase is self._phase and far and slow else 0
        return self._stalls >= 2

    def _restart(self) -> Phase:
        self._grasp_dir, self._hold_offset, self._stalls, self._lifted = None, None, 0, False
        return Phase.APPROACH

    # -- targets and servo -------------------------------------------------------------------------------------
    def _target(self, scene: Scene) -> tuple[np.ndarray, np.ndarray, str]:
        """(eef goal [3], gripper actions [H], path mode for `_waypoint`) for the current phase."""
        h, phase = self.action_horizon, self._phase
        gripper = np.full(h, GRIPPER_CLOSE)
        if phase in (Phase.APPROACH, Phase.DESCEND, Phase.CLOSE):
            goal = self._grasp_point(scene)
            if phase is Phase.APPROACH:
                goal[2] += self.hover_height
            if phase is not Phase.CLOSE:
                gripper = self._preshape(scene.gripper_width)
            return goal, gripper, {Phase.APPROACH: "funnel", Phase.DESCEND: "vertical"}.get(phase, "direct")
        if phase is Phase.RELEASE:
            return scene.eef_pos.copy(), np.full(h, GRIPPER_OPEN), "direct"
        bowl_goal = scene.plate_pos.copy()
        bowl_goal[2] += self.carry_clearance if phase is Phase.CARRY else self.place_height - 0.01
        return scene.eef_pos + bowl_goal - scene.bowl_pos, gripper, "lift" if phase is Phase.CARRY else "place"

    def _preshape(self, width: float) -> np.ndarray:
        """Gripper actions [H] that step the opening toward `pregrasp_width` (one ±1 moves it ≈1 cm, 0 holds)."""
        notches = int(np.clip(np.round((width - self.pregrasp_width) / 0.01), -3, 3))
        out = np.zeros(self.action_horizon)
        out[: abs(notches)] = np.sign(notches)
        return out

    def _waypoint(self, pos: np.ndarray, goal: np.ndarray, mode: str) -> np.ndarray:
        """Next point [3] toward `goal`, by path mode:
        'funnel': stay above a cone around the goal (rise straight up when below it);
        'lift': rise straight to the lift height, cruise level to within 5 cm of the goal, then go at it;
        'vertical' / 'place': change height only within 4 mm / 1 cm in xy (a carried bowl sways);
        'direct': straight at it."""
        dxy = float(np.linalg.norm(goal[:2] - pos[:2]))
        if mode == "lift":  # rise straight up to the lift height, then cruise without losing height
            if not self._lifted and pos[2] < self._lift_z - 0.01 and dxy > 0.02:
                return np.array([pos[0], pos[1], self._lift_z])
            if dxy > 0.05:
                return np.array([goal[0], goal[1], max(goal[2], pos[2])])
        need = goal[2] + min(self.funnel_slope * dxy, self.funnel_max)
        if mode == "funnel" and pos[2] < need - 0.01:
            return np.array([pos[0], pos[1], need + 0.01])
        if (mode == "vertical" and dxy > 0.004) or (mode == "place" and dxy > 0.01):
            return np.array([goal[0], goal[1], pos[2]])
        return goal

    def _servo(self, scene: Scene, goal: np.ndarray, gripper: np.ndarray, mode: str) -> np.ndarray:
        """Chunk [H, 7]: saturated PD control rolled forward through the fitted arm model."""
        pos = scene.eef_pos.copy()  # predicted eef position, [3]
        vel = np.zeros((2, 3))  # predicted displacements of the last two steps, newest first, [2, 3]
        u = np.zeros((3, 3))  # position deltas commanded (m) at this step and the two before, newest first
        if self._last_eef is not None and self._last_u is not None:
            vel[:] = (scene.eef_pos - self._last_eef) / self.replan_steps
            u[1:] = self._last_u
        rot_err = mat_to_rotvec(yaw_rot(self._grasp_yaw) @ scene.eef_rot.T)  # world frame, [3]
        actions = np.zeros((self.action_horizon, ACTION_DIM))
        for i in range(self.action_horizon):
            way = self._waypoint(pos, goal, mode)
            limit = self.lift_action if mode == "lift" and not self._lifted else self.max_action
            a_pos = _saturate((self.pos_gain * (way - pos) - self.vel_gain * vel[0]) / POS_SCALE, limit)
            a_rot = _saturate(self.rot_gain * rot_err / ROT_SCALE, self.max_action)
            actions[i, :3], actions[i, 3:6], actions[i, 6] = a_pos, a_rot, gripper[i]
            u = np.stack([a_pos * POS_SCALE, u[0], u[1]])
            step = ARM_D[0] * vel[0] + ARM_D[1] * vel[1] + ARM_A[0] * u[0] + ARM_A[1] * u[1] + ARM_A[2] * u[2]
            vel, pos = np.stack([step, vel[0]]), pos + step
            rot_err = rot_err - a_rot * ROT_SCALE * ROT_RESPONSE
        return actions


def _saturate(v: np.ndarray, limit: float) -> np.ndarray:
    """`v` scaled down (direction kept) so that no component exceeds `limit`."""
    peak = float(np.max(np.abs(v)))
    return v if peak <= limit else v * (limit / peak)
