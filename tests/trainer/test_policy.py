"""The small VLA: exact chunk log-probs, binning, shapes, stop-gradient critic, checkpoint round trip."""

import numpy as np
import pytest
import torch

from trainer.config import ConfigError, PolicyConfig
from trainer.policy import (
    ImageEncoder,
    PolicyInputError,
    SpatialSoftmax,
    VlaPolicy,
    actions_to_bins,
    bins_to_actions,
    chunk_entropy,
    chunk_log_prob,
    encode_instructions,
    load_policy,
    make_batch,
    sample_bins,
    sample_bins_per_row,
    save_policy,
)

TINY = PolicyConfig(conv_channels=(4, 8), image_size=16, hidden_dim=32, image_feature_dim=16, text_feature_dim=8,
                    text_embed_dim=8, critic_hidden_dim=8, chunk_size=2, action_dim=4, num_bins=5)


def tiny_batch(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    head = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    wrist = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    return make_batch(head, wrist, ["lift the red cube", "push the cube"][:1] * n, TINY)


def test_encode_instructions_shifts_bytes_and_pads():
    out = encode_instructions(["ab", "é"], max_bytes=4)
    assert out.tolist() == [[98, 99, 0, 0], [0xC3 + 1, 0xA9 + 1, 0, 0]]
    with pytest.raises(PolicyInputError, match="instruction 0 has 5 UTF-8 bytes > max_instruction_bytes=4"):
        encode_instructions(["hello"], max_bytes=4)
    with pytest.raises(PolicyInputError, match="instruction 1 is empty"):
        encode_instructions(["a", ""], max_bytes=4)


def test_action_binning_round_trip_and_clipping():
    actions = torch.tensor([[[-1.0, -0.5, 0.0, 0.5], [1.0, 2.0, -3.0, 0.26]]])  # [1, 2, 4]
    bins = actions_to_bins(actions, num_bins=5)
    assert bins.tolist() == [[0, 1, 2, 3, 4, 4, 0, 3]]
    assert bins_to_actions(bins, TINY).tolist() == [[[-1.0, -0.5, 0.0, 0.5], [1.0, 1.0, -1.0, 0.5]]]


def test_chunk_log_prob_is_exact_sum_of_log_softmax():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])  # [1, D=2, nb=2]
    bins = torch.tensor([[1, 0]])
    expected = np.log(0.5) + np.log(np.exp(2) / (np.exp(2) + 1))
    assert float(chunk_log_prob(logits, bins)) == pytest.approx(expected, abs=1e-6)
    assert float(chunk_entropy(torch.zeros((1, 3, 4)))) == pytest.approx(3 * np.log(4), abs=1e-6)


def test_sample_bins_follows_a_peaked_distribution():
    logits = torch.full((3, 5, 4), -1e4)
    logits[..., 2] = 0.0
    assert sample_bins(logits, torch.Generator().manual_seed(0)).tolist() == [[2] * 5] * 3


def test_per_row_sampling_is_exact_inverse_cdf_and_ignores_the_other_rows():
    logits = torch.log(torch.tensor([[[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]]]))  # [1, D=2, nb=3]
    # torch.rand(2) with seed 0 is [0.4963, 0.7682]: u0 < 0.5 -> bin 0 (bin 1 has no mass), u1 >= 0.5 -> bin 2
    assert sample_bins_per_row(logits, [torch.Generator().manual_seed(0)]).tolist() == [[0, 2]]
    wide = torch.randn((5, 6, 9), generator=torch.Generator().manual_seed(3))
    together = sample_bins_per_row(wide, [torch.Generator().manual_seed(10 + b) for b in range(5)], temperature=0.5)
    alone = [sample_bins_per_row(wide[b:b + 1], [torch.Generator().manual_seed(10 + b)], temperature=0.5)
             for b in (4, 1)]
    assert torch.equal(torch.cat(alone), together[[4, 1]])
    with pytest.raises(ValueError, match="one generator per batch row: got 1 for 5 rows"):
        sample_bins_per_row(wide, [torch.Generator()])


def test_per_row_sampling_follows_the_tempered_distribution():
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3])).expand(4000, 1, 3)
    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(b) for b in range(4000)]

    counts = torch.bincount(sample_bins_per_row(logits, generators()).reshape(-1), minlength=3).tolist()
    assert counts == [410, 2385, 1205]  # expected 400 / 2400 / 1200 (one std ~ 19 / 31 / 29)
    tempered = torch.bincount(sample_bins_per_row(logits, generators(), temperature=0.5).reshape(-1), minlength=3)
    assert tempered.tolist() == [88, 3142, 770]  # p^2 renormalised: expected 87 / 3130 / 783


def test_forward_shapes_and_act_log_probs_match_forward():
    torch.manual_seed(0)
    policy = VlaPolicy(TINY).eval()
    batch = tiny_batch(6)
    out = policy(batch)
    assert out.logits.shape == (6, 8, 5) and out.values.shape == (6,)
    actions, bins, log_probs, values = policy.act(batch, torch.Generator().manual_seed(1))
    assert actions.shape == (6, 2, 4) and bins.shape == (6, 8) and bins.dtype == torch.int64
    assert torch.equal(actions, bins_to_actions(bins, TINY))
    assert torch.allclose(log_probs, chunk_log_prob(out.logits, bins)) and torch.allclose(values, out.values)
    greedy_actions, greedy_bins, _, _ = policy.act(batch, greedy=True)
    assert torch.equal(greedy_bins, out.logits.argmax(-1))


def test_instruction_changes_the_action_distribution():
    torch.manual_seed(0)
    policy = VlaPolicy(TINY).eval()
    rng = np.random.default_rng(0)
    head = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    head[1] = head[0]
    batch = make_batch(head, head.copy(), ["lift the cube", "push the cube"], TINY)
    logits = policy(batch).logits
    assert not torch.allclose(logits[0], logits[1])


def test_spatial_softmax_returns_the_coordinates_of_a_peak():
    keypoints = SpatialSoftmax(height=3, width=5)
    maps = torch.full((2, 2, 3, 5), -1e4)
    maps[0, 0, 0, 0] = 0.0  # top-left corner
    maps[0, 1, 2, 4] = 0.0  # bottom-right corner
    maps[1, 0, 1, 2] = 0.0  # centre
    maps[1, 1] = 0.0  # flat: the mean of the grid
    out = keypoints(maps)
    assert out.shape == (2, 4)
    assert torch.allclose(out, torch.tensor([[-1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]), atol=1e-6)


def test_fresh_film_encoder_ignores_the_instruction_until_trained():
    torch.manual_seed(0)
    encoder = ImageEncoder(TINY)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    text_a, text_b = torch.zeros((3, TINY.text_feature_dim)), torch.randn((3, TINY.text_feature_dim))
    assert torch.equal(encoder(images, text_a), encoder(images, text_b))  # zero-initialised FiLM = identity
    torch.nn.init.normal_(encoder.films[1].weight)  # as training moves it
    assert not torch.allclose(encoder(images, text_a), encoder(images, text_b))


def test_critic_gradient_stops_at_the_backbone():
    policy = VlaPolicy(TINY)
    policy(tiny_batch(4)).values.sum().backward()
    assert all(p.grad is None for p in policy.actor_parameters())
    assert all(p.grad is not None for p in policy.critic_parameters())
    names = {n for n, _ in policy.named_parameters()}
    assert len(policy.actor_parameters()) + len(policy.critic_parameters()) == len(names)


def test_make_batch_rejects_bad_images():
    good = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    expected = r"wrist images must be uint8 \[B, 16, 16, 3\], got float32 \[2, 16, 16, 3\]"
    with pytest.raises(PolicyInputError, match=expected):
        make_batch(good, good.astype(np.float32), ["a", "b"], TINY)
    with pytest.raises(PolicyInputError, match="batch sizes differ: head 2, wrist 2, instructions 1"):
        make_batch(good, good, ["a"], TINY)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    policy = VlaPolicy(TINY).eval()
    save_policy(policy, tmp_path / "ckpt", {"stage": "sft", "step": 3})
    loaded, meta = load_policy(tmp_path / "ckpt")
    assert meta == {"stage": "sft", "step": 3} and loaded.config == TINY
    batch = tiny_batch(3)
    assert torch.equal(loaded(batch).logits, policy(batch).logits)
    with pytest.raises(FileNotFoundError, match="is not a policy checkpoint: needs policy_config.json"):
        load_policy(tmp_path / "missing")


def test_policy_config_validation():
    with pytest.raises(ConfigError, match="image_size 62 must be divisible by 2\\*\\*len\\(conv_channels\\)=4"):
        PolicyConfig(image_size=62)
    with pytest.raises(ConfigError, match="num_bins must be >= 2, got 1"):
        PolicyConfig(num_bins=1)
    with pytest.raises(ConfigError, match="refine_convs must be >= 0, got -1; num_keypoints must be >= 1, got 0"):
        PolicyConfig(num_keypoints=0, refine_convs=-1)


def test_act_log_probs_are_of_the_tempered_distribution():
    torch.manual_seed(0)
    policy = VlaPolicy(TINY).eval()
    batch = tiny_batch(4)
    _, bins, log_probs, _ = policy.act(batch, torch.Generator().manual_seed(0), temperature=0.5)
    logits = policy(batch).logits
    assert torch.allclose(log_probs, chunk_log_prob(logits / 0.5, bins))
    assert not torch.allclose(log_probs, chunk_log_prob(logits, bins))
