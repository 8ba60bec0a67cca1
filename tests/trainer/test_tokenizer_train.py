import json

import pytest
import torch
from world_model_fixtures import synthetic_episodes

from engine.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from trainer.image_metrics import finite_mean, psnr_per_image, ssim_per_image
from trainer.train_tokenizer import TokenizerTrainConfig, collect_frames, reconstruction_metrics, train_tokenizer

TINY = ImageTokenizerConfig(image_size=16, fsq_levels=(4, 4, 4), stage_channels=(16, 16))


def test_psnr_and_ssim_per_image():
    real = torch.full((2, 8, 8, 3), 100, dtype=torch.uint8)
    predicted = real.clone()
    predicted[0] += 10  # uniform error of 10/255 -> PSNR = 20 log10(255 / 10)
    psnr = psnr_per_image(real, predicted)
    assert psnr[0].item() == pytest.approx(28.1308, abs=1e-3) and psnr[1].item() == float("inf")
    assert finite_mean(psnr, cap=100.0) == pytest.approx((28.1308 + 100.0) / 2, abs=1e-3)
    assert ssim_per_image(real, predicted)[1].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"expected uint8 \[B, H, W, C\] images, got torch.float32"):
        psnr_per_image(real.float(), predicted)


def test_collect_frames_stacks_every_view():
    episodes = synthetic_episodes(2, steps=5)
    frames = collect_frames(episodes)
    assert frames["head"].shape == (12, 16, 16, 3) and frames["wrist"].shape == (12, 16, 16, 3)
    assert torch.equal(frames["wrist"][6:], torch.from_numpy(episodes[1].wrist))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_training_improves_held_out_reconstruction(tmp_path, precision):
    episodes = synthetic_episodes(10, steps=12)
    config = TokenizerTrainConfig(out_dir=str(tmp_path / "tok"), data_dir="unused", work_dir=str(tmp_path / "work"),
                                  tokenizer=TINY, steps=60, batch_size=16, lr=3e-3, warmup_steps=5, val_every=5,
                                  log_every=20, save_every=30, precision=precision)
    untrained = reconstruction_metrics(ImageTokenizer.random(TINY, 0), collect_frames([episodes[4], episodes[9]]))
    summary = train_tokenizer(config, episodes)
    assert summary["bf16_autocast"] is (precision == "bfloat16")
    assert (summary["num_val_episodes"], summary["num_train_frames"]) == (2, 8 * 13 * 2)
    assert summary["val_head_psnr"] > untrained["head_psnr"] + 3
    assert summary["val_wrist_psnr"] > untrained["wrist_psnr"] + 3
    loaded = ImageTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == TINY
    records = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40, 60]
