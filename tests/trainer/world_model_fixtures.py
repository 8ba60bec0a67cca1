"""Synthetic episodes in the trainer.data format, small enough for CPU tests of the world-model pipeline.

A red square moves by the action's first two components on a grey table (head view); the wrist view is a
2x zoom around the square. Success latches once the square's x passes 3/4 of the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SyntheticEpisode:
    instruction: str
    head: np.ndarray  # uint8 [T+1, S, S, 3]
    wrist: np.ndarray  # uint8 [T+1, S, S, 3]
    actions: np.ndarray  # float32 [T, 4]
    success: np.ndarray  # bool [T+1]


def _render(size: int, x: float, y: float, zoom: int) -> np.ndarray:
    image = np.full((size, size, 3), 90, dtype=np.uint8)
    half = max(1, size // 8) * zoom // 2
    cx, cy = (size / 2, size / 2) if zoom > 1 else (x, y)
    x0, y0 = int(cx - half), int(cy - half)
    image[max(0, y0):max(0, y0 + 2 * half), max(0, x0):max(0, x0 + 2 * half)] = (200, 30, 30)
    if zoom > 1:  # the wrist sees the table edge move under it
        edge = int(size / 2 + (size * 0.75 - x) * zoom) % size
        image[:, edge] = (20, 20, 160)
    return image


def synthetic_episode(seed: int, steps: int = 24, size: int = 16, succeed: bool = True) -> SyntheticEpisode:
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, (steps, 4)).astype(np.float32)
    actions[:, 0] = 0.8 if succeed else -0.2
    x, y = size * 0.3, size * 0.5
    xs, ys = [x], [y]
    for action in actions:
        x = float(np.clip(x + action[0], 0, size - 1))
        y = float(np.clip(y + 0.3 * action[1], 0, size - 1))
        xs.append(x), ys.append(y)
    success = np.maximum.accumulate(np.array(xs) > size * 0.75)
    head = np.stack([_render(size, a, b, 1) for a, b in zip(xs, ys, strict=True)])
    wrist = np.stack([_render(size, a, b, 2) for a, b in zip(xs, ys, strict=True)])
    return SyntheticEpisode("push the red block right", head, wrist, actions, success)


def synthetic_episodes(count: int, steps: int = 24, size: int = 16) -> list[SyntheticEpisode]:
    """Every third episode fails, so both reward classes occur."""
    return [synthetic_episode(i, steps, size, succeed=i % 3 != 2) for i in range(count)]


def write_recording(out_dir, episodes: list[SyntheticEpisode]) -> None:
    """Writes synthetic episodes as a recording directory (the `vla-mbpo collect` format)."""
    from trainer.data import DatasetMeta, Episode, EpisodeWriter

    size = episodes[0].head.shape[1]
    writer = EpisodeWriter(out_dir, DatasetMeta(image_height=size, image_width=size))
    for i, e in enumerate(episodes):
        writer.add(Episode(head=e.head, wrist=e.wrist, actions=e.actions, success=e.success,
                           instruction=e.instruction, task="push", seed=i))
