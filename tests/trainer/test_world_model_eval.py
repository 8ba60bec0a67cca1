import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM
from world_model_fixtures import synthetic_episodes

from engine.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from engine.layout import TokenLayout
from trainer.eval_world_model import (
    EvalConfig,
    build_parser,
    evaluate,
    select_windows,
    window_arrays,
)
from trainer.train_world_model import WorldModelArchitecture, WorldModelTrainConfig, train
from trainer.world_model_data import WorldModelDataError, independent_view_mask, save_token_cache, tokenize_episode
from trainer.world_model_rollout import GreedyImaginer

TOKENIZER = ImageTokenizerConfig(image_size=16, fsq_levels=(3, 4), stage_channels=(8, 8, 8))  # 2x2 codes per view
TINY_ARCH = WorldModelArchitecture(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


def recorded_episodes():
    episodes = synthetic_episodes(10, steps=18)
    # two instruction lengths, so batched rollouts need left padding
    return [dataclasses.replace(e, instruction="push it" if i % 2 else e.instruction) for i, e in enumerate(episodes)]


@pytest.fixture(scope="module", params=[False, True], ids=["ivd", "independent"])
def checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tokenizer = ImageTokenizer.random(TOKENIZER, seed=0)
    tokenizer.save_pretrained(root / "tokenizer")
    recorded = recorded_episodes()
    save_token_cache(root / "tokens.npz", [tokenize_episode(tokenizer, e, ("head", "wrist")) for e in recorded],
                     list(range(len(recorded))))
    train(WorldModelTrainConfig(out_dir=str(root / "ckpt"), tokenizer_dir=str(root / "tokenizer"),
                                token_caches=(str(root / "tokens.npz"),), work_dir=str(root / "work"),
                                architecture=TINY_ARCH, steps=6, batch_size=4, warmup_steps=1, num_val_streams=4,
                                val_every=5, independent_views=request.param, save_dtype="float32"))
    return root / "ckpt", request.param


def naive_greedy(model, layout, prefix, actions, independent, given_head=None):
    """Reference decoding: full recompute per sampled token, one stream at a time, no cache, no padding.
    given_head [n, N]: each chunk's head block takes these codes instead of the argmax."""
    forced, low, high = layout.generation_plan()
    head = slice(2, 2 + layout.tokens_per_view)  # generated positions of the head codes (after <obs> <view:head>)
    tokens = list(prefix)
    for index, chunk in enumerate(actions):
        tokens += layout.encode_actions(chunk).tolist()
        for position in range(len(forced)):
            if forced[position] >= 0:
                tokens.append(int(forced[position]))
                continue
            if given_head is not None and head.start <= position < head.stop:
                tokens.append(int(given_head[index, position - head.start]) + layout.image_offset)
                continue
            ids = torch.tensor([tokens])
            mask = independent_view_mask(layout, ids) if independent else None
            logits = model(input_ids=ids, attention_mask=mask).logits[0, -1]
            tokens.append(int(logits[low[position]:high[position]].argmax()) + int(low[position]))
    return tokens[len(prefix):]


def split_chunks(layout, generated):
    """Reference tokens of n chunks -> [(codes [V, N], success)] per chunk."""
    chunks = np.asarray(generated).reshape(-1, layout.chunk_len)[:, layout.action_len:]
    return [layout.split_generated(chunk) for chunk in chunks]


def test_batched_cached_rollout_matches_naive_greedy(checkpoint):
    ckpt, independent = checkpoint
    layout = TokenLayout.load(ckpt / "layout.json")
    model = LlamaForCausalLM.from_pretrained(ckpt / "world_model").eval()
    tokenizer = ImageTokenizer.from_pretrained(ckpt / "tokenizer")
    episodes = [tokenize_episode(tokenizer, e, ("head", "wrist")) for e in recorded_episodes()[:2]]
    prefixes = [np.concatenate([layout.encode_instruction(e.instruction), layout.encode_observation(e.codes[t])])
                for e, t in ((episodes[0], 1), (episodes[1], 2))]
    assert len(prefixes[0]) != len(prefixes[1])
    actions = np.stack([episodes[0].actions[1:17].reshape(2, 8, 4), episodes[1].actions[2:18].reshape(2, 8, 4)])
    with torch.no_grad():
        result = GreedyImaginer(model, layout, independent).rollout(prefixes, actions)
        for row in range(2):
            expected = split_chunks(layout, naive_greedy(model, layout, prefixes[row], actions[row], independent))
            for chunk, (codes, success) in enumerate(expected):
                assert np.array_equal(result.codes[row, chunk], codes)
                assert result.success[row, chunk] == success


def test_a_given_head_block_replaces_the_argmax_and_conditions_what_follows(checkpoint):
    ckpt, independent = checkpoint
    layout = TokenLayout.load(ckpt / "layout.json")
    model = LlamaForCausalLM.from_pretrained(ckpt / "world_model").eval()
    episode = tokenize_episode(ImageTokenizer.from_pretrained(ckpt / "tokenizer"), recorded_episodes()[0],
                               ("head", "wrist"))
    prefix = np.concatenate([layout.encode_instruction(episode.instruction),
                             layout.encode_observation(episode.codes[1])])
    actions = episode.actions[1:17].reshape(1, 2, 8, 4)
    given = episode.codes[[9, 17], 0][None]  # [1, n, N]: the real head frames after each chunk
    imaginer = GreedyImaginer(model, layout, independent)
    with torch.no_grad():
        free = imaginer.rollout([prefix], actions)
        forced = imaginer.rollout([prefix], actions, given_view=0, given_codes=given)
        expected = split_chunks(layout, naive_greedy(model, layout, prefix, actions[0], independent, given[0]))
    assert np.array_equal(forced.codes[0, :, 0], given[0])
    assert all(np.array_equal(forced.codes[0, c], expected[c][0]) for c in range(2))
    if independent:  # chunk 1's wrist block never sees its head block
        assert np.array_equal(forced.codes[0, 0, 1], free.codes[0, 0, 1])
    with pytest.raises(WorldModelDataError, match="given_view and given_codes go together"):
        imaginer.rollout([prefix], actions, given_view=0)


def test_windows_include_every_successful_ending():
    layout = TokenLayout(codebook_size=12, tokens_per_view=4)
    episodes = [tokenize_episode(ImageTokenizer.random(TOKENIZER), e, layout.views) for e in recorded_episodes()[:3]]
    windows = select_windows(episodes, chunk_size=8, num_chunks=2, count=4, seed=0)
    assert len(windows[:4]) == 4 and all(t + 8 <= 18 for _, t in windows)
    # episodes 0 and 1 succeed (every third fails): their windows ending on the last frame are added.
    assert {(0, 10), (0, 2), (1, 10), (1, 2)} <= set(windows)
    frames = np.arange(19)[:, None, None, None, None] * np.ones((19, 2, 1, 1, 1), dtype=np.int64)
    actions, real, labels, valid = window_arrays(episodes[0], frames, 10, 8, 2)
    assert valid.tolist() == [True, False] and labels.tolist() == [True, False]
    assert real[:, 0, 0, 0, 0].tolist() == [10, 18, 18]
    assert (actions[1] == 0).all() and np.array_equal(actions[0], episodes[0].actions[10:18])


def test_evaluate_writes_report_and_grid(checkpoint, tmp_path):
    ckpt, independent = checkpoint
    config = EvalConfig(checkpoint=str(ckpt), data_dir="unused", json_out=str(tmp_path / "out.json"),
                        grid_png=str(tmp_path / "grid.png"), num_windows=4, batch_size=4, val_every=5)
    report = evaluate(config, recorded_episodes())
    assert json.loads((tmp_path / "out.json").read_text()) == report
    assert report["decoding"] == "greedy" and report["independent_views"] is independent
    assert report["num_val_episodes"] == 2
    # episode 4 succeeds (windows ending on its last frame are added), episode 9 fails.
    assert report["chunk1_num_yes_labels"] >= 1 and report["chunk2_num_yes_labels"] >= 1
    for scored in ("chunk1", "chunk2", "teacher_forced"):  # the mean of the recalls of the classes present
        recalls = [report[f"{scored}_reward_{name}_recall"] for name in ("yes", "no")]
        present = [r for r in recalls if r is not None]
        assert recalls[0] is not None and report[f"{scored}_reward_balanced_accuracy"] == pytest.approx(
            sum(present) / len(present))
    for key in ("chunk1_head", "chunk1_wrist", "chunk2_head", "chunk2_wrist"):
        assert set(report[key]) == {"psnr", "ssim", "tokenizer_ceiling", "copy_start_floor"}
        assert 0 < report[key]["psnr"] <= 100 and -1 <= report[key]["ssim"] <= 1
    assert "chunk1_wrist_given_real_head" not in report
    grid = __import__("matplotlib.image").image.imread(tmp_path / "grid.png")
    # 3 examples x 4 rows of 16 px + 2 rules of 2 px, x 3 columns, scaled 2x
    assert grid.shape[:2] == ((3 * 4 * 16 + 2 * 2) * 2, 3 * 16 * 2)


def test_real_head_scores_the_wrist_decoded_after_the_real_head_frame(checkpoint, tmp_path):
    ckpt, independent = checkpoint
    config = EvalConfig(checkpoint=str(ckpt), data_dir="unused", num_windows=4, batch_size=3, val_every=5,
                        real_head=True)
    report = evaluate(config, recorded_episodes())
    for chunk in ("chunk1", "chunk2"):
        assert set(report[f"{chunk}_wrist_given_real_head"]) == {"psnr", "ssim"}
    if independent:  # chunk 1's wrist cannot see the head block, real or imagined
        assert report["chunk1_wrist_given_real_head"] == {k: report["chunk1_wrist"][k] for k in ("psnr", "ssim")}
    assert build_parser().parse_args(["--checkpoint", "c", "--data", "d", "--real-head"]).real_head


def test_threads_option_is_a_positive_count():
    required = ["--checkpoint", "c", "--data", "d"]
    assert build_parser().parse_args([*required, "--threads", "1"]).threads == 1
    assert build_parser().parse_args(required).threads is None
    with pytest.raises(SystemExit):
        build_parser().parse_args([*required, "--threads", "-2"])
