"""`vla-mbpo render`: the PNG strip of a recorded episode."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from trainer import render
from trainer.data import DatasetMeta, Episode, EpisodeWriter


def small_episode(num_steps: int) -> Episode:
    head = np.zeros((num_steps + 1, 16, 16, 3), dtype=np.uint8)
    head[..., 0] = np.arange(num_steps + 1, dtype=np.uint8)[:, None, None] * 10  # red channel encodes t
    wrist = np.full_like(head, 200)
    success = np.zeros(num_steps + 1, dtype=bool)
    success[-1] = True
    return Episode(head, wrist, np.zeros((num_steps, 4), dtype=np.float32), success, "lift the red cube", "lift", 0)


def test_strip_time_steps_cover_first_and_last_without_repeats():
    assert render.strip_time_steps(10, 3) == [0, 5, 10]
    assert render.strip_time_steps(56, 8) == [0, 8, 16, 24, 32, 40, 48, 56]
    assert render.strip_time_steps(2, 8) == [0, 1, 2]
    with pytest.raises(ValueError, match="num_frames must be >= 1, got 0"):
        render.strip_time_steps(5, 0)


def test_strip_places_views_in_rows_and_time_in_columns():
    strip = render.episode_strip(small_episode(4), num_frames=3, scale=2)
    tile = 32 + render.GAP
    assert strip.shape == (render.CAPTION_HEIGHT + 2 * tile, 3 * tile - render.GAP, 3)
    for col, t in enumerate([0, 2, 4]):
        head = strip[render.CAPTION_HEIGHT: render.CAPTION_HEIGHT + 32, col * tile: col * tile + 32]
        wrist = strip[render.CAPTION_HEIGHT + tile: render.CAPTION_HEIGHT + tile + 32, col * tile: col * tile + 32]
        assert np.all(head[..., 0] == 10 * t) and np.all(wrist == 200)


def test_cli_writes_a_png_and_rejects_a_bad_episode(tmp_path, capsys):
    writer = EpisodeWriter(tmp_path / "data", DatasetMeta(image_height=16, image_width=16))
    writer.add(small_episode(6))
    out = tmp_path / "strip.png"
    assert render.main(["--data", str(tmp_path / "data"), "--episode", "0", "--out", str(out), "--frames", "4"]) == 0
    with Image.open(out) as image:
        assert image.size == (4 * (32 + render.GAP) - render.GAP, render.CAPTION_HEIGHT + 2 * (32 + render.GAP))
    assert render.main(["--data", str(tmp_path / "data"), "--episode", "5", "--out", str(out)]) == 2
    assert r"episode 5 outside [0, 1)" in capsys.readouterr().err
    assert render.main(["--data", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "manifest not found" in capsys.readouterr().err
