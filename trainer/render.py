"""`vla-mbpo render`: a PNG strip of one recorded episode, every view stacked per column, time left to right.

Rows are the views in recording order (head, then wrist); columns are evenly spaced time steps from
reset to the last frame. A caption line gives the instruction and the outcome.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainer.data import VIEWS, DataError, Episode, EpisodeDataset

CAPTION_HEIGHT = 14
GAP = 2  # pixels between tiles
BACKGROUND = (255, 255, 255)


def strip_time_steps(num_steps: int, num_frames: int) -> list[int]:
    """`num_frames` time steps spread evenly over [0, num_steps], first and last included, no repeats."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return sorted({int(round(t)) for t in np.linspace(0, num_steps, min(num_frames, num_steps + 1))})


def episode_strip(episode: Episode, num_frames: int = 8, scale: int = 2) -> np.ndarray:
    """The strip as uint8[caption + rows * (H*scale + gap), cols * (W*scale + gap), 3]."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    steps = strip_time_steps(episode.num_steps, num_frames)
    h, w = episode.head.shape[1] * scale, episode.head.shape[2] * scale
    height = CAPTION_HEIGHT + len(VIEWS) * (h + GAP)
    width = len(steps) * (w + GAP) - GAP
    canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    for col, t in enumerate(steps):
        for row, view in enumerate(VIEWS):
            tile = getattr(episode, view)[t].repeat(scale, axis=0).repeat(scale, axis=1)  # [h, w, 3]
            y, x = CAPTION_HEIGHT + row * (h + GAP), col * (w + GAP)
            canvas[y: y + h, x: x + w] = tile
    image = Image.fromarray(canvas)
    outcome = "success" if episode.succeeded else "no success"
    caption = f'"{episode.instruction}"  {episode.num_steps} steps, {outcome}; rows: {", ".join(VIEWS)}'
    ImageDraw.Draw(image).text((2, 1), caption, fill=(0, 0, 0))
    return np.asarray(image)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-mbpo render", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a recorded dataset directory")
    parser.add_argument("--episode", type=int, default=0, help="episode index in the manifest")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--frames", type=int, default=8, help="number of time steps in the strip")
    parser.add_argument("--scale", type=int, default=2, help="integer upscaling of each frame")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        dataset = EpisodeDataset(args.data)
        strip = episode_strip(dataset.load(args.episode), args.frames, args.scale)
    except (DataError, IndexError, ValueError) as e:
        print(f"vla-mbpo render: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip).save(out, optimize=True)
    print(f"wrote {out} ({strip.shape[1]}x{strip.shape[0]} px)")
    return 0
