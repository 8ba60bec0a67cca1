"""The tabletop manipulation env: gymnasium API, two RGB cameras, language goals, chunked stepping.

Observation: {"head": uint8[H, W, 3], "wrist": uint8[H, W, 3]}; the instruction is `env.instruction`
and `info["instruction"]`. Nothing privileged is observed: the scripted expert reads `sim_state()`.
Action: float32[4] in [-1, 1]: (dx, dy, dz) of the hand, scaled by `max_step_size` metres, and a gripper
command (> 0 closes, <= 0 opens). Values outside [-1, 1] are clipped, like any bounded actuator.

Success latches. By default (the gymnasium contract of a goal-reaching task) the step that first succeeds
terminates the episode. With `terminate_on_success=False` the episode goes on until `max_steps` (then it is
truncated): `info["success"]` stays True and the +1 reward is paid only on the first successful step. Data
recorders use this to keep filming the completed task, so "done" is a visible state and not a single frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import mujoco
import numpy as np

from trainer.envs import scene, tasks

VIEWS: tuple[str, ...] = ("head", "wrist")
ACTION_DIM = 4
DEFAULT_CHUNK_SIZE = 8
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 512

# The hand may not leave this box; the lower z keeps the finger tips just above the table.
HAND_LOW = np.array([-0.27, -0.27, scene.FINGER_LENGTH + 0.004])
HAND_HIGH = np.array([0.27, 0.27, 0.30])
HAND_HOME_JITTER = 0.03
PHYSICS_STATE = mujoco.mjtState.mjSTATE_INTEGRATION  # what a snapshot keeps: all that mj_step reads


class EnvConfigError(ValueError):
    """A bad environment configuration: unknown task, bad image size, bad limits."""


class ActionError(ValueError):
    """An action of the wrong shape or with non-finite values."""


class EpisodeOverError(RuntimeError):
    """step() after the episode terminated or truncated, without reset()."""


@dataclass(frozen=True)
class EnvConfig:
    """Everything that defines one env. `task` is a family name or "multi" (a random family per reset)."""

    task: str = tasks.MULTI_TASK
    image_height: int = 64
    image_width: int = 64
    max_steps: int = 96
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_step_size: float = 0.02  # metres the hand moves for an action of 1.0 (at 25 Hz: 0.5 m/s)
    terminate_on_success: bool = True  # False: run on to max_steps after success (success stays latched)

    def __post_init__(self) -> None:
        if self.task not in tasks.TASK_NAMES:
            raise EnvConfigError(f"unknown task {self.task!r}; expected one of {list(tasks.TASK_NAMES)}")
        for name in ("image_height", "image_width"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
                raise EnvConfigError(
                    f"bad image size: {name} must be an int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {value!r}")
        for name in ("max_steps", "chunk_size"):
            if not isinstance(getattr(self, name), int | np.integer) or getattr(self, name) < 1:
                raise EnvConfigError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not 0.0 < self.max_step_size <= 0.1:
            raise EnvConfigError(f"max_step_size must be in (0, 0.1] metres, got {self.max_step_size}")
        if not isinstance(self.terminate_on_success, bool):
            raise EnvConfigError(f"terminate_on_success must be a bool, got {self.terminate_on_success!r}")


@dataclass(frozen=True)
class SimState:
    """Privileged simulator state for scripted experts and tests; never part of the observation."""

    goal: tasks.Goal
    layout: tasks.Layout
    hand_pos: np.ndarray  # [3] hand position (it trails its commanded target slightly)
    finger_opening: float  # mean finger joint position, 0 closed .. scene.FINGER_OPEN open
    gripper_closed: bool  # the last gripper command
    object_pos: np.ndarray  # [NUM_OBJECTS, 3]
    goal_xy: np.ndarray  # [2] centre of the pad (push) or bin (place); the object's xy for lift
    success: bool  # latched: the task was completed at some step of this episode


@dataclass(frozen=True, eq=False)
class EnvSnapshot:
    """Everything the next step depends on: the env's task and step size, the episode's goal and scene, MuJoCo's
    integration state (positions, velocities, mocap target, controls, solver warm start) and the episode
    counters. `restore` continues from it exactly as the env it was taken from would."""

    task: str
    max_step_size: float
    goal: tasks.Goal
    layout: tasks.Layout
    instruction: str
    physics: np.ndarray  # float64[mj_stateSize(mjSTATE_INTEGRATION)]
    num_steps: int
    success: bool
    done: bool
    gripper_closed: bool


def image_size_pair(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from an int (square) or a pair."""
    if isinstance(image_size, int | np.integer):
        return int(image_size), int(image_size)
    if isinstance(image_size, tuple | list) and len(image_size) == 2:
        return image_size[0], image_size[1]
    raise EnvConfigError(f"bad image size: expected an int or (height, width), got {image_size!r}")


class TabletopEnv(gym.Env):
    """Language-conditioned tabletop manipulation in MuJoCo with a head and a wrist camera."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 25}

    def __init__(self, task: str = tasks.MULTI_TASK, image_size: int | tuple[int, int] = 64, max_steps: int = 96,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, max_step_size: float = 0.02,
                 render_mode: str | None = None, terminate_on_success: bool = True) -> None:
        height, width = image_size_pair(image_size)
        self.config = EnvConfig(task, height, width, max_steps, chunk_size, max_step_size, terminate_on_success)
        if render_mode not in (None, "rgb_array"):
            raise EnvConfigError(f"unknown render_mode {render_mode!r}; expected None or 'rgb_array'")
        self.render_mode = render_mode
        self.model = mujoco.MjModel.from_xml_string(scene.scene_xml())
        self.data = mujoco.MjData(self.model)
        self._renderer = mujoco.Renderer(self.model, height, width)
        self._ids = _SceneIds(self.model)
        image_space = gym.spaces.Box(0, 255, shape=(height, width, 3), dtype=np.uint8)
        self.observation_space = gym.spaces.Dict({view: image_space for view in VIEWS})
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)
        self._goal: tasks.Goal | None = None
        self._layout: tasks.Layout | None = None
        self._instruction = ""
        self._num_steps = 0
        self._success = False
        self._done = True
        self._gripper_closed = False

    # ---- public API --------------------------------------------------------------------------------
    @property
    def instruction(self) -> str:
        """The current episode's natural-language instruction ("" before the first reset)."""
        return self._instruction

    @property
    def task_family(self) -> str:
        """The current episode's family (for "multi", the one drawn at reset)."""
        return self._require_goal().family

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self._goal = tasks.sample_goal(self.config.task, self.np_random)
        self._layout = tasks.sample_layout(self.np_random)
        self._instruction = tasks.instruction_for(self._goal, self._layout)
        hand = np.array(scene.HAND_HOME) + self.np_random.uniform(-HAND_HOME_JITTER, HAND_HOME_JITTER, size=3)
        self._apply_layout(self._layout, hand)
        self._num_steps = 0
        self._gripper_closed = False
        self._success = self._check_success()
        self._done = False
        return self._observe(), self._info()

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        action = validate_actions(np.asarray(action), chunked=False)
        reward, terminated, truncated = self._advance(action)
        return self._observe(), reward, terminated, truncated, self._info()

    def step_chunk(self, actions: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        """Step each row of `actions` [k, 4] in order and render only the observation after the chunk.

        Stops early when the episode ends inside the chunk. Returns (obs, summed reward, terminated,
        truncated, info) with info["num_steps_taken"] the number of rows actually executed.
        """
        actions = validate_actions(np.asarray(actions), chunked=True)
        total, terminated, truncated, taken = 0.0, False, False, 0
        for action in actions:
            reward, terminated, truncated = self._advance(action)
            total += reward
            taken += 1
            if terminated or truncated:
                break
        info = self._info()
        info["num_steps_taken"] = taken
        return self._observe(), total, terminated, truncated, info

    def sim_state(self) -> SimState:
        """Privileged state (for the scripted expert and tests only)."""
        goal, layout = self._require_goal(), self._layout
        object_pos = self._object_positions()
        if goal.family == "push":
            goal_xy = layout.pad_xy[goal.pad_index].copy()
        elif goal.family == "place":
            goal_xy = layout.bin_xy.copy()
        else:
            goal_xy = object_pos[goal.object_index, :2].copy()
        fingers = self.data.qpos[self._ids.finger_qpos]
        hand = self.data.xpos[self._ids.hand_body].copy()
        return SimState(goal, layout, hand, float(fingers.mean()), self._gripper_closed, object_pos, goal_xy,
                        self._success)

    def snapshot(self) -> EnvSnapshot:
        """The current episode's state, to `restore` later (in this env or another with the same config)."""
        goal = self._require_goal()
        physics = np.empty(mujoco.mj_stateSize(self.model, PHYSICS_STATE))
        mujoco.mj_getState(self.model, self.data, physics, PHYSICS_STATE)
        return EnvSnapshot(self.config.task, self.config.max_step_size, goal, self._layout, self._instruction, physics,
                           self._num_steps, self._success, self._done, self._gripper_closed)

    def restore(self, snapshot: EnvSnapshot) -> None:
        """Puts the env back into `snapshot`'s state without rendering; the next step's observation, reward and
        flags are bit for bit those of the env it was taken from. (Before that step, `render` and `sim_state`
        show the state itself, where the source env's still show the positions before its last substep.)
        The snapshot must come from an env of the same task and step size (max_steps may differ)."""
        for name in ("task", "max_step_size"):
            if getattr(snapshot, name) != getattr(self.config, name):
                raise EnvConfigError(f"a snapshot of an env with {name}={getattr(snapshot, name)!r} cannot be "
                                     f"restored into one with {name}={getattr(self.config, name)!r}")
        self._goal, self._layout, self._instruction = snapshot.goal, snapshot.layout, snapshot.instruction
        self._apply_scene(snapshot.layout)
        mujoco.mj_setState(self.model, self.data, snapshot.physics, PHYSICS_STATE)
        mujoco.mj_forward(self.model, self.data)
        self._num_steps, self._success, self._done = snapshot.num_steps, snapshot.success, snapshot.done
        self._gripper_closed = snapshot.gripper_closed

    def render(self) -> np.ndarray | None:
        """With render_mode="rgb_array": head and wrist side by side, uint8[H, 2W, 3]."""
        if self.render_mode != "rgb_array":
            return None
        obs = self._observe()
        return np.concatenate([obs[view] for view in VIEWS], axis=1)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # ---- internals ---------------------------------------------------------------------------------
    def _require_goal(self) -> tasks.Goal:
        if self._goal is None:
            raise EpisodeOverError("no episode yet: call reset() first")
        return self._goal

    def _advance(self, action: np.ndarray) -> tuple[float, bool, bool]:
        """One control step without rendering: returns (reward, terminated, truncated)."""
        if self._done:
            raise EpisodeOverError("the episode is over (terminated or truncated): call reset() first")
        action = np.clip(action, -1.0, 1.0)
        start = self.data.mocap_pos[0].copy()
        target = np.clip(start + action[:3] * self.config.max_step_size, HAND_LOW, HAND_HIGH)
        self._gripper_closed = bool(action[3] > 0.0)
        self.data.ctrl[:] = 0.0 if self._gripper_closed else scene.FINGER_OPEN
        # Move the mocap body along a straight line over the substeps so contacts see no teleport.
        for i in range(1, scene.SUBSTEPS + 1):
            self.data.mocap_pos[0] = start + (target - start) * (i / scene.SUBSTEPS)
            mujoco.mj_step(self.model, self.data)
        self._num_steps += 1
        newly_succeeded = not self._success and self._check_success()
        self._success = self._success or newly_succeeded
        terminated = self._success and self.config.terminate_on_success
        truncated = not terminated and self._num_steps >= self.config.max_steps
        self._done = terminated or truncated
        return (1.0 if newly_succeeded else 0.0), terminated, truncated

    def _check_success(self) -> bool:
        return tasks.is_success(self._goal, self._layout, self._object_positions())

    def _object_positions(self) -> np.ndarray:
        return self.data.qpos[self._ids.object_qpos].reshape(scene.NUM_OBJECTS, 7)[:, :3].copy()  # [N, 3]

    def _apply_scene(self, layout: tasks.Layout) -> None:
        """The layout's parts that live in the model: object colours, pad and bin placement."""
        ids = self._ids
        for i in range(scene.NUM_OBJECTS):
            self.model.geom_rgba[ids.object_geoms[i]] = scene.OBJECT_COLOURS[layout.object_colours[i]].rgba
        for i in range(scene.NUM_PADS):
            self.model.body_pos[ids.pad_bodies[i], :2] = layout.pad_xy[i]
            self.model.geom_rgba[ids.pad_geoms[i]] = scene.PAD_COLOURS[layout.pad_colours[i]].rgba
        self.model.body_pos[ids.bin_body, :2] = layout.bin_xy

    def _apply_layout(self, layout: tasks.Layout, hand: np.ndarray) -> None:
        mujoco.mj_resetData(self.model, self.data)
        ids = self._ids
        for i in range(scene.NUM_OBJECTS):
            x, y = layout.object_xy[i]
            yaw = layout.object_yaw[i]
            qpos = ids.object_qpos[7 * i: 7 * i + 7]
            self.data.qpos[qpos] = [x, y, scene.OBJECT_HALF_SIZE, np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]
        self._apply_scene(layout)
        hand = np.clip(hand, HAND_LOW, HAND_HIGH)
        self.data.mocap_pos[0] = hand
        self.data.qpos[ids.hand_qpos] = hand - np.array(scene.HAND_HOME)  # slide joints measure from home
        self.data.qpos[ids.finger_qpos] = scene.FINGER_OPEN
        self.data.ctrl[:] = scene.FINGER_OPEN
        mujoco.mj_forward(self.model, self.data)

    def _observe(self) -> dict[str, np.ndarray]:
        obs = {}
        for view in VIEWS:
            self._renderer.update_scene(self.data, camera=view)
            obs[view] = self._renderer.render()  # uint8[H, W, 3], a fresh array each call
        return obs

    def _info(self) -> dict:
        return {"success": self._success, "instruction": self._instruction, "task": self._goal.family}


class _SceneIds:
    """Indices into the compiled model, looked up once by name."""

    def __init__(self, model: mujoco.MjModel) -> None:
        def body(name: str) -> int:
            return mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, name)

        def geom(name: str) -> int:
            return mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, name)

        def qpos_of(joint: str) -> int:
            return int(model.jnt_qposadr[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, joint)])

        self.object_geoms = [geom(f"object{i}") for i in range(scene.NUM_OBJECTS)]
        self.object_qpos = np.concatenate(
            [np.arange(qpos_of(f"object{i}_joint"), qpos_of(f"object{i}_joint") + 7) for i in range(scene.NUM_OBJECTS)])
        self.pad_bodies = [body(f"pad{i}") for i in range(scene.NUM_PADS)]
        self.pad_geoms = [geom(f"pad{i}") for i in range(scene.NUM_PADS)]
        self.bin_body = body("bin")
        self.hand_body = body("hand")
        self.hand_qpos = np.array([qpos_of("hand_x"), qpos_of("hand_y"), qpos_of("hand_z")])
        self.finger_qpos = np.array([qpos_of("finger_left"), qpos_of("finger_right")])


def validate_actions(actions: np.ndarray, chunked: bool) -> np.ndarray:
    """float64 copy of one action [4] (or a chunk [k, 4]); raises ActionError naming what is wrong."""
    expected = f"(k, {ACTION_DIM}) with k >= 1" if chunked else f"({ACTION_DIM},)"
    ok_shape = (actions.ndim == 2 and actions.shape[0] >= 1 and actions.shape[1] == ACTION_DIM) if chunked \
        else actions.shape == (ACTION_DIM,)
    if not ok_shape:
        raise ActionError(f"action must have shape {expected}, got {actions.shape}")
    if not np.issubdtype(actions.dtype, np.number) or np.issubdtype(actions.dtype, np.complexfloating):
        raise ActionError(f"action must be real numbers, got dtype {actions.dtype}")
    actions = actions.astype(np.float64)
    if not np.all(np.isfinite(actions)):
        raise ActionError(f"action contains NaN or inf: {actions.tolist()}")
    return actions
