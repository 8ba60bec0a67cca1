"""`vla-mbpo demo` end to end at toy sizes: real demos, SFT, real buffer, a served random world model,
before/after evaluation, table, plots, summary, and the server stopped with nothing left behind."""

import json

import pytest

from engine.checkpoint import layout_for_tokenizer, write_random_checkpoint
from engine.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from vla_mbpo.demo import DemoConfig, DemoError, main, run_demo

# 64x64 like the env, 4x4 token grid: a random world model that decodes fast on a CPU.
TOKENIZER = ImageTokenizerConfig(image_size=64, fsq_levels=(4, 4), stage_channels=(32, 32, 32, 32))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    layout = layout_for_tokenizer(TOKENIZER, views=("head", "wrist"), chunk_size=8, action_dim=4,
                                  action_low=(-1.0,) * 4, action_high=(1.0,) * 4, max_chunks_per_branch=2,
                                  max_instruction_bytes=96)
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "random", layout, hidden_size=32, num_layers=1,
                                   num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0,
                                   tokenizer=ImageTokenizer.random(TOKENIZER, seed=0))


@pytest.mark.slow
def test_demo_runs_every_stage_and_caches(checkpoint, tmp_path, capsys):
    config = DemoConfig(checkpoint=checkpoint, cache_dir=tmp_path / "cache", run_dir=tmp_path / "run",
                        demo_episodes=6, sft_steps=2, buffer_episodes=2, eval_episodes=1, iterations=1,
                        num_start_states=2, horizon_chunks=1, updates_per_refill=1, minibatch_size=2, workers=1,
                        critic_warmup_steps=2)
    summary = run_demo(config)
    out = capsys.readouterr().out
    assert "| SFT | " in out and "| SFT + VLA-MBPO | " in out and "server SERVING on 127.0.0.1:" in out
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["imagined_chunks"] == 2 == summary["imagined_chunks"]
    assert saved["server_stats"]["live_states"] == 0
    assert saved["real_env_steps"] == json.loads(
        next((tmp_path / "cache").glob("buffer-*/manifest.json")).read_text())["counts"]["steps"]
    assert sorted(p.name for p in (tmp_path / "run").glob("*.png")) == ["success_vs_iteration.png",
                                                                        "success_vs_real_steps.png"]
    assert "stopped vla_mbpo.v1.WorldModel" in (tmp_path / "run" / "server.log").read_text()
    run_demo(config)  # second run: every expensive stage comes from the cache
    out = capsys.readouterr().out
    assert "cached demos:" in out and "cached SFT policy:" in out and "cached real buffer:" in out


def test_demo_without_checkpoint_says_what_is_missing(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "none"), "--cache-dir", str(tmp_path / "c"),
                 "--run-dir", str(tmp_path / "r")]) == 1
    assert f"no world-model checkpoint at {tmp_path / 'none'}" in capsys.readouterr().err
    with pytest.raises(DemoError, match="expected layout.json, world_model/, tokenizer/"):
        run_demo(DemoConfig(checkpoint=tmp_path / "none"))


def test_demo_config_validation():
    with pytest.raises(ValueError, match="DemoConfig.iterations must be >= 1, got 0"):
        DemoConfig(iterations=0)
