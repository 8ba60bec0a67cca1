"""Branched chunk rollouts stepped in the real MuJoCo env: a perfect world model, for the upper bound.

`vla-mbpo train --simulator` runs the VLA-MBPO loop unchanged (same start states, branches, horizon, GAE and
PPO) with every imagined chunk replaced by the real env's: a start state is its recorded episode replayed
from `reset(seed)` through the actions before it (MuJoCo is deterministic: the replay renders the recorded
frames bit for bit and has the recorded instruction, both checked at CreateStates) and kept as an env
snapshot; a branch restores its parent's snapshot and steps its chunk; the reward is the env's own latched
success. What the loop then reaches is what a flawless world model could give it at this budget, so the gap
to the served model is the model's, and the gap to SFT is the loop's. It is real interaction: every chunk
step is counted in `real_env_steps` (the one replay that rebuilds a start state is not). Like the world
model, the simulator knows no episode limit: a branch from a late start state may run past the real env's
`max_steps`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from trainer.envs import ACTION_DIM, MULTI_TASK, VIEWS, EnvSnapshot, TabletopEnv, make_env
from trainer.imagination import ImaginedRollouts, Imaginer, StartState
from trainer.policy import VlaPolicy
from trainer.rollout_client import ImaginedBranch, ServerModelInfo

NO_LIMIT = 2**31 - 1  # no window, no request limit: a branch is never cut or restarted
NO_TRUNCATION = 2**31 - 1  # the simulator's env max_steps: a branch ends by success or horizon only
MODEL_NAME = "mujoco-simulator"


class SimulatorError(ValueError):
    """A start state the simulator cannot rebuild, or a policy it cannot step; the message says which and why."""


class SimulatorImaginer(Imaginer):
    """The Imaginer's branched rollouts with CreateStates/Imagine/ReleaseStates answered by the real env."""

    def __init__(self, chunk_size: int, image_height: int, image_width: int) -> None:
        # deliberately no Imaginer.__init__: there is no client, the "model info" is the env's
        bound = np.ones(ACTION_DIM, np.float32)
        self.info = ServerModelInfo(views=VIEWS, image_height=image_height, image_width=image_width,
                                    chunk_size=chunk_size, action_dim=ACTION_DIM, action_low=-bound,
                                    action_high=bound, tokens_per_view=0, max_chunks_per_branch=NO_LIMIT,
                                    model_name=MODEL_NAME, model_version="exact", max_states_per_request=NO_LIMIT,
                                    max_branches_per_request=NO_LIMIT)
        self.real_env_steps = 0  # chunk steps taken in branches, the interaction this oracle spends
        self._states: dict[str, tuple[str, EnvSnapshot]] = {}  # id -> (the task of its env, its state)
        self._envs: dict[str, TabletopEnv] = {}
        self._env_task_of: dict[str, str] = {}  # a recorded task -> the env task that replayed it
        self._ids = itertools.count()

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()

    def rollout(self, policy: VlaPolicy, starts: Sequence[StartState], *args, **kwargs) -> ImaginedRollouts:
        """`Imaginer.rollout`, once the policy's chunks are known to be what the env steps."""
        config = policy.config
        if (config.action_dim, config.chunk_size) != (ACTION_DIM, self.info.chunk_size):
            raise SimulatorError(f"the policy acts in chunks of {config.chunk_size} x {config.action_dim}; the "
                                 f"simulator steps {self.info.chunk_size} x {ACTION_DIM}")
        return super().rollout(policy, starts, *args, **kwargs)

    def _create_states(self, starts: Sequence[StartState], owned: list[str] | None = None) -> list[str]:
        ids = []
        for start in starts:
            task = self._rebuild(start)
            state_id = self._new_state(task, self._envs[task].snapshot())
            ids.append(state_id)
            if owned is not None:
                owned.append(state_id)
        return ids

    def _rebuild(self, start: StartState) -> str:
        """Replays the start's episode up to it in the env of its task, which it returns, checking that the
        replay has the start's instruction and renders exactly its frames. A recording of the multi-task env
        stores the drawn family as its task, so "multi" is tried when the family does not match (and tried
        first for that family from then on)."""
        origin = start.origin
        if origin is None:
            raise SimulatorError("a start state without its recorded origin (task, seed, actions) cannot be "
                                 "simulated: sample it from a recorded buffer")
        where = f"episode seed {origin.seed} ({origin.task}, {start.instruction!r}) after {len(origin.actions)} steps"
        size = (self.info.image_height, self.info.image_width)
        if start.head.shape[:2] != size:
            raise SimulatorError(f"{where}: frames of {start.head.shape[:2]}, the simulator renders {size}")
        known = self._env_task_of.get(origin.task)
        for task in dict.fromkeys([t for t in (known, origin.task, MULTI_TASK) if t is not None]):
            env = self._env(task)
            obs, info = env.reset(seed=origin.seed)
            if len(origin.actions):
                obs, _, _, _, info = env.step_chunk(np.asarray(origin.actions, dtype=np.float32))
            if env.instruction == start.instruction and all(np.array_equal(obs[v], getattr(start, v)) for v in VIEWS):
                if info["success"]:
                    raise SimulatorError(f"{where}: the task is already done there, no branch can start from it")
                self._env_task_of[origin.task] = task
                return task
        raise SimulatorError(f"{where}: replaying its actions does not give the recorded instruction and frames "
                             "(another env version or scene?)")

    def _env(self, task: str) -> TabletopEnv:
        if task not in self._envs:
            self._envs[task] = make_env(task, image_size=(self.info.image_height, self.info.image_width),
                                        max_steps=NO_TRUNCATION)
        return self._envs[task]

    def _new_state(self, task: str, snapshot: EnvSnapshot) -> str:
        state_id = f"sim-{next(self._ids)}"
        self._states[state_id] = (task, snapshot)
        return state_id

    def _imagine(self, state_ids: list[str], actions: np.ndarray, seeds: list[int], keep: bool, temperature: float,
                 owned: list[str]) -> list[ImaginedBranch]:
        """Each branch: restore its state, step its chunk [k * d] in the env (stopping at a success inside it).
        The env is exact, so seeds and temperature have nothing to do."""
        results = []
        for index, (state_id, flat) in enumerate(zip(state_ids, actions, strict=True)):
            if state_id not in self._states:
                raise SimulatorError(f"unknown simulator state {state_id!r} (released or never created)")
            task, snapshot = self._states[state_id]
            env = self._envs[task]
            env.restore(snapshot)
            obs, _, _, _, info = env.step_chunk(np.asarray(flat, dtype=np.float32).reshape(-1, ACTION_DIM))
            self.real_env_steps += int(info["num_steps_taken"])
            child = None
            if keep:
                child = self._new_state(task, env.snapshot())
                owned.append(child)
            success = bool(info["success"])
            results.append(ImaginedBranch(index=index, state_id=child, success_prob=float(success), success=success,
                                          tokens=None, images={view: obs[view] for view in VIEWS}))
        return results

    def _release(self, state_ids: list[str]) -> None:
        for state_id in state_ids:
            self._states.pop(state_id, None)
