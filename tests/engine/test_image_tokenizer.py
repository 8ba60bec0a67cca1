import json

import numpy as np
import pytest
import torch

from engine.image_tokenizer import (
    FiniteScalarQuantizer,
    ImageTokenizer,
    ImageTokenizerConfig,
    ImageTokenizerError,
)

TINY = ImageTokenizerConfig(image_size=16, fsq_levels=(3, 2, 2), stage_channels=(8, 16), res_blocks_per_stage=1)


def test_config_derived_sizes():
    default = ImageTokenizerConfig()
    assert (default.codebook_size, default.grid_size, default.tokens_per_view, default.latent_dim) == (1000, 8, 64, 4)
    assert (TINY.codebook_size, TINY.grid_size, TINY.tokens_per_view) == (12, 4, 16)
    assert TINY.to_dict()["codebook_size"] == 12 and TINY.to_dict()["model_type"] == "vla_mbpo_fsq_image_tokenizer"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"fsq_levels": (8, 1)}, r"fsq_levels must be non-empty with every level >= 2, got \[8, 1\]"),
    ({"stage_channels": (12,)}, r"stage_channels must be non-empty multiples of 8, got \[12\]"),
    ({"image_size": 60}, r"image_size=60 must be a positive multiple of 2\*\*3"),
    ({"version": 2}, r"version 2 != supported 1"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ImageTokenizerError, match=message):
        ImageTokenizerConfig(**kwargs)


def test_fsq_exact_codes():
    quantizer = FiniteScalarQuantizer((8, 5))
    z = torch.tensor([[100.0, 100.0], [-100.0, -100.0], [0.0, 0.0]])
    latents, codes = quantizer(z)
    # digit 0 has basis 1, digit 1 has basis 8; level 8 spans -4..3, level 5 spans -2..2.
    assert codes.tolist() == [7 + 8 * 4, 0, 4 + 8 * 2]
    torch.testing.assert_close(latents, torch.tensor([[0.75, 1.0], [-1.0, -1.0], [0.0, 0.0]]))


def test_fsq_covers_codebook_and_inverts():
    quantizer = FiniteScalarQuantizer((3, 2, 4))
    z = torch.randn(4096, 3, generator=torch.Generator().manual_seed(0)) * 3
    latents, codes = quantizer(z)
    assert sorted(codes.unique().tolist()) == list(range(24))
    torch.testing.assert_close(quantizer.codes_to_latents(codes), latents)


def test_fsq_passes_gradients_straight_through():
    z = torch.zeros(2, 2, requires_grad=True)
    latents, _ = FiniteScalarQuantizer((8, 5))(z)
    latents.sum().backward()
    assert (z.grad > 0).all()


def test_encode_decode_shapes_and_ranges():
    model = ImageTokenizer.random(TINY, seed=0)
    images = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    codes = model.encode(images)
    assert codes.shape == (5, 16) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 12
    decoded = model.decode(codes)
    assert decoded.shape == (5, 16, 16, 3) and decoded.dtype == torch.uint8
    # numpy in, same answer; decoding is deterministic.
    assert torch.equal(model.encode(images.numpy()), codes)
    assert torch.equal(model.decode(codes.numpy()), decoded)


def test_codes_determine_the_image_through_the_quantizer():
    model = ImageTokenizer.random(TINY, seed=0)
    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    reconstruction, grid_codes = model(images.permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert torch.equal(grid_codes.reshape(3, -1), model.encode(images))
    expected = reconstruction.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(model.decode(grid_codes.reshape(3, -1)), expected)


def test_random_is_seeded():
    a, b, c = ImageTokenizer.random(TINY, 3), ImageTokenizer.random(TINY, 3), ImageTokenizer.random(TINY, 4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.decoder[0].weight, c.decoder[0].weight)


@pytest.mark.parametrize(("images", "message"), [
    (torch.zeros(2, 16, 16, 3, dtype=torch.float32), r"images must be uint8, got torch.float32"),
    (torch.zeros(2, 16, 8, 3, dtype=torch.uint8), r"images must have shape \[B, 16, 16, 3\], got \[2, 16, 8, 3\]"),
    (torch.zeros(16, 16, 3, dtype=torch.uint8), r"got \[16, 16, 3\]"),
])
def test_encode_rejects_bad_images(images, message):
    with pytest.raises(ImageTokenizerError, match=message):
        ImageTokenizer.random(TINY).encode(images)


@pytest.mark.parametrize(("codes", "message"), [
    (torch.zeros(2, 15, dtype=torch.int64), r"codes must be integer \[B, 16\], got torch.int64 \[2, 15\]"),
    (torch.zeros(2, 16, dtype=torch.float32), r"got torch.float32 \[2, 16\]"),
    (torch.full((1, 16), 12), r"codes must lie in \[0, 12\), got \[12, 12\]"),
    (torch.full((1, 16), -1), r"codes must lie in \[0, 12\), got \[-1, -1\]"),
])
def test_decode_rejects_bad_codes(codes, message):
    with pytest.raises(ImageTokenizerError, match=message):
        ImageTokenizer.random(TINY).decode(codes)


def test_save_and_load_roundtrip(tmp_path):
    model = ImageTokenizer.random(TINY, seed=5)
    model.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    loaded = ImageTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == TINY
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded.encode(images), model.encode(images))
    assert torch.equal(loaded.decode(model.encode(images)), model.decode(model.encode(images)))


def test_half_precision_storage_loads_as_float32(tmp_path):
    model = ImageTokenizer.random(TINY, seed=5)
    model.save_pretrained(tmp_path / "tok", dtype=torch.float16)
    loaded = ImageTokenizer.from_pretrained(tmp_path / "tok")
    weight = loaded.decoder[0].weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, model.decoder[0].weight.half().float())


def test_load_errors_name_the_file_and_the_mismatch(tmp_path):
    directory = tmp_path / "tok"
    with pytest.raises(ImageTokenizerError, match=r"tok/config.json: tokenizer config not found"):
        ImageTokenizer.from_pretrained(directory)
    ImageTokenizer.random(TINY).save_pretrained(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    good_config = json.loads(config_path.read_text())

    config_path.write_text("{not json")
    with pytest.raises(ImageTokenizerError, match=r"tok/config.json: not readable JSON"):
        ImageTokenizer.from_pretrained(directory)

    config_path.write_text(json.dumps({**good_config, "tokens_per_view": 64}))
    with pytest.raises(ImageTokenizerError, match=r"tok/config.json: tokens_per_view=64 does not match the derived 16"):
        ImageTokenizer.from_pretrained(directory)

    config_path.write_text(json.dumps({**good_config, "model_type": "vqgan"}))
    with pytest.raises(ImageTokenizerError, match=r"tok/config.json: model_type='vqgan', expected"):
        ImageTokenizer.from_pretrained(directory)

    config_path.write_text(json.dumps({**good_config, "hidden": 3}))
    with pytest.raises(ImageTokenizerError, match=r"tok/config.json: .*unexpected keyword argument 'hidden'"):
        ImageTokenizer.from_pretrained(directory)

    wider = {**good_config, "stage_channels": [8, 24]}
    config_path.write_text(json.dumps(wider))
    with pytest.raises(ImageTokenizerError, match=r"tok/model.safetensors: tensor encoder\.\d+\.\S+ has shape"):
        ImageTokenizer.from_pretrained(directory)

    config_path.write_text(json.dumps({**good_config, "res_blocks_per_stage": 0}))
    with pytest.raises(ImageTokenizerError, match=r"tok/model.safetensors: weights do not match config.json: "
                                                   r"missing \[.*\], unexpected \['decoder"):
        ImageTokenizer.from_pretrained(directory)

    config_path.write_text(json.dumps(good_config))
    weights_path.write_bytes(weights_path.read_bytes()[:100])
    with pytest.raises(ImageTokenizerError, match=r"tok/model.safetensors: not a readable safetensors file"):
        ImageTokenizer.from_pretrained(directory)

    weights_path.unlink()
    with pytest.raises(ImageTokenizerError, match=r"tok/model.safetensors: tokenizer weights not found"):
        ImageTokenizer.from_pretrained(directory)


def test_a_few_steps_of_training_reduce_reconstruction_error():
    model = ImageTokenizer.random(TINY, seed=0)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    pixels = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        reconstruction, _ = model(pixels)
        loss = torch.nn.functional.mse_loss(reconstruction, pixels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
