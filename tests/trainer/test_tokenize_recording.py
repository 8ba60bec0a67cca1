"""`vla-mbpo tokenize`: whole recordings and successful tails into a token cache, exact ids and crops."""

import numpy as np
import pytest
from world_model_fixtures import synthetic_episodes, write_recording

from engine.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from trainer.data import EpisodeDataset
from trainer.tokenize_recording import (
    TokenizeConfig,
    TokenizeError,
    main,
    parse_range,
    success_tail,
    tokenize_recording,
)
from trainer.world_model_data import load_token_cache, tokenize_episode

TOKENIZER = ImageTokenizerConfig(image_size=16, fsq_levels=(3, 4), stage_channels=(8, 8))


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """Five 24-step episodes; episode 2 fails (every third does), the others first succeed at frame 9."""
    root = tmp_path_factory.mktemp("tokenize")
    episodes = synthetic_episodes(5)
    write_recording(root / "data", episodes)
    ImageTokenizer.random(TOKENIZER, seed=0).save_pretrained(root / "tokenizer")
    return root, episodes


def test_success_tail_crops_to_the_steps_before_the_first_success(recording):
    root, _ = recording
    episode = EpisodeDataset(root / "data").load(0)
    first = int(np.argmax(episode.success))
    assert first == 9
    tail = success_tail(episode, 3)
    assert tail.num_steps == 24 - 6 and tail.success.tolist() == [False] * 3 + [True] * 16
    assert np.array_equal(tail.head, episode.head[6:]) and np.array_equal(tail.actions, episode.actions[6:])
    assert success_tail(episode, 100).num_steps == 24  # never before the first frame
    assert success_tail(EpisodeDataset(root / "data").load(2), 3) is None


def test_tokenize_recording_keeps_successful_tails_with_their_recording_ids(recording):
    root, _ = recording
    tokenizer = ImageTokenizer.from_pretrained(root / "tokenizer").eval()
    config = TokenizeConfig(str(root / "data"), first_episode=1, last_episode=5, success_tail_steps=3)
    episodes, ids = tokenize_recording(config, tokenizer, progress=False)
    assert ids == [1, 3, 4] and [e.num_steps for e in episodes] == [18, 18, 18]
    expected = tokenize_episode(tokenizer, success_tail(EpisodeDataset(root / "data").load(3), 3), ("head", "wrist"))
    assert np.array_equal(episodes[1].codes, expected.codes) and np.array_equal(episodes[1].success, expected.success)


def test_cli_writes_a_cache_that_train_world_model_reads(recording, tmp_path, capsys):
    root, _ = recording
    out = tmp_path / "cache.npz"
    assert main(["--data", str(root / "data"), "--tokenizer", str(root / "tokenizer"), "--out", str(out),
                 "--episodes", ":3"]) == 0
    episodes, ids = load_token_cache(out)
    assert ids == [0, 1, 2] and [e.num_steps for e in episodes] == [24, 24, 24]
    assert "3 episodes, 72 steps" in capsys.readouterr().out


def test_bad_selections_name_the_problem(recording, capsys):
    root, _ = recording
    tokenizer = ImageTokenizer.from_pretrained(root / "tokenizer")
    with pytest.raises(TokenizeError, match="has 5 episodes; asked for episodes up to 9"):
        tokenize_recording(TokenizeConfig(str(root / "data"), last_episode=9), tokenizer, progress=False)
    with pytest.raises(TokenizeError, match=r"no episode of .* \[2, 3\) was selected \(none succeeds\)"):
        tokenize_recording(TokenizeConfig(str(root / "data"), 2, 3, success_tail_steps=0), tokenizer,
                           progress=False)
    with pytest.raises(TokenizeError, match="last_episode must be > first_episode, got 2 <= 3"):
        TokenizeConfig("", first_episode=3, last_episode=2)
    assert parse_range("4:") == (4, None) and parse_range(":7") == (0, 7) and parse_range(None) == (0, None)
    with pytest.raises(SystemExit):
        main(["--data", "d", "--tokenizer", "t", "--out", "o", "--episodes", "4"])
    assert "--episodes needs A:B, got '4'" in capsys.readouterr().err
