import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM
from world_model_fixtures import synthetic_episodes, write_recording

from engine.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from engine.layout import TokenLayout
from trainer.train_world_model import (
    WorldModelArchitecture,
    WorldModelTrainConfig,
    balanced_accuracy,
    build_parser,
    check_batches,
    class_recalls,
    prepare_tokens,
    restricted_losses,
    sample_batch,
    train,
)
from trainer.world_model_data import (
    WorldModelDataError,
    build_stream,
    collate_streams,
    enumerate_windows,
    independent_view_mask,
    load_token_cache,
    save_token_cache,
    tokenize_episode,
    window_reward_counts,
)

TOKENIZER = ImageTokenizerConfig(image_size=16, fsq_levels=(3, 4), stage_channels=(8, 8))
TINY_ARCH = WorldModelArchitecture(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("wm")
    tokenizer = ImageTokenizer.random(TOKENIZER, seed=0)
    tokenizer.save_pretrained(root / "tokenizer")
    episodes = [tokenize_episode(tokenizer, e, ("head", "wrist")) for e in synthetic_episodes(12, steps=20)]
    save_token_cache(root / "tokens.npz", episodes, list(range(12)))
    return root


def config_for(root, name, **overrides):
    base = dict(out_dir=str(root / name / "ckpt"), tokenizer_dir=str(root / "tokenizer"),
                token_caches=(str(root / "tokens.npz"),), work_dir=str(root / name / "work"),
                architecture=TINY_ARCH,
                steps=16, batch_size=4, lr=3e-3, warmup_steps=2, num_val_streams=8, log_every=4, save_every=8,
                save_dtype="float32", val_every=4)
    return WorldModelTrainConfig(**{**base, **overrides})


def test_restricted_losses_on_uniform_logits():
    layout = TokenLayout(codebook_size=12, tokens_per_view=16, chunk_size=8)
    episode = tokenize_episode(ImageTokenizer.random(TOKENIZER), synthetic_episodes(1, steps=16)[0],
                               ("head", "wrist"))
    from trainer.world_model_data import TokenizedEpisode
    episode = TokenizedEpisode(episode.instruction, episode.codes, episode.actions, np.arange(17) >= 16)
    batch = collate_streams(layout, [build_stream(layout, episode, 0, 2)])
    logits = torch.zeros(1, batch.token_ids.shape[1], layout.vocab_size)
    image_loss, reward_loss, _ = restricted_losses(logits, batch, layout, (1.0, 1.0))
    assert image_loss.item() == pytest.approx(math.log(12))
    assert reward_loss.item() == pytest.approx(math.log(2))
    # chunk 1 says no, chunk 2 says yes; push every answer to "yes": only the 'no' label costs.
    logits[..., layout.yes_id] = 5.0
    _, reward_loss, imagined_loss = restricted_losses(logits, batch, layout, (3.0, 1.0))
    cost_no, cost_yes = math.log(1 + math.exp(5)), math.log(1 + math.exp(-5))
    assert reward_loss.item() == pytest.approx((3 * cost_no + cost_yes) / 4, rel=1e-5)
    assert imagined_loss.item() == 0.0


def test_answers_on_imagined_observations_are_unweighted():
    layout = TokenLayout(codebook_size=12, tokens_per_view=16, chunk_size=8)
    episode = tokenize_episode(ImageTokenizer.random(TOKENIZER), synthetic_episodes(1, steps=16)[0], ("head", "wrist"))
    imagined_codes = (episode.codes[[8, 16]] + 1) % 12
    batch = collate_streams(layout, [build_stream(layout, episode, 0, 2),
                                     build_stream(layout, episode, 0, 2, imagined_codes=imagined_codes)])
    logits = torch.zeros(2, batch.token_ids.shape[1], layout.vocab_size)
    logits[..., layout.yes_id] = 5.0
    image_loss, reward_loss, imagined_loss = restricted_losses(logits, batch, layout, (3.0, 1.0))
    cost_no, cost_yes = math.log(1 + math.exp(5)), math.log(1 + math.exp(-5))
    assert image_loss.item() == pytest.approx(math.log(12))  # the real stream's codes only
    assert reward_loss.item() == pytest.approx((3 * cost_no + cost_yes) / 4, rel=1e-5)
    assert imagined_loss.item() == pytest.approx((cost_no + cost_yes) / 2, rel=1e-5)  # no, yes: weights ignored


def test_balanced_accuracy():
    pairs = [(True, True), (True, False), (False, False), (False, False), (False, False), (False, True)]
    assert balanced_accuracy(pairs) == pytest.approx(0.5 * (1 / 2) + 0.5 * (3 / 4))
    assert class_recalls(pairs) == {"yes_recall": 0.5, "no_recall": 0.75}
    only_no = class_recalls([(False, False), (False, True)])
    assert only_no == {"yes_recall": None, "no_recall": 0.5}
    assert balanced_accuracy([(False, False), (False, True)]) == 0.5


def test_train_writes_a_checkpoint_transformers_loads(prepared):
    summary = train(config_for(prepared, "ivd"))
    ckpt = prepared / "ivd" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["layout.json", "tokenizer", "world_model"]
    layout = TokenLayout.load(ckpt / "layout.json")
    model = LlamaForCausalLM.from_pretrained(ckpt / "world_model")
    assert model.config.vocab_size == layout.vocab_size == 12 + 256 + 256 + 11
    assert model.config.max_position_embeddings >= layout.max_stream_len
    assert (layout.tokens_per_view, layout.chunk_size, layout.max_chunks_per_branch) == (16, 8, 2)
    assert ImageTokenizer.from_pretrained(ckpt / "tokenizer").config == TOKENIZER
    records = [json.loads(line) for line in (prepared / "ivd" / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12, 16]
    assert records[-1]["loss"] < records[0]["loss"]
    assert (summary["num_train_episodes"], summary["num_val_episodes"]) == (9, 3)
    assert 0.0 <= summary["val_reward_balanced_accuracy"] <= 1.0
    # Validation holds every window with a 'yes'; the training check 8 uniform windows + at most 8 positive ones.
    episodes, _ = load_token_cache(prepared / "tokens.npz")
    val_episodes = [episodes[i] for i in (3, 7, 11)]
    val_counts = window_reward_counts(val_episodes, enumerate_windows(val_episodes, 8, 2), 8)
    assert summary["val_num_yes_labels"] == val_counts[:, 1].sum() == 34
    assert summary["train_num_yes_labels"] == 19
    assert 0.0 <= summary["train_reward_balanced_accuracy"] <= 1.0


def test_resume_reproduces_an_uninterrupted_run(prepared):
    full = train(config_for(prepared, "full", steps=8, save_every=4))
    assert train(config_for(prepared, "split", steps=8, stop_at_step=4))["steps"] == 4
    resumed = train(config_for(prepared, "split", steps=8, resume=True))
    assert resumed["steps"] == 8
    assert resumed["val_image_loss"] == pytest.approx(full["val_image_loss"], rel=1e-5)
    a = LlamaForCausalLM.from_pretrained(prepared / "full" / "ckpt" / "world_model").state_dict()
    b = LlamaForCausalLM.from_pretrained(prepared / "split" / "ckpt" / "world_model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_precision_picks_the_autocast_and_both_train_the_same_model(prepared):
    runs = {p: train(config_for(prepared, p, steps=8, precision=p)) for p in ("float32", "bfloat16")}
    assert [runs[p]["bf16_autocast"] for p in ("float32", "bfloat16")] == [False, True]
    assert runs["bfloat16"]["config"]["precision"] == "bfloat16"
    # Same seed, data and steps: bfloat16 matmuls move the losses a little, not the training.
    assert runs["bfloat16"]["val_image_loss"] != runs["float32"]["val_image_loss"]
    assert runs["bfloat16"]["val_image_loss"] == pytest.approx(runs["float32"]["val_image_loss"], rel=0.02)


def test_independent_views_hide_the_head_block_from_the_wrist(prepared):
    train(config_for(prepared, "noivd", steps=4, independent_views=True))
    model = LlamaForCausalLM.from_pretrained(prepared / "noivd" / "ckpt" / "world_model").eval()
    layout = TokenLayout.load(prepared / "noivd" / "ckpt" / "layout.json")
    episode = tokenize_episode(ImageTokenizer.random(TOKENIZER), synthetic_episodes(1, steps=8)[0], ("head", "wrist"))
    ids = torch.from_numpy(build_stream(layout, episode, 0, 1).token_ids)[None]
    head = layout.prefix_len(len(episode.instruction)) + layout.action_len + 2  # first generated head code
    changed = ids.clone()
    changed[0, head:head + 16] = (changed[0, head:head + 16] + 5) % 12
    wrist = slice(head + 16, head + 33)  # <view:wrist> and wrist codes
    with torch.no_grad():
        masked = [model(input_ids=x, attention_mask=independent_view_mask(layout, x)).logits for x in (ids, changed)]
        causal = [model(input_ids=x).logits for x in (ids, changed)]
    torch.testing.assert_close(masked[0][0, wrist], masked[1][0, wrist])
    assert not torch.allclose(causal[0][0, wrist], causal[1][0, wrist])


def test_oversampled_batches_end_with_positive_windows():
    layout = TokenLayout(codebook_size=12, tokens_per_view=16, chunk_size=8)
    episode = tokenize_episode(ImageTokenizer.random(TOKENIZER), synthetic_episodes(1, steps=16)[0], ("head", "wrist"))
    from trainer.world_model_data import Window
    windows = [Window(0, 0, 1), Window(0, 8, 1)]  # only the second ends on the successful last frame
    assert episode.success[16] and not episode.success[8]
    batch = sample_batch(layout, [episode], windows, np.random.default_rng(0), 6, np.array([1]), 0.5)
    last = (batch.token_ids == layout.special("rew")).nonzero()[:, 1] + 1
    answers = batch.token_ids[torch.arange(6), last]
    assert (answers[3:] == layout.yes_id).all()


def test_init_from_starts_at_the_given_weights_and_checks_shapes(prepared):
    source = prepared / "ivd" / "ckpt"
    if not source.exists():
        train(config_for(prepared, "ivd"))
    train(config_for(prepared, "init", steps=1, lr=1e-12, warmup_steps=0, init_from=str(source)))
    a = LlamaForCausalLM.from_pretrained(source / "world_model").state_dict()
    b = LlamaForCausalLM.from_pretrained(prepared / "init" / "ckpt" / "world_model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    wider = WorldModelArchitecture(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    with pytest.raises(ValueError, match=r"world_model: hidden_size=32 but this run has 64"):
        train(config_for(prepared, "wider", steps=1, architecture=wider, init_from=str(source)))


def test_check_batches_hold_the_uniform_sample_and_the_capped_positives():
    from trainer.world_model_data import TokenizedEpisode, Window
    layout = TokenLayout(codebook_size=12, tokens_per_view=16, chunk_size=8)
    episode = tokenize_episode(ImageTokenizer.random(TOKENIZER), synthetic_episodes(1, steps=16)[0], ("head", "wrist"))
    episode = TokenizedEpisode(episode.instruction, episode.codes, episode.actions, np.arange(17) >= 16)
    windows = [Window(0, start, 1) for start in range(9)]  # only start 8 ends on the successful last frame

    def answers(batches):  # 1 where the stream's reward answer is 'yes'
        return [int(row[-1] == layout.yes_id) for b in batches for row in b.token_ids]

    # seed 5 draws windows 6, 4, 0 (all 'no'); the positive window 8 is appended.
    batches = check_batches(layout, [episode], windows, np.array([8]), 3, np.random.default_rng(5), 2)
    assert [len(b.token_ids) for b in batches] == [2, 2]
    assert answers(batches) == [0, 0, 0, 1]
    # No uniform windows; three positives capped to two (seed 0 keeps windows 7 and 8, sorted).
    capped = check_batches(layout, [episode], windows, np.array([6, 7, 8]), 0, np.random.default_rng(0), 8,
                           max_positives=2)
    assert [len(b.token_ids) for b in capped] == [2]
    expected = [np.concatenate([layout.encode_instruction(episode.instruction),
                                layout.encode_observation(episode.codes[start])]) for start in (7, 8)]
    for row, prefix in zip(capped[0].token_ids.numpy(), expected, strict=True):
        np.testing.assert_array_equal(row[:len(prefix)], prefix)


def test_threads_option_is_a_positive_count():
    args = build_parser().parse_args(["--tokenizer", "t", "--out", "o", "--threads", "1"])
    assert args.threads == 1
    assert build_parser().parse_args(["--tokenizer", "t", "--out", "o"]).threads is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--tokenizer", "t", "--out", "o", "--threads", "0"])


def test_sources_concatenate_in_order_and_missing_caches_are_made_from_their_recording(prepared, tmp_path):
    episodes, _ = load_token_cache(prepared / "tokens.npz")
    save_token_cache(tmp_path / "first.npz", episodes[:5], list(range(5)))
    save_token_cache(tmp_path / "second.npz", episodes[5:], list(range(7)))
    tokenizer = ImageTokenizer.from_pretrained(prepared / "tokenizer")
    config = config_for(prepared, "two", token_caches=(str(tmp_path / "first.npz"), str(tmp_path / "second.npz")))
    combined = prepare_tokens(config, tokenizer, ("head", "wrist"))
    assert [e.instruction for e in combined] == [e.instruction for e in episodes]
    for got, want in zip(combined, episodes, strict=True):
        np.testing.assert_array_equal(got.codes, want.codes)

    recording = tmp_path / "recording"
    write_recording(recording, synthetic_episodes(3, steps=20))
    made = tmp_path / "made.npz"
    config = config_for(prepared, "made", data_dirs=("unused-first-source-is-cached", str(recording)),
                        token_caches=(str(tmp_path / "first.npz"), str(made)))
    combined = prepare_tokens(config, tokenizer, ("head", "wrist"))
    assert len(combined) == 5 + 3 and made.is_file()
    assert [e.num_steps for e in load_token_cache(made)[0]] == [20, 20, 20]


def test_source_lists_are_checked():
    with pytest.raises(ValueError, match="need data_dirs or token_caches"):
        WorldModelTrainConfig(out_dir="o", tokenizer_dir="t")
    with pytest.raises(ValueError, match="pair up one to one, got 2 and 1"):
        WorldModelTrainConfig(out_dir="o", tokenizer_dir="t", data_dirs=("a", "b"), token_caches=("a.npz",))


def test_a_missing_cache_without_its_recording_is_named(prepared, tmp_path):
    config = config_for(prepared, "missing", token_caches=(str(tmp_path / "absent.npz"),))
    with pytest.raises(WorldModelDataError, match=r"token cache .*absent.npz does not exist"):
        prepare_tokens(config, ImageTokenizer.from_pretrained(prepared / "tokenizer"), ("head", "wrist"))


def test_data_and_token_cache_options_take_several_paths():
    args = build_parser().parse_args(["--tokenizer", "t", "--out", "o", "--data", "a", "b",
                                      "--token-cache", "a.npz", "b.npz"])
    assert (args.data, args.token_cache) == (["a", "b"], ["a.npz", "b.npz"])


def test_imagined_codes_replace_the_observations_and_train_only_the_real_reward():
    from trainer.world_model_data import TARGET_IMAGE, TARGET_IMAGINED_REWARD, TARGET_NONE, TARGET_REWARD
    layout = TokenLayout(codebook_size=12, tokens_per_view=16, chunk_size=8)
    episode = tokenize_episode(ImageTokenizer.random(TOKENIZER), synthetic_episodes(1, steps=16)[0], ("head", "wrist"))
    real = build_stream(layout, episode, 0, 2)
    imagined_codes = (episode.codes[[8, 16]] + 1) % 12  # [2 chunks, 2 views, 16 codes], every code differs
    imagined = build_stream(layout, episode, 0, 2, imagined_codes=imagined_codes)
    assert len(imagined.token_ids) == len(real.token_ids)
    changed = np.flatnonzero(imagined.token_ids != real.token_ids)
    assert len(changed) == 2 * 2 * 16  # exactly the predicted observations' codes
    assert (real.targets[changed] == TARGET_IMAGE).all() and (imagined.targets[changed] == TARGET_NONE).all()
    assert (imagined.targets == TARGET_IMAGE).sum() == 0
    assert (imagined.targets == TARGET_REWARD).sum() == 0
    rewards = np.flatnonzero(imagined.targets == TARGET_IMAGINED_REWARD)
    np.testing.assert_array_equal(rewards, np.flatnonzero(real.targets == TARGET_REWARD))
    # the answers are the real, latched labels: no at step 8, yes at step 16
    assert imagined.token_ids[rewards].tolist() == [layout.no_id, layout.yes_id]
    with pytest.raises(WorldModelDataError, match=r"imagined codes have shape \(1, 2, 16\), the window needs "
                                                  r"\(2, 2, 16\)"):
        build_stream(layout, episode, 0, 2, imagined_codes=imagined_codes[:1])


def test_imagined_windows_are_drawn_uniformly_rolled_out_once_and_cached_for_resume(prepared):
    source = prepared / "ivd" / "ckpt"
    if not source.exists():
        train(config_for(prepared, "ivd"))
    config = config_for(prepared, "imagined", steps=4, init_from=str(source), imagined_windows=6,
                        imagined_fraction=0.5, positive_fraction=0.25)  # the positive share is for real streams
    train(config)
    cached = np.load(prepared / "imagined" / "work" / "imagined_windows.npz")
    assert cached["window_ids"].shape == (6,) and cached["codes"].shape == (6, 2, 2, 16)  # 4x4 codes per view
    episodes, _ = load_token_cache(prepared / "tokens.npz")
    train_eps = [episodes[i] for i in range(12) if i % 4 != 3]
    windows = enumerate_windows(train_eps, 8, 2)
    # drawn uniformly over the full-length windows (no positive oversampling: the answer is trained calibrated)
    full_ids = np.flatnonzero([w.num_chunks == 2 for w in windows])
    expected_ids = full_ids[np.random.default_rng(config.seed + 3).integers(0, len(full_ids), size=6)]
    np.testing.assert_array_equal(cached["window_ids"], expected_ids)
    # the imagination is the initial model's greedy rollout of each window with its real actions
    from trainer.world_model_rollout import GreedyImaginer, imagine_windows
    layout = TokenLayout.load(source / "layout.json")
    model = LlamaForCausalLM.from_pretrained(source / "world_model").eval()
    expected = imagine_windows(GreedyImaginer(model, layout, False), train_eps,
                               [windows[i] for i in cached["window_ids"]], 4)
    np.testing.assert_array_equal(cached["codes"], expected)
    # a resumed run reads the cache instead of imagining again: a planted cache (other windows, all-zero codes)
    # survives it, where imagining anew would have rewritten the file with the draw above
    cache = prepared / "imagined" / "work" / "imagined_windows.npz"
    planted_ids = full_ids[:6]
    assert not np.array_equal(planted_ids, expected_ids)
    np.savez_compressed(cache, window_ids=planted_ids, codes=np.zeros((6, 2, 2, 16), dtype=np.int16))
    train(dataclasses.replace(config, steps=6, resume=True))
    np.testing.assert_array_equal(np.load(cache)["window_ids"], planted_ids)
    assert not np.load(cache)["codes"].any()


def test_imagined_batches_end_with_reward_only_streams():
    from trainer.train_world_model import ImaginedWindows
    from trainer.world_model_data import TARGET_IMAGE, Window
    layout = TokenLayout(codebook_size=12, tokens_per_view=16, chunk_size=8)
    episode = tokenize_episode(ImageTokenizer.random(TOKENIZER), synthetic_episodes(1, steps=16)[0], ("head", "wrist"))
    imagined = ImaginedWindows(np.array([0]), ((episode.codes[[8, 16]] + 1) % 12)[None])
    batch = sample_batch(layout, [episode], [Window(0, 0, 2)], np.random.default_rng(0), 4, imagined=imagined,
                         imagined_fraction=0.5)
    assert (batch.targets == TARGET_IMAGE).sum(dim=1).tolist() == [64, 64, 0, 0]


def test_imagined_window_options_are_checked(prepared):
    with pytest.raises(ValueError, match="imagined_windows needs init_from"):
        config_for(prepared, "x", imagined_windows=4, imagined_fraction=0.5)
    with pytest.raises(ValueError, match=r"imagined_windows \(4\) and imagined_fraction \(0.0\) must both be set"):
        config_for(prepared, "x", imagined_windows=4, init_from="ckpt")
    with pytest.raises(ValueError, match=r"imagined_fraction in \[0, 1\), got 4, 1.5"):
        config_for(prepared, "x", imagined_windows=4, imagined_fraction=1.5, init_from="ckpt")
