"""Scripted experts for every task family, with a skill knob that makes demos imperfect on purpose.

The expert reads privileged simulator state (`TabletopEnv.sim_state()`), which only it may do. It is a
small phase machine per family driven by a proportional controller on the hand position:

    lift:  approach -> descend -> close -> lift
    place: approach -> descend -> close -> lift -> carry -> release
    push:  approach -> descend -> close -> slide it onto the pad, held just clear of the table (a
           point pusher loses round objects sideways; dragging on the table twists them out of the grip),
           hopping over anything in the way

Once the task is complete (the env's latched success, seen only when the env runs on after success:
`terminate_on_success=False`) the expert holds: no more phases or mistakes, the hand stays where it was
at success (lift: raised on to CARRY_Z, gripper closed; place: open above the bin; push: opened, so the
object settles on the pad), so the completed state stays visible instead of being undone (a place expert
would otherwise pick the object out of the bin again).

Phases re-check the state each step (a dropped object sends the expert back to approach), so the
expert recovers from its own noise. `skill` in [0, 1] sets the imperfection: Gaussian action noise of
std NOISE_AT_ZERO_SKILL * (1 - skill), a slower hand, and, with probability min(1, MISTAKE_AT_ZERO_SKILL *
(1 - skill)) per episode, one deliberate mistake (go for the wrong object, let go early, or wander).
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from trainer.envs import scene
from trainer.envs.tabletop import SimState, TabletopEnv

DEFAULT_DEMO_SKILL = 0.5  # demos at this skill succeed about half the time: room for RL
NOISE_AT_ZERO_SKILL = 0.8
MISTAKE_AT_ZERO_SKILL = 1.3
MISTAKES = ("wrong_object", "early_release", "wander")
MISTAKE_WEIGHTS = (0.5, 0.25, 0.25)

HOVER_Z = 0.15  # hand height for moving around above the objects
GRASP_Z = scene.FINGER_LENGTH + 0.006  # finger tips just above the table
CARRY_Z = 0.17
CLOSE_STEPS = 4  # control steps the fingers need to close on an object
RELEASE_STEPS = 6  # control steps with the gripper open before looking at the object again
XY_TOLERANCE = 0.008
Z_TOLERANCE = 0.006
PUSH_SPEED = 0.6  # fraction of the top hand speed while sliding an object: faster slides tip it over
HOP_CLEARANCE = 0.065  # over the other objects (0.04 tall) and the bin walls (0.05 tall)
HOP_LANDING_DISTANCE = 0.045  # put the object down this close to the pad centre
SLIDE_CLEARANCE = 0.005  # carry the object just clear of the table: dragging it makes it pivot out of the grip
HELD_MIN_OPENING = 0.008  # fingers closed on an object stop about OBJECT_HALF_SIZE apart from centre


class ExpertError(ValueError):
    """A bad expert configuration."""


@dataclass
class _Plan:
    """Per-episode decisions, drawn when the expert first sees a new episode."""

    object_index: int
    mistake: str  # "" for none
    mistake_step: int  # control step at which "wander" starts
    wander_steps: int
    wander_direction: np.ndarray  # [3]


class ScriptedExpert:
    """Privileged scripted expert: `act(obs) -> float32[4]` for the env it was built on."""

    def __init__(self, env: gym.Env, skill: float = 1.0, seed: int | np.random.SeedSequence | None = None) -> None:
        if not isinstance(env.unwrapped, TabletopEnv):
            raise ExpertError(f"ScriptedExpert needs a TabletopEnv, got {type(env.unwrapped).__name__}")
        if not 0.0 <= float(skill) <= 1.0:
            raise ExpertError(f"skill must be in [0, 1], got {skill}")
        self.env: TabletopEnv = env.unwrapped
        self.skill = float(skill)
        self.rng = np.random.default_rng(seed)
        self._layout = None
        self._plan: _Plan | None = None
        self._phase = "approach"
        self._phase_steps = 0
        self._steps = 0
        self._hold: tuple[np.ndarray, bool] | None = None  # (hand target [3], close) once the task is done

    @property
    def noise_std(self) -> float:
        return NOISE_AT_ZERO_SKILL * (1.0 - self.skill)

    @property
    def mistake_probability(self) -> float:
        return min(1.0, MISTAKE_AT_ZERO_SKILL * (1.0 - self.skill))

    def act(self, obs: dict | None = None) -> np.ndarray:
        """The next action for the env's current state (the observation itself is not needed)."""
        state = self.env.sim_state()
        if state.layout is not self._layout:
            self._start_episode(state)
        plan = self._plan
        if state.success:
            target, close = self._hold_pose(state)
            action = np.append(self._move_towards(state.hand_pos, target), 1.0 if close else -1.0)
        elif plan.mistake == "wander" and plan.mistake_step <= self._steps < plan.mistake_step + plan.wander_steps:
            action = np.append(plan.wander_direction, self.rng.uniform(-1, 1))
        else:
            target, close = self._policy(state)
            speed = PUSH_SPEED if self._phase == "slide" else 1.0
            action = np.append(self._move_towards(state.hand_pos, target, speed), 1.0 if close else -1.0)
        action[:3] += self.rng.normal(0.0, self.noise_std, size=3)
        self._steps += 1
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    # ---- per-episode set-up -------------------------------------------------------------------------
    def _start_episode(self, state: SimState) -> None:
        self._layout = state.layout
        self._phase, self._phase_steps, self._steps = "approach", 0, 0
        self._hold = None
        mistake = ""
        if self.rng.random() < self.mistake_probability:
            mistake = MISTAKES[int(self.rng.choice(len(MISTAKES), p=MISTAKE_WEIGHTS))]
        object_index = state.goal.object_index
        if mistake == "wrong_object":
            others = [i for i in range(scene.NUM_OBJECTS) if i != object_index]
            object_index = others[int(self.rng.integers(len(others)))]
        direction = self.rng.normal(size=3)
        self._plan = _Plan(
            object_index=object_index,
            mistake=mistake,
            mistake_step=int(self.rng.integers(0, 20)),
            wander_steps=int(self.rng.integers(40, 80)),
            wander_direction=direction / np.linalg.norm(direction),
        )

    def _hold_pose(self, state: SimState) -> tuple[np.ndarray, bool]:
        """Where to keep the hand after success: fixed at its first post-success call, so the action noise
        is corrected towards one pose instead of drifting."""
        if self._hold is None:
            target = state.hand_pos.copy()
            close = state.gripper_closed
            if state.goal.family == "lift":
                target[2] = max(target[2], CARRY_Z)  # success fires on the way up: finish the lift
            elif state.goal.family == "push":
                # Success fires while the object is carried just clear of the pad, often tilted in the grip;
                # held on, it can leave the "resting on the pad" condition. Let go: it settles on the pad.
                close = False
            self._hold = (target, close)
        return self._hold

    # ---- control -------------------------------------------------------------------------------------
    def _move_towards(self, hand: np.ndarray, target: np.ndarray, speed: float = 1.0) -> np.ndarray:
        speed *= 0.6 + 0.4 * self.skill  # a less skilled expert is also slower
        return np.clip((target - hand) / self.env.config.max_step_size, -speed, speed)

    def _set_phase(self, phase: str) -> None:
        if phase != self._phase:
            self._phase, self._phase_steps = phase, 0

    def _policy(self, state: SimState) -> tuple[np.ndarray, bool]:
        """(hand target [3], close gripper) for the current phase; advances the phase machine.

        Every family shares the grasp (approach, descend, close). Lift then raises the object; place
        carries it over the bin and lets go; push slides it onto the pad.
        """
        self._phase_steps += 1
        obj = state.object_pos[self._plan.object_index]
        if self._phase in ("lift", "carry", "slide") and not self._is_held(state, obj):
            self._set_phase("approach")  # dropped it: start over
        if self._phase in ("lift", "carry", "slide") and self._plan.mistake == "early_release" \
                and self._phase_steps >= 2:
            self._plan.mistake = ""  # one early release per episode
            self._set_phase("release")
        return self._PHASES[self._phase](self, state, obj, state.hand_pos)

    def _approach(self, state: SimState, obj: np.ndarray, hand: np.ndarray) -> tuple[np.ndarray, bool]:
        xy_error = np.linalg.norm(hand[:2] - obj[:2])
        if xy_error < XY_TOLERANCE:
            self._set_phase("descend")
        z = HOVER_Z if xy_error > 0.03 else max(GRASP_Z, hand[2] - 0.02)  # lower only once above the object
        return np.array([obj[0], obj[1], z]), False

    def _descend(self, state: SimState, obj: np.ndarray, hand: np.ndarray) -> tuple[np.ndarray, bool]:
        if np.linalg.norm(hand[:2] - obj[:2]) > 2.5 * XY_TOLERANCE:
            self._set_phase("approach")
        elif abs(hand[2] - GRASP_Z) < Z_TOLERANCE:
            self._set_phase("close")
        return np.array([obj[0], obj[1], GRASP_Z]), False

    def _close(self, state: SimState, obj: np.ndarray, hand: np.ndarray) -> tuple[np.ndarray, bool]:
        if self._phase_steps >= CLOSE_STEPS:
            self._set_phase("slide" if state.goal.family == "push" else "lift")
        return np.array([obj[0], obj[1], GRASP_Z]), True

    def _lift(self, state: SimState, obj: np.ndarray, hand: np.ndarray) -> tuple[np.ndarray, bool]:
        if state.goal.family == "place" and hand[2] > CARRY_Z - 0.04:
            self._set_phase("carry")
        return np.array([hand[0], hand[1], CARRY_Z]), True

    def _slide(self, state: SimState, obj: np.ndarray, hand: np.ndarray) -> tuple[np.ndarray, bool]:
        # Steer the hand so that the object's centre, not the hand, ends on the pad centre; hop over
        # anything in the way and put the object down on the last stretch.
        target = hand[:2] + (state.goal_xy - obj[:2])
        far = np.linalg.norm(state.goal_xy - obj[:2]) > HOP_LANDING_DISTANCE
        clearance = HOP_CLEARANCE if far and self._path_blocked(state, obj) else SLIDE_CLEARANCE
        return np.array([target[0], target[1], GRASP_Z + clearance]), True

    def _carry(self, state: SimState, obj: np.ndarray, hand: np.ndarray) -> tuple[np.ndarray, bool]:
        goal = np.array([state.goal_xy[0], state.goal_xy[1], CARRY_Z])
        if np.linalg.norm(hand[:2] - goal[:2]) < XY_TOLERANCE:
            self._set_phase("release")
        return goal, True

    def _release(self, state: SimState, obj: np.ndarray, hand: np.ndarray) -> tuple[np.ndarray, bool]:
        # Open and stay; if the object missed the bin (or was let go early) it is picked up again.
        if self._phase_steps > RELEASE_STEPS:
            self._set_phase("approach")
        return hand.copy(), False

    _PHASES = {"approach": _approach, "descend": _descend, "close": _close, "lift": _lift, "slide": _slide,
               "carry": _carry, "release": _release}

    def _path_blocked(self, state: SimState, obj: np.ndarray) -> bool:
        """Whether another object or the bin lies near the straight path from the object to the pad."""
        start, end = obj[:2], state.goal_xy
        obstacles = [(state.object_pos[i, :2], 2.5 * scene.OBJECT_HALF_SIZE)
                     for i in range(scene.NUM_OBJECTS) if i != self._plan.object_index]
        obstacles.append((state.layout.bin_xy, 1.45 * (scene.BIN_INNER_HALF + 2 * scene.BIN_WALL_HALF_THICKNESS)))
        segment = end - start
        length_sq = max(float(segment @ segment), 1e-9)
        for centre, radius in obstacles:
            t = np.clip((centre - start) @ segment / length_sq, 0.0, 1.0)
            if np.linalg.norm(start + t * segment - centre) < radius + 1.5 * scene.OBJECT_HALF_SIZE:
                return True
        return False

    @staticmethod
    def _is_held(state: SimState, obj: np.ndarray) -> bool:
        near = np.linalg.norm(state.hand_pos[:2] - obj[:2]) < 0.03
        below_fingers = obj[2] > state.hand_pos[2] - scene.FINGER_LENGTH - 0.01
        return bool(state.gripper_closed and state.finger_opening > HELD_MIN_OPENING and near and below_fingers)
