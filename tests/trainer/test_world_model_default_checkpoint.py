"""The shipped default checkpoint (checkpoints/default): loads unchanged in transformers, fits the size budget."""

from pathlib import Path

from safetensors import safe_open
from transformers import LlamaForCausalLM

from engine.image_tokenizer import ImageTokenizer
from engine.layout import TokenLayout

ROOT = Path(__file__).resolve().parents[2] / "checkpoints"
DEFAULT = ROOT / "default"


def test_default_world_model_loads_in_transformers_unchanged():
    layout = TokenLayout.load(DEFAULT / "layout.json")
    model = LlamaForCausalLM.from_pretrained(DEFAULT / "world_model")
    assert model.config.vocab_size == layout.vocab_size == 1523
    assert model.config.max_position_embeddings >= layout.max_stream_len
    assert sum(p.numel() for p in model.parameters()) == 5_206_784
    tokenizer = ImageTokenizer.from_pretrained(DEFAULT / "tokenizer")
    assert (tokenizer.config.codebook_size, tokenizer.config.tokens_per_view) == (1000, 64)


def test_default_weights_are_stored_in_bfloat16_within_the_size_budget():
    with safe_open(str(DEFAULT / "world_model" / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    total = sum(path.stat().st_size for path in ROOT.rglob("*") if path.is_file())
    assert total <= 20 * 1024 * 1024
