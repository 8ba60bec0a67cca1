"""The tabletop scene as MJCF: table, a mocap-driven two-finger gripper, three objects, two target pads, a bin.

Every episode uses the same model; a reset only moves bodies and recolours geoms, so one compiled model
and one renderer per camera serve a whole run. Dimensions are module constants because the task checks
(`tasks.py`) and the scripted expert (`expert.py`) reason about the same geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

# World frame: the table top is the plane z = 0; the workspace is centred at the origin, the robot
# stands at -x, the head camera looks from +x. All lengths in metres.
TABLE_HALF_EXTENT = 0.32
OBJECT_HALF_SIZE = 0.02  # cube half-edge; cylinder radius and half-height
NUM_OBJECTS = 3
OBJECT_SHAPES = ("cube", "cube", "cylinder")  # one per object slot
NUM_PADS = 2
PAD_HALF_SIZE = 0.05
BIN_INNER_HALF = 0.065
BIN_WALL_HALF_THICKNESS = 0.005
BIN_WALL_HALF_HEIGHT = 0.025

# Gripper: the hand (three slide joints) follows a mocap target; two fingers slide along the hand's y axis.
FINGER_LENGTH = 0.07  # the finger tips hang this far below the hand frame
FINGER_HALF_THICKNESS = 0.005
FINGER_OPEN = 0.045  # joint position of each finger when open (gap = 2 * 0.045)
FINGER_KP = 300.0
HAND_HOME = (-0.05, 0.0, 0.16)

# Physics: implicitfast with a 4 ms step; an env step advances SUBSTEPS of them (40 ms, 25 Hz control).
TIMESTEP = 0.004
SUBSTEPS = 10


@dataclass(frozen=True)
class Colour:
    """A named RGBA colour: the name is what instructions say."""

    name: str
    rgba: tuple[float, float, float, float]


OBJECT_COLOURS = (
    Colour("red", (0.85, 0.12, 0.10, 1.0)),
    Colour("green", (0.15, 0.70, 0.20, 1.0)),
    Colour("blue", (0.12, 0.30, 0.90, 1.0)),
    Colour("yellow", (0.95, 0.85, 0.10, 1.0)),
)
PAD_COLOURS = (
    Colour("orange", (1.0, 0.50, 0.0, 1.0)),
    Colour("purple", (0.55, 0.15, 0.75, 1.0)),
    Colour("white", (0.97, 0.97, 0.97, 1.0)),
)


def _object_body(index: int) -> str:
    shape = OBJECT_SHAPES[index]
    s = OBJECT_HALF_SIZE
    geom = (f'type="box" size="{s} {s} {s}"' if shape == "cube" else f'type="cylinder" size="{s} {s}"')
    # Parked far apart under the table until the first reset places them.
    return f"""
    <body name="object{index}" pos="{0.1 * index} 0.5 {s}">
      <freejoint name="object{index}_joint"/>
      <geom name="object{index}" {geom} mass="0.05" rgba="1 1 1 1" condim="4"
            friction="1.2 0.01 0.001" solref="0.01 1"/>
    </body>"""


def _pad_body(index: int) -> str:
    return f"""
    <body name="pad{index}" pos="0 {-0.5 - 0.2 * index} 0">
      <geom name="pad{index}" type="box" size="{PAD_HALF_SIZE} {PAD_HALF_SIZE} 0.0008" pos="0 0 0.0008"
            contype="0" conaffinity="0" rgba="1 1 1 1"/>
    </body>"""


def _bin_body() -> str:
    inner, t, h = BIN_INNER_HALF, BIN_WALL_HALF_THICKNESS, BIN_WALL_HALF_HEIGHT
    off = inner + t
    span = inner + 2 * t
    walls = [(off, 0, t, span), (-off, 0, t, span), (0, off, span, t), (0, -off, span, t)]
    geoms = "\n".join(
        f'      <geom type="box" pos="{x} {y} {h}" size="{sx} {sy} {h}" material="bin"/>'
        for x, y, sx, sy in walls
    )
    return f"""
    <body name="bin" pos="0 0.8 0">
{geoms}
    </body>"""


def scene_xml() -> str:
    """The MJCF of the whole scene. Shadows and MSAA are off: at 64x64 they cost ~50x the render time."""
    s = FINGER_HALF_THICKNESS
    objects = "".join(_object_body(i) for i in range(NUM_OBJECTS))
    pads = "".join(_pad_body(i) for i in range(NUM_PADS))
    hx, hy, hz = HAND_HOME
    return f"""
<mujoco model="vla_mbpo_tabletop">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{TIMESTEP}" integrator="implicitfast" cone="elliptic" impratio="10"/>
  <visual>
    <quality shadowsize="0" offsamples="0"/>
    <headlight ambient="0.45 0.45 0.45" diffuse="0.35 0.35 0.35" specular="0 0 0"/>
    <rgba haze="0.6 0.7 0.8 1"/>
  </visual>
  <asset>
    <texture name="wood" type="2d" builtin="checker" rgb1="0.62 0.50 0.38" rgb2="0.58 0.46 0.34"
             width="64" height="64"/>
    <material name="table" texture="wood" texrepeat="6 6"/>
    <material name="bin" rgba="0.35 0.35 0.38 1"/>
    <material name="metal" rgba="0.75 0.75 0.78 1"/>
    <material name="dark" rgba="0.15 0.15 0.17 1"/>
  </asset>
  <worldbody>
    <light pos="0.3 -0.3 1.2" dir="-0.25 0.25 -1" directional="true" diffuse="0.5 0.5 0.5" castshadow="false"/>
    <!-- a box, not a plane: MuJoCo draws planes as a fine grid, which costs more than the rest of the scene -->
    <geom name="floor" type="box" pos="0 0 -0.80" size="3 3 0.05" rgba="0.30 0.32 0.35 1" contype="0" conaffinity="0"/>
    <geom name="table" type="box" pos="0 0 -0.02" size="{TABLE_HALF_EXTENT} {TABLE_HALF_EXTENT} 0.02"
          material="table" friction="0.8 0.005 0.0001"/>
    <geom name="robot_base" type="cylinder" pos="-0.40 0 0.05" size="0.06 0.05" material="dark"
          contype="0" conaffinity="0"/>
    <camera name="head" pos="0.52 0 0.50" xyaxes="0 1 0 -0.69 0 0.72" fovy="52"/>
    {pads}
    {_bin_body()}
    {objects}
    <body name="hand_target" mocap="true" pos="{hx} {hy} {hz}"/>
    <body name="hand" pos="{hx} {hy} {hz}" gravcomp="1">
      <joint name="hand_x" type="slide" axis="1 0 0" damping="2"/>
      <joint name="hand_y" type="slide" axis="0 1 0" damping="2"/>
      <joint name="hand_z" type="slide" axis="0 0 1" damping="2"/>
      <geom name="palm" type="box" size="0.018 0.06 0.012" pos="0 0 0.012" material="dark"/>
      <geom name="wrist_link" type="cylinder" size="0.015 0.08" pos="0 0 0.10" material="metal"
            contype="0" conaffinity="0"/>
      <camera name="wrist" pos="0.045 0 0.0" xyaxes="0 -1 0 0.97 0 -0.26" fovy="80"/>
      <body name="finger_left" gravcomp="1">
        <joint name="finger_left" type="slide" axis="0 1 0" range="0 {FINGER_OPEN}" damping="30" armature="0.01"/>
        <geom name="finger_left" type="box" size="0.012 {s} {FINGER_LENGTH / 2}"
              pos="0 {s + 0.001} {-FINGER_LENGTH / 2}" mass="0.02" material="metal" condim="4"
              friction="1.5 0.01 0.001"/>
      </body>
      <body name="finger_right" gravcomp="1">
        <joint name="finger_right" type="slide" axis="0 -1 0" range="0 {FINGER_OPEN}" damping="30" armature="0.01"/>
        <geom name="finger_right" type="box" size="0.012 {s} {FINGER_LENGTH / 2}"
              pos="0 {-s - 0.001} {-FINGER_LENGTH / 2}" mass="0.02" material="metal" condim="4"
              friction="1.5 0.01 0.001"/>
      </body>
    </body>
  </worldbody>
  <contact>
    <exclude body1="finger_left" body2="finger_right"/>
  </contact>
  <equality>
    <!-- The hand follows its mocap target through a soft constraint, so its motion has a velocity and
         finger friction can carry a grasped object (a mocap body itself only teleports). -->
    <connect body1="hand" body2="hand_target" anchor="0 0 0" solref="0.008 1"/>
  </equality>
  <actuator>
    <position name="finger_left" joint="finger_left" kp="{FINGER_KP}" ctrlrange="0 {FINGER_OPEN}"/>
    <position name="finger_right" joint="finger_right" kp="{FINGER_KP}" ctrlrange="0 {FINGER_OPEN}"/>
  </actuator>
</mujoco>
"""
