"""The real environment: language-conditioned tabletop manipulation in MuJoCo with head and wrist cameras.

Importing this package registers the gymnasium ids in `ENV_IDS` ("VlaMbpo/Lift-v0", ..., and
"VlaMbpo/MultiTask-v0", which draws a family per reset). MuJoCo picks its GL backend at import, so the
entry point must set MUJOCO_GL (e.g. "egl") before importing this package.
"""

from __future__ import annotations

import gymnasium as gym

from trainer.envs.tabletop import (
    ACTION_DIM,
    DEFAULT_CHUNK_SIZE,
    VIEWS,
    ActionError,
    EnvConfig,
    EnvConfigError,
    EnvSnapshot,
    EpisodeOverError,
    SimState,
    TabletopEnv,
)
from trainer.envs.tasks import MULTI_TASK, TASK_FAMILIES, TASK_NAMES, TaskError, all_instructions

# task name -> registered gymnasium id
ENV_IDS: dict[str, str] = {
    "lift": "VlaMbpo/Lift-v0",
    "push": "VlaMbpo/Push-v0",
    "place": "VlaMbpo/Place-v0",
    MULTI_TASK: "VlaMbpo/MultiTask-v0",
}


def _register() -> None:
    for task, env_id in ENV_IDS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point="trainer.envs.tabletop:TabletopEnv", kwargs={"task": task})


def make_env(task: str = MULTI_TASK, **kwargs) -> TabletopEnv:
    """The bare env (no gymnasium wrappers), e.g. for data collection; kwargs go to TabletopEnv."""
    return TabletopEnv(task=task, **kwargs)


_register()

__all__ = [
    "ACTION_DIM", "DEFAULT_CHUNK_SIZE", "ENV_IDS", "MULTI_TASK", "TASK_FAMILIES", "TASK_NAMES", "VIEWS",
    "ActionError", "EnvConfig", "EnvConfigError", "EnvSnapshot", "EpisodeOverError", "SimState", "TabletopEnv",
    "TaskError", "all_instructions", "make_env",
]
