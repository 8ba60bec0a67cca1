"""Behaviour cloning: chunk targets with padding, the masked loss, the augmentation, a tiny training run."""

import json

import numpy as np
import pytest
import torch

from trainer.config import ConfigError, PolicyConfig, SFTConfig
from trainer.data import DatasetMeta, Episode, EpisodeWriter
from trainer.policy import load_policy
from trainer.sft import bc_loss, chunk_targets, load_demos, random_shift, train_sft

TINY = PolicyConfig(conv_channels=(4, 8), image_size=16, hidden_dim=32, image_feature_dim=16, text_feature_dim=8,
                    text_embed_dim=8, critic_hidden_dim=8, chunk_size=2, action_dim=4, num_bins=5)


def write_dataset(path, lengths_and_success, size=16):
    writer = EpisodeWriter(path, DatasetMeta(size, size, 4, (-1.0,) * 4, (1.0,) * 4, 2))
    rng = np.random.default_rng(0)
    for i, (num_steps, success) in enumerate(lengths_and_success):
        writer.add(Episode(rng.integers(0, 256, (num_steps + 1, size, size, 3), dtype=np.uint8),
                           rng.integers(0, 256, (num_steps + 1, size, size, 3), dtype=np.uint8),
                           np.full((num_steps, 4), 0.5 * (i % 2), dtype=np.float32),
                           np.array([False] * num_steps + [success]), f"lift the cube {i}", "lift", i))


def test_chunk_targets_pad_with_the_last_action():
    actions = np.array([[0.0, 0.1], [1.0, 1.1], [2.0, 2.1]], dtype=np.float32)
    chunks, real = chunk_targets(actions, chunk_size=2)
    expected = np.array([[[0.0, 0.1], [1.0, 1.1]], [[1.0, 1.1], [2.0, 2.1]], [[2.0, 2.1], [2.0, 2.1]]], np.float32)
    assert np.array_equal(chunks, expected)
    assert real.tolist() == [[True, True], [True, True], [True, False]]
    with pytest.raises(ValueError, match="an episode with no actions has no behaviour-cloning targets"):
        chunk_targets(np.zeros((0, 2), dtype=np.float32), 2)


def test_bc_loss_masks_padding():
    logits = torch.tensor([[[10.0, 0.0], [0.0, 10.0]]])  # [1, D=2, nb=2]
    target = torch.tensor([[0, 0]])
    loss, accuracy = bc_loss(logits, target, torch.tensor([[True, False]]), label_smoothing=0.0)
    assert float(loss) == pytest.approx(float(torch.log1p(torch.exp(torch.tensor(-10.0)))), abs=1e-6)
    assert float(accuracy) == 1.0
    _, accuracy_all = bc_loss(logits, target, torch.tensor([[True, True]]), label_smoothing=0.0)
    assert float(accuracy_all) == 0.5


def test_random_shift_moves_content_within_the_pad():
    images = torch.zeros((64, 16, 16, 3), dtype=torch.uint8)
    images[:, 8, 8] = 255
    shifted = random_shift(images, torch.Generator().manual_seed(0), pad=2)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    rows, cols = [], []
    for img in shifted:
        where = torch.nonzero(img[..., 0] == 255)
        assert where.shape == (1, 2)
        rows.append(int(where[0, 0]))
        cols.append(int(where[0, 1]))
    assert set(rows) == {6, 7, 8, 9, 10} and set(cols) == {6, 7, 8, 9, 10}


def test_load_demos_keeps_successful_episodes_by_default(tmp_path):
    write_dataset(tmp_path / "d", [(3, True), (2, False), (4, True)])
    demos = load_demos(tmp_path / "d", TINY, only_successful=True)
    assert demos.num_episodes == 2 and len(demos) == 3 + 4
    assert demos.head.shape == (7, 16, 16, 3) and demos.target_bins.shape == (7, 8)
    # episode 0 (actions 0.0 -> bin 2) then episode 2 (actions 0.0); last step of each has one padded action
    assert demos.target_mask.sum(1).tolist() == [8, 8, 4, 8, 8, 8, 4]
    assert demos.instruction_ids.tolist() == [0, 0, 0, 1, 1, 1, 1]
    everything = load_demos(tmp_path / "d", TINY, only_successful=False)
    assert everything.num_episodes == 3 and len(everything) == 9
    assert everything.target_bins[3].tolist() == [3] * 8  # episode 1: actions 0.5 -> bin 3 of 5


def test_load_demos_clones_up_to_the_first_success(tmp_path):
    # Filmed on for 3 steps after success at step 2 (collect --post-success-steps 3): the hold is not cloned.
    writer = EpisodeWriter(tmp_path / "d", DatasetMeta(16, 16, 4, (-1.0,) * 4, (1.0,) * 4, 2))
    frames = np.arange(6, dtype=np.uint8)[:, None, None, None] * np.ones((1, 16, 16, 3), dtype=np.uint8)
    actions = np.array([[0.0] * 4, [0.0] * 4, [-1.0] * 4, [1.0] * 4, [1.0] * 4], dtype=np.float32)
    writer.add(Episode(frames, frames.copy(), actions, np.array([False, False, True, True, True, True]),
                       "lift the cube", "lift", 0))
    demos = load_demos(tmp_path / "d", TINY, only_successful=True)
    assert demos.num_episodes == 1 and len(demos) == 2
    assert demos.head[:, 0, 0, 0].tolist() == [0, 1]
    # step 1's chunk is padded with its own action (0.0 -> bin 2), not filled with the hold's (-1.0 -> bin 0)
    assert demos.target_bins.tolist() == [[2] * 8, [2] * 8]
    assert demos.target_mask.sum(1).tolist() == [8, 4]


def test_train_sft_writes_a_loadable_policy_and_metrics(tmp_path):
    write_dataset(tmp_path / "d", [(3, True), (4, True)])
    demos = load_demos(tmp_path / "d", TINY, only_successful=True)
    train_sft(demos, tmp_path / "out", SFTConfig(steps=3, batch_size=4, log_every=2), TINY, progress=False)
    policy, meta = load_policy(tmp_path / "out")
    assert policy.config == TINY and meta["stage"] == "sft" and meta["num_samples"] == 7
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    assert set(records[0]) == {"step", "sft/loss", "sft/bin_accuracy", "sft/lr", "time_s"}


def test_behaviour_cloning_fits_a_constant_expert(tmp_path):
    write_dataset(tmp_path / "d", [(6, True)])  # every action is 0.0 -> bin 2
    demos = load_demos(tmp_path / "d", TINY, only_successful=True)
    torch.manual_seed(0)
    policy = train_sft(demos, tmp_path / "out", SFTConfig(steps=60, batch_size=8, lr=3e-3, label_smoothing=0.0),
                       TINY, progress=False)
    from trainer.policy import PolicyBatch

    with torch.no_grad():
        logits = policy(PolicyBatch(demos.head, demos.wrist, demos.instructions[demos.instruction_ids])).logits
    assert logits.argmax(-1).unique().tolist() == [2]


def test_sft_config_validation():
    with pytest.raises(ConfigError, match="invalid SFTConfig: device must be 'cpu' or 'cuda\\[:N\\]', got 'tpu'"):
        SFTConfig(device="tpu")
    with pytest.raises(ConfigError, match="label_smoothing must lie in \\[0, 1\\), got 1.0"):
        SFTConfig(label_smoothing=1.0)
