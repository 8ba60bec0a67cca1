import numpy as np
import pytest
import torch
from world_model_fixtures import synthetic_episode

from engine.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from engine.layout import TokenLayout
from trainer.world_model_data import (
    TARGET_IMAGE,
    TARGET_NONE,
    TARGET_REWARD,
    VIEW_NONE,
    TokenizedEpisode,
    Window,
    WorldModelDataError,
    build_stream,
    collate_streams,
    enumerate_windows,
    independent_view_mask,
    load_token_cache,
    reward_class_weights,
    save_token_cache,
    split_episode_ids,
    tokenize_episode,
    view_tags,
    window_reward_counts,
)

LAYOUT = TokenLayout(codebook_size=12, tokens_per_view=4, chunk_size=2, action_dim=4, max_chunks_per_branch=2)


def tiny_episode(steps: int = 6, success_from: int = 4, instruction: str = "go") -> TokenizedEpisode:
    codes = (np.arange((steps + 1) * 2 * 4).reshape(steps + 1, 2, 4) % 12).astype(np.int64)
    actions = np.linspace(-1, 1, steps * 4, dtype=np.float32).reshape(steps, 4)
    return TokenizedEpisode(instruction, codes, actions, np.arange(steps + 1) >= success_from)


def test_split_is_by_episode_and_interleaved():
    train, val = split_episode_ids(25, val_every=10)
    assert val == [9, 19]
    assert train == [i for i in range(25) if i not in (9, 19)]
    assert split_episode_ids(5, val_every=10) == ([0, 1, 2, 3], [4])
    with pytest.raises(WorldModelDataError, match=r"need >= 2 episodes and val_every >= 2 to split, got 1, 10"):
        split_episode_ids(1)


def test_windows_keep_the_chunks_that_fit():
    windows = enumerate_windows([tiny_episode(steps=6), tiny_episode(steps=2)], chunk_size=2, max_chunks=2)
    assert windows == [Window(0, 0, 2), Window(0, 1, 2), Window(0, 2, 2), Window(0, 3, 1), Window(0, 4, 1),
                       Window(1, 0, 1)]


def test_stream_matches_the_layout_exactly():
    episode = tiny_episode()
    stream = build_stream(LAYOUT, episode, start=1, num_chunks=2)
    expected = np.concatenate([
        LAYOUT.encode_instruction("go"), LAYOUT.encode_observation(episode.codes[1]),
        LAYOUT.encode_actions(episode.actions[1:3]), LAYOUT.encode_observation(episode.codes[3]),
        LAYOUT.encode_reward(False),
        LAYOUT.encode_actions(episode.actions[3:5]), LAYOUT.encode_observation(episode.codes[5]),
        LAYOUT.encode_reward(True),
    ])
    assert stream.token_ids.tolist() == expected.tolist()
    assert len(stream.token_ids) == LAYOUT.prefix_len(2) + 2 * LAYOUT.chunk_len
    image_positions = np.flatnonzero(stream.targets == TARGET_IMAGE).tolist()
    first_generated = LAYOUT.prefix_len(2) + LAYOUT.action_len
    # generated obs: <obs> <view:head> h1..h4 <view:wrist> w1..w4; only codes are targets.
    assert image_positions[:8] == [first_generated + i for i in (2, 3, 4, 5, 7, 8, 9, 10)]
    assert len(image_positions) == 16
    reward_positions = np.flatnonzero(stream.targets == TARGET_REWARD).tolist()
    assert reward_positions == [first_generated + LAYOUT.generated_len - 1, len(expected) - 1]
    assert stream.token_ids[reward_positions].tolist() == [LAYOUT.no_id, LAYOUT.yes_id]
    assert (stream.targets[:first_generated] == TARGET_NONE).all()


def test_stream_rejects_windows_past_the_end():
    with pytest.raises(WorldModelDataError, match=r"window start=3 num_chunks=2 does not fit an episode of 6 steps "
                                                  r"with chunk_size=2"):
        build_stream(LAYOUT, tiny_episode(), start=3, num_chunks=2)


def test_view_tags_and_independent_mask():
    stream = build_stream(LAYOUT, tiny_episode(), start=0, num_chunks=1)
    ids = torch.from_numpy(stream.token_ids)[None]
    obs_index, view = view_tags(LAYOUT, ids)
    start_obs = LAYOUT.prefix_len(2) - LAYOUT.observation_len
    generated = LAYOUT.prefix_len(2) + LAYOUT.action_len
    assert obs_index[0, start_obs].item() == 0 and obs_index[0, generated].item() == 1
    assert (view[0, :generated + 1] == VIEW_NONE).all()  # the real start observation is never masked
    assert view[0, generated + 1:generated + 11].tolist() == [0] * 5 + [1] * 5
    assert view[0, generated + 11:].tolist() == [VIEW_NONE, VIEW_NONE]  # <rew> <yes|no>
    mask = independent_view_mask(LAYOUT, ids)[0, 0]
    length = len(stream.token_ids)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    hidden = (causal & ~mask).nonzero().tolist()
    # wrist marker + 4 wrist codes cannot see the head marker + 4 head codes of the same observation.
    assert hidden == [[q, k] for q in range(generated + 6, generated + 11) for k in range(generated + 1, generated + 6)]
    assert not (mask & ~causal).any()
    tail = independent_view_mask(LAYOUT, ids, query_start=generated + 8)[0, 0]
    assert torch.equal(tail, mask[generated + 8:])


def test_collate_pads_right():
    short = build_stream(LAYOUT, tiny_episode(), 0, 1)
    long = build_stream(LAYOUT, tiny_episode(), 0, 2)
    batch = collate_streams(LAYOUT, [short, long])
    assert batch.token_ids.shape == (2, len(long.token_ids))
    assert (batch.token_ids[0, len(short.token_ids):] == LAYOUT.special("pad")).all()
    assert (batch.targets[0, len(short.token_ids):] == TARGET_NONE).all()
    assert batch.token_ids[1].tolist() == long.token_ids.tolist()


def test_reward_weights_balance_the_classes():
    episodes = [tiny_episode(success_from=4), tiny_episode(success_from=99)]
    windows = enumerate_windows(episodes, chunk_size=2, max_chunks=2)
    # labels: ep0 starts 0..4 -> [2,4],[3,5],[4,6],[5],[6] = F,T / F,T / T,T / T / T; ep1 -> 8 x no
    no_weight, yes_weight = reward_class_weights(episodes, windows, chunk_size=2)
    assert (no_weight, yes_weight) == pytest.approx((16 / (2 * 10), 16 / (2 * 6)))
    with pytest.raises(WorldModelDataError, match=r"reward labels need both classes, got 0 yes and 8 no over 5"):
        reward_class_weights(episodes[1:], enumerate_windows(episodes[1:], 2, 2), chunk_size=2)


def test_token_cache_roundtrip(tmp_path):
    episodes = [tiny_episode(6, 4, "go"), tiny_episode(3, 9, "grasp the cube")]
    save_token_cache(tmp_path / "tokens.npz", episodes, [7, 11])
    loaded, ids = load_token_cache(tmp_path / "tokens.npz")
    assert ids == [7, 11]
    for a, b in zip(episodes, loaded, strict=True):
        assert a.instruction == b.instruction
        assert np.array_equal(a.codes, b.codes) and np.array_equal(a.actions, b.actions)
        assert np.array_equal(a.success, b.success)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(WorldModelDataError, match=r"bad.npz: not a readable token cache"):
        load_token_cache(tmp_path / "bad.npz")


def test_tokenize_episode_encodes_every_view():
    tokenizer = ImageTokenizer.random(ImageTokenizerConfig(image_size=16, fsq_levels=(3, 4), stage_channels=(8, 8)))
    episode = synthetic_episode(0, steps=5)
    tokenized = tokenize_episode(tokenizer, episode, ("head", "wrist"), batch_size=4)
    assert tokenized.codes.shape == (6, 2, 16)
    assert np.array_equal(tokenized.codes[:, 1], tokenizer.encode(episode.wrist).numpy())
    assert tokenized.success.tolist() == episode.success.tolist()
    with pytest.raises(WorldModelDataError, match=r"episode has no frames for a layout view"):
        tokenize_episode(tokenizer, episode, ("head", "side"))


def test_reward_weights_account_for_positive_oversampling():
    episodes = [tiny_episode(success_from=4), tiny_episode(success_from=99)]
    windows = enumerate_windows(episodes, chunk_size=2, max_chunks=2)
    assert window_reward_counts(episodes, windows, 2)[:5].tolist() == [[1, 1], [1, 1], [0, 2], [0, 1], [0, 1]]
    # uniform mean (no, yes) = (1.0, 0.6); mean over windows with a yes = (0.4, 1.2); half each -> (0.7, 0.9)
    weights = reward_class_weights(episodes, windows, chunk_size=2, positive_fraction=0.5)
    assert weights == pytest.approx((1.6 / 1.4, 1.6 / 1.8))


def test_post_success_frames_make_yes_chunks():
    # A recording filmed on after success (collect --post-success-steps): success first at frame 5, then 4 more
    # steps, latched. Every chunk ending at or after frame 5 is a <yes>, including windows that start after it.
    stopped = TokenizedEpisode("go", tiny_episode(steps=5).codes, tiny_episode(steps=5).actions,
                               np.arange(6) >= 5)
    filmed_on = tiny_episode(steps=9, success_from=5)
    stopped_windows = enumerate_windows([stopped], chunk_size=2, max_chunks=2)
    assert window_reward_counts([stopped], stopped_windows, 2).tolist() == [[2, 0], [1, 1], [1, 0], [0, 1]]
    windows = enumerate_windows([filmed_on], chunk_size=2, max_chunks=2)
    assert [w.start for w in windows] == list(range(8))
    assert window_reward_counts([filmed_on], windows, 2).tolist() == [
        [2, 0], [1, 1], [1, 1], [0, 2], [0, 2], [0, 2], [0, 1], [0, 1]]
    after = build_stream(LAYOUT, filmed_on, start=6, num_chunks=1)
    reward_positions = np.flatnonzero(after.targets == TARGET_REWARD)
    assert after.token_ids[reward_positions].tolist() == [LAYOUT.yes_id]
    spanning = build_stream(LAYOUT, filmed_on, start=2, num_chunks=2)
    assert spanning.token_ids[spanning.targets == TARGET_REWARD].tolist() == [LAYOUT.no_id, LAYOUT.yes_id]
