"""Checkpoint writing/loading (errors name the file and the mismatch) and EngineConfig validation."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import TINY_MODEL, tiny_layout_with
from safetensors.torch import load_file, save_file

from engine.checkpoint import CheckpointError, load_checkpoint, write_random_checkpoint
from engine.config import EngineConfig, EngineConfigError


@pytest.fixture()
def checkpoint(tmp_path):
    return write_random_checkpoint(tmp_path / "ck", tiny_layout_with(), seed=3, **TINY_MODEL)


def test_written_checkpoint_loads_in_transformers_unchanged_and_matches_our_model(checkpoint):
    from transformers import LlamaForCausalLM

    from engine.models.llama import LlamaForCausalLM as OurLlama

    loaded = load_checkpoint(checkpoint)
    hf = LlamaForCausalLM.from_pretrained(checkpoint / "world_model").eval()
    assert hf.config.vocab_size == loaded.layout.vocab_size == 539
    assert hf.config.num_key_value_heads == 2 and hf.config.rope_parameters["rope_theta"] == 10000.0
    for name, tensor in loaded.weights.items():
        assert torch.equal(hf.state_dict()[name], tensor), name
    assert loaded.model_config.max_position_embeddings == 320  # layout max_stream_len 294 rounded up to 64
    ours = OurLlama(loaded.model_config)
    ours.load_hf_weights(loaded.weights)
    assert sum(p.numel() for p in hf.parameters()) == loaded.model_config.num_parameters + 539 * 64


def test_weights_version_is_a_content_hash(tmp_path):
    a = load_checkpoint(write_random_checkpoint(tmp_path / "a", tiny_layout_with(), seed=1, **TINY_MODEL))
    b = load_checkpoint(write_random_checkpoint(tmp_path / "b", tiny_layout_with(), seed=1, **TINY_MODEL))
    c = load_checkpoint(write_random_checkpoint(tmp_path / "c", tiny_layout_with(), seed=2, **TINY_MODEL))
    assert a.weights_version == b.weights_version != c.weights_version


def test_vocab_mismatch_names_both_files(checkpoint):
    path = checkpoint / "world_model" / "config.json"
    data = json.loads(path.read_text())
    data["vocab_size"] = 600
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"{path}: vocab_size=600 but .*layout.json needs 539"):
        load_checkpoint(checkpoint)


def test_missing_and_misshapen_tensors_are_named(checkpoint):
    path = checkpoint / "world_model" / "model.safetensors"
    weights = load_file(str(path))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(path))
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\], unexpected \[\]"):
        load_checkpoint(checkpoint)
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, str(path))
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight has shape \[3, 3\], config.json "
                                              r"implies \[128, 64\]"):
        load_checkpoint(checkpoint)


def test_missing_files_and_unsupported_configs_are_named(checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'nowhere'}: checkpoint directory not found"):
        load_checkpoint(tmp_path / "nowhere")
    config_path = checkpoint / "world_model" / "config.json"
    data = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**data, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}))
    with pytest.raises(CheckpointError, match=r"rope_type='yarn' is not supported"):
        load_checkpoint(checkpoint)
    config_path.unlink()
    with pytest.raises(CheckpointError, match=rf"{config_path}: world-model config not found"):
        load_checkpoint(checkpoint)
    (checkpoint / "layout.json").unlink()
    with pytest.raises(CheckpointError, match="layout.json: layout file not found"):
        load_checkpoint(checkpoint)


def test_tokenizer_must_match_the_layout(tmp_path):
    from engine.image_tokenizer import ImageTokenizer, ImageTokenizerConfig

    other = ImageTokenizer.random(ImageTokenizerConfig(image_size=8, fsq_levels=(4, 2), stage_channels=(32, 32)))
    with pytest.raises(CheckpointError, match="tokenizer codebook_size=8 but <layout argument> has 16"):
        write_random_checkpoint(tmp_path / "x", tiny_layout_with(), tokenizer=other, **TINY_MODEL)


def test_engine_config_validation_names_every_bad_field():
    assert EngineConfig().resolve_num_kv_blocks(8, 2, 64) == 2 * 1024**3 // (2 * 8 * 16 * 2 * 64 * 4)
    assert EngineConfig(num_kv_blocks=7).resolve_num_kv_blocks(8, 2, 64) == 7
    with pytest.raises(EngineConfigError, match=r"block_size must be a positive integer, got 0; "
                                                r"attention_backend must be one of \('auto', 'torch', 'triton'\), "
                                                r"got 'cuda'"):
        EngineConfig(block_size=0, attention_backend="cuda")
    with pytest.raises(EngineConfigError, match="device must be 'cpu' or 'cuda\\[:N\\]', got 'tpu'"):
        EngineConfig(device="tpu")
    with pytest.raises(EngineConfigError, match="dtype must be one of"):
        EngineConfig(dtype="float64")
    with pytest.raises(EngineConfigError, match="holds no block"):
        EngineConfig(kv_cache_memory_bytes=10).resolve_num_kv_blocks(8, 2, 64)
