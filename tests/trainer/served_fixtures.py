"""The tiny world-model checkpoint the trainer tests serve with a real `vla-mbpo serve` (imported by name)."""

from pathlib import Path

from engine.checkpoint import layout_for_tokenizer, write_random_checkpoint
from engine.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from trainer.config import PolicyConfig

TOKENIZER = ImageTokenizerConfig(image_size=16, fsq_levels=(4, 4), stage_channels=(32, 32))  # 16 tokens per view
# A policy for that model's 16x16 views and 2 x 4 action chunks.
TINY_POLICY = PolicyConfig(conv_channels=(4, 8), image_size=16, hidden_dim=32, image_feature_dim=16,
                           text_feature_dim=8, text_embed_dim=8, critic_hidden_dim=8, chunk_size=2, action_dim=4,
                           num_bins=5)


def write_tiny_world_model(path: Path) -> Path:
    """16x16 views (head, wrist), chunks of 2 x 4 actions in [-1, 1], a window of 3 chunks, random weights."""
    layout = layout_for_tokenizer(TOKENIZER, views=("head", "wrist"), chunk_size=2, action_dim=4,
                                  action_low=(-1.0,) * 4, action_high=(1.0,) * 4, max_chunks_per_branch=3,
                                  max_instruction_bytes=32)
    return write_random_checkpoint(path, layout, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                   intermediate_size=64, seed=0, tokenizer=ImageTokenizer.random(TOKENIZER, seed=0))
