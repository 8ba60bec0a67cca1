"""Branched chunk rollouts stepped in the real MuJoCo env: a perfect world model, for the upper bound.

`vla-mbpo train --simulator` runs the VLA-MBPO loop unchanged (same start states, branches, horizon, GAE and
PPO) with every imagined chunk replaced by the real env's: a start state is its recorded episode replayed
from `reset(seed)` through the actions before it (MuJoCo is deterministic: the replay renders the recorded
frames bit for bit, checked at CreateStates) and kept as an env snapshot; a branch restores its parent's
snapshot and steps its chunk; the reward is the env's own latched success. What the loop then reaches is what
a flawless world model could give it at this budget, so the gap to the served model is the model's, and the
gap to SFT is the loop's. It is real interaction: every chunk step is counted in `real_env_steps` (the one
replay that rebuilds a start state is not).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from trainer.envs import MULTI_TASK, VIEWS, EnvSnapshot, TabletopEnv, make_env
from trainer.imagination import Imaginer, StartState
from trainer.rollout_client import ImaginedBranch, ServerModelInfo

UNBOUNDED = 2**31 - 1  # no window, no request limits: a branch is never cut or restarted


class SimulatorError(ValueError):
    """A start state the simulator cannot rebuild; the message names the state and what did not match."""


class SimulatorImaginer(Imaginer):
    """The Imaginer's branched rollouts with CreateStates/Imagine/ReleaseStates answered by the real env."""

    def __init__(self, chunk_size: int, action_low: Sequence[float], action_high: Sequence[float]) -> None:
        # deliberately no Imaginer.__init__: there is no client, the "model info" is the env's
        low, high = np.asarray(action_low, np.float32), np.asarray(action_high, np.float32)
        self.info = ServerModelInfo(VIEWS, 0, 0, chunk_size, int(low.shape[0]), low, high, 0, UNBOUNDED,
                                    "mujoco-simulator", "exact", UNBOUNDED, UNBOUNDED)
        self.real_env_steps = 0  # chunk steps taken in branches, the interaction this oracle spends
        self._states: dict[str, tuple[str, EnvSnapshot]] = {}  # id -> (the task of its env, its state)
        self._envs: dict[str, TabletopEnv] = {}
        self._ids = itertools.count()

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()

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
        replay renders exactly the start's frames. A recording of the multi-task env stores the drawn family
        as its task, so "multi" is tried when the family does not match."""
        origin = start.origin
        if origin is None:
            raise SimulatorError("a start state without its recorded origin (task, seed, actions) cannot be "
                                 "simulated: sample it from a recorded buffer")
        prefix = np.asarray(origin.actions, dtype=np.float32).reshape(-1, self.info.action_dim)
        for task in dict.fromkeys((origin.task, MULTI_TASK)):
            obs, success = self._replay(task, origin.seed, prefix, start.head.shape[:2])
            if all(np.array_equal(obs[view], getattr(start, view)) for view in VIEWS):
                if success:
                    raise SimulatorError(f"episode seed {origin.seed} ({origin.task}) after {len(prefix)} steps: "
                                         "the task is already done there, no branch can start from it")
                return task
        raise SimulatorError(f"episode seed {origin.seed} ({origin.task}) after {len(prefix)} steps: replaying "
                             "its actions does not render the recorded frames (another env version or scene?)")

    def _new_state(self, task: str, snapshot: EnvSnapshot) -> str:
        state_id = f"sim-{next(self._ids)}"
        self._states[state_id] = (task, snapshot)
        return state_id

    def _replay(self, task: str, seed: int, prefix: np.ndarray, image_hw: tuple[int, int]) -> tuple[dict, bool]:
        """The env reset to `seed` and stepped through `prefix`; returns (observation, success)."""
        env = self._envs.get(task)
        if env is None:
            env = self._envs[task] = make_env(task, image_size=tuple(image_hw), max_steps=UNBOUNDED)
        obs, info = env.reset(seed=seed)
        if len(prefix):
            obs, _, _, _, info = env.step_chunk(prefix)
        return obs, bool(info["success"])

    def _imagine(self, state_ids: list[str], actions: np.ndarray, seeds: list[int], keep: bool, temperature: float,
                 owned: list[str]) -> list[ImaginedBranch]:
        """Each branch: restore its state, step its chunk [k * d] in the env (stopping at a success inside it)."""
        results = []
        for index, (state_id, flat) in enumerate(zip(state_ids, actions, strict=True)):
            if state_id not in self._states:
                raise SimulatorError(f"unknown simulator state {state_id!r} (released or never created)")
            task, snapshot = self._states[state_id]
            chunk = np.asarray(flat, dtype=np.float32).reshape(self.info.chunk_size, self.info.action_dim)
            env = self._envs[task]
            env.restore(snapshot)
            obs, _, _, _, info = env.step_chunk(chunk)
            taken = int(info["num_steps_taken"])
            self.real_env_steps += taken
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
