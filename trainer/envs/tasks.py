"""Task families: what an episode asks for (the goal and its instruction), where things start (the layout),
and when it is done (sparse success from the simulator state).

The scene always holds every item (three objects, two pads, the bin); a family only decides which of
them the instruction names, so the policy has to read the instruction to know what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.envs import scene

TASK_FAMILIES: tuple[str, ...] = ("lift", "push", "place")
MULTI_TASK = "multi"
TASK_NAMES: tuple[str, ...] = (*TASK_FAMILIES, MULTI_TASK)

LIFT_HEIGHT = 0.06  # the object's bottom must rise this far above the table
RESTING_TOLERANCE = 0.01  # an object counts as resting on the table when its centre is this close to it

# Items are placed by rejection sampling in this region; radii keep them apart with room for the fingers.
WORKSPACE_LOW = np.array([-0.19, -0.21])
WORKSPACE_HIGH = np.array([0.19, 0.21])
OBJECT_CLEARANCE = 0.045
PAD_CLEARANCE = 0.072
BIN_CLEARANCE = 0.10
MAX_LAYOUT_TRIES = 10_000


class TaskError(ValueError):
    """An unknown task family or a goal that does not fit the scene."""


@dataclass(frozen=True)
class Layout:
    """Initial placement and colouring of every item in the scene."""

    object_xy: np.ndarray  # [NUM_OBJECTS, 2]
    object_yaw: np.ndarray  # [NUM_OBJECTS]
    object_colours: tuple[int, ...]  # index into scene.OBJECT_COLOURS, distinct
    pad_xy: np.ndarray  # [NUM_PADS, 2]
    pad_colours: tuple[int, ...]  # index into scene.PAD_COLOURS, distinct
    bin_xy: np.ndarray  # [2]


@dataclass(frozen=True)
class Goal:
    """What one episode asks for: a family, the object it names and, for push, the pad."""

    family: str
    object_index: int
    pad_index: int = -1  # only push uses a pad

    def __post_init__(self) -> None:
        if self.family not in TASK_FAMILIES:
            raise TaskError(f"unknown task family {self.family!r}; expected one of {list(TASK_FAMILIES)}")
        if not 0 <= self.object_index < scene.NUM_OBJECTS:
            raise TaskError(f"object_index must be in [0, {scene.NUM_OBJECTS}), got {self.object_index}")
        if (self.family == "push") != (0 <= self.pad_index < scene.NUM_PADS):
            raise TaskError(f"pad_index {self.pad_index} does not fit family {self.family!r}")


def instruction_text(family: str, colour: str, shape: str, pad_colour: str = "") -> str:
    """The natural-language instruction of one goal; the only wording the env ever uses."""
    if family == "lift":
        return f"lift the {colour} {shape}"
    if family == "push":
        return f"push the {colour} {shape} onto the {pad_colour} target"
    if family == "place":
        return f"put the {colour} {shape} in the bin"
    raise TaskError(f"unknown task family {family!r}; expected one of {list(TASK_FAMILIES)}")


def instruction_for(goal: Goal, layout: Layout) -> str:
    """The instruction naming `goal`'s object (and pad) by the colours they have in `layout`."""
    colour = scene.OBJECT_COLOURS[layout.object_colours[goal.object_index]].name
    shape = scene.OBJECT_SHAPES[goal.object_index]
    pad = scene.PAD_COLOURS[layout.pad_colours[goal.pad_index]].name if goal.family == "push" else ""
    return instruction_text(goal.family, colour, shape, pad)


def all_instructions(task: str = MULTI_TASK) -> list[str]:
    """Every instruction a task (a family, or "multi" for all of them) can produce, sorted."""
    families = _families(task)
    shapes = sorted(set(scene.OBJECT_SHAPES))
    found = set()
    for family in families:
        pads = [p.name for p in scene.PAD_COLOURS] if family == "push" else [""]
        for colour in scene.OBJECT_COLOURS:
            for shape in shapes:
                for pad in pads:
                    found.add(instruction_text(family, colour.name, shape, pad))
    return sorted(found)


def _families(task: str) -> tuple[str, ...]:
    if task == MULTI_TASK:
        return TASK_FAMILIES
    if task in TASK_FAMILIES:
        return (task,)
    raise TaskError(f"unknown task {task!r}; expected one of {list(TASK_NAMES)}")


def sample_goal(task: str, rng: np.random.Generator) -> Goal:
    """A random goal of `task` ("multi" first draws a family uniformly)."""
    families = _families(task)
    family = families[int(rng.integers(len(families)))]
    object_index = int(rng.integers(scene.NUM_OBJECTS))
    pad_index = int(rng.integers(scene.NUM_PADS)) if family == "push" else -1
    return Goal(family, object_index, pad_index)


def sample_layout(rng: np.random.Generator) -> Layout:
    """Random non-overlapping placement of the bin, the pads and the objects, with distinct colours."""
    radii = [BIN_CLEARANCE] + [PAD_CLEARANCE] * scene.NUM_PADS + [OBJECT_CLEARANCE] * scene.NUM_OBJECTS
    for _ in range(MAX_LAYOUT_TRIES):
        points = _place_disks(radii, rng)
        if points is not None:
            break
    else:  # the clearances above leave plenty of room; reaching this means they were edited badly
        raise TaskError(f"could not place the scene items without overlap in {MAX_LAYOUT_TRIES} tries")
    object_colours = rng.permutation(len(scene.OBJECT_COLOURS))[: scene.NUM_OBJECTS]
    pad_colours = rng.permutation(len(scene.PAD_COLOURS))[: scene.NUM_PADS]
    return Layout(
        object_xy=points[1 + scene.NUM_PADS:],
        object_yaw=rng.uniform(-np.pi / 6, np.pi / 6, size=scene.NUM_OBJECTS),
        object_colours=tuple(int(c) for c in object_colours),
        pad_xy=points[1: 1 + scene.NUM_PADS],
        pad_colours=tuple(int(c) for c in pad_colours),
        bin_xy=points[0],
    )


def _place_disks(radii: list[float], rng: np.random.Generator) -> np.ndarray | None:
    """One attempt at placing disks of `radii` inside the workspace without overlap, largest first."""
    points = np.zeros((len(radii), 2))
    for i, r in enumerate(radii):
        for _ in range(50):
            p = rng.uniform(WORKSPACE_LOW + r * 0.5, WORKSPACE_HIGH - r * 0.5)
            if all(np.linalg.norm(p - points[j]) >= r + radii[j] for j in range(i)):
                points[i] = p
                break
        else:
            return None
    return points


def is_success(goal: Goal, layout: Layout, object_pos: np.ndarray) -> bool:
    """Sparse success from the simulator: `object_pos` [NUM_OBJECTS, 3] are the objects' centres."""
    pos = object_pos[goal.object_index]
    h = scene.OBJECT_HALF_SIZE
    if goal.family == "lift":
        return bool(pos[2] - h >= LIFT_HEIGHT)
    if goal.family == "push":
        inside = np.all(np.abs(pos[:2] - layout.pad_xy[goal.pad_index]) <= scene.PAD_HALF_SIZE)
        return bool(inside and pos[2] <= h + RESTING_TOLERANCE)
    # place: inside the bin's walls and below their rim, i.e. dropped in, not hovering above
    inside = np.all(np.abs(pos[:2] - layout.bin_xy) <= scene.BIN_INNER_HALF)
    return bool(inside and pos[2] <= 2 * scene.BIN_WALL_HALF_HEIGHT)
