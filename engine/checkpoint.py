"""Reading (and, for tests and benchmarks, writing) a world-model checkpoint directory (DESIGN.md):

    <checkpoint>/layout.json                token layout
    <checkpoint>/world_model/config.json    Hugging Face Llama config
    <checkpoint>/world_model/model.safetensors  transformers tensor names
    <checkpoint>/tokenizer/                 image tokenizer (config.json + model.safetensors)

Every inconsistency raises CheckpointError naming the file and the mismatch. Writing needs only torch,
safetensors and json: transformers is not imported here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .image_tokenizer import ImageTokenizer, ImageTokenizerConfig, ImageTokenizerError
from .layout import LayoutError, TokenLayout
from .models.llama import LlamaConfig
from .types import EngineError

LAYOUT_FILE = "layout.json"
WORLD_MODEL_DIR = "world_model"
TOKENIZER_DIR = "tokenizer"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(EngineError, ValueError):
    """A checkpoint file is missing, unreadable or inconsistent; the message names the file."""


@dataclass
class Checkpoint:
    """Everything the engine needs from a checkpoint directory, validated."""

    path: Path
    layout: TokenLayout
    model_config: LlamaConfig
    weights: dict[str, torch.Tensor]  # transformers names -> float32 CPU tensors
    tokenizer: ImageTokenizer
    weights_version: str  # content hash of the world model: part of every prefix-cache key

    @property
    def model_name(self) -> str:
        return self.path.name


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Loads and cross-checks layout, world model and tokenizer. Raises CheckpointError naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    try:
        layout = TokenLayout.load(path / LAYOUT_FILE)
    except LayoutError as exc:
        raise CheckpointError(str(exc)) from None
    config_path = path / WORLD_MODEL_DIR / CONFIG_FILE
    model_config = _read_model_config(config_path)
    if model_config.vocab_size != layout.vocab_size:
        raise CheckpointError(f"{config_path}: vocab_size={model_config.vocab_size} but {path / LAYOUT_FILE} "
                              f"needs {layout.vocab_size}")
    weights_path = path / WORLD_MODEL_DIR / WEIGHTS_FILE
    weights, weights_version = _read_weights(weights_path, model_config)
    tokenizer_dir = path / TOKENIZER_DIR
    try:
        tokenizer = ImageTokenizer.from_pretrained(tokenizer_dir)
    except ImageTokenizerError as exc:
        raise CheckpointError(str(exc)) from None
    _check_tokenizer_matches(tokenizer.config, layout, tokenizer_dir / CONFIG_FILE, path / LAYOUT_FILE)
    return Checkpoint(path, layout, model_config, weights, tokenizer, weights_version)


def _read_model_config(config_path: Path) -> LlamaConfig:
    try:
        data = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{config_path}: world-model config not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, got {type(data).__name__}")
    try:
        return LlamaConfig.from_hf_dict(data, str(config_path))
    except (ValueError, TypeError) as exc:
        message = str(exc)
        raise CheckpointError(message if message.startswith(str(config_path)) else f"{config_path}: {message}") \
            from None


def _read_weights(weights_path: Path, config: LlamaConfig) -> tuple[dict[str, torch.Tensor], str]:
    try:
        raw = weights_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{weights_path}: world-model weights not found") from None
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    expected = config.weight_shapes()
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # transformers may save the tied copy; it is the embedding
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights_path}: tensors do not match config.json: missing {missing[:4]}"
                              f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                              f"{'...' if len(unexpected) > 4 else ''}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"{weights_path}: {name} has shape {list(weights[name].shape)}, config.json "
                                  f"implies {list(shape)}")
        if not weights[name].is_floating_point():
            raise CheckpointError(f"{weights_path}: {name} has dtype {weights[name].dtype}, expected a float")
    weights = {name: tensor.float() for name, tensor in weights.items()}
    return weights, xxhash.xxh3_64_hexdigest(raw)


def _check_tokenizer_matches(config: ImageTokenizerConfig, layout: TokenLayout, tokenizer_path: Path,
                             layout_path: Path) -> None:
    pairs = (("codebook_size", config.codebook_size, layout.codebook_size),
             ("tokens_per_view", config.tokens_per_view, layout.tokens_per_view),
             ("image_height", config.image_size, layout.image_height),
             ("image_width", config.image_size, layout.image_width))
    for name, found, wanted in pairs:
        if found != wanted:
            raise CheckpointError(f"{tokenizer_path}: tokenizer {name}={found} but {layout_path} has {wanted}")


def layout_for_tokenizer(config: ImageTokenizerConfig, **layout_fields) -> TokenLayout:
    """A TokenLayout whose image fields (codebook, tokens per view, image size) match `config`."""
    return TokenLayout(codebook_size=config.codebook_size, tokens_per_view=config.tokens_per_view,
                       image_height=config.image_size, image_width=config.image_size, **layout_fields)


def write_random_checkpoint(
    path: str | Path,
    layout: TokenLayout,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    seed: int = 0,
    tokenizer: ImageTokenizer | None = None,
    max_position_embeddings: int | None = None,
    rope_theta: float = 10000.0,
    init_std: float = 0.02,
    tie_word_embeddings: bool = False,
) -> Path:
    """Writes a randomly initialised but complete, loadable checkpoint (for tests and benchmarks).

    The world model's weights depend only on (shapes, seed). `tokenizer` defaults to a random
    ImageTokenizer whose config matches the layout's image fields (an error says what to pass if
    no default config matches). max_position_embeddings defaults to the layout's max_stream_len
    rounded up to a multiple of 64.
    """
    path = Path(path)
    if tokenizer is None:
        tokenizer = ImageTokenizer.random(_default_tokenizer_config(layout), seed=seed)
    _check_tokenizer_matches(tokenizer.config, layout, Path("<tokenizer argument>"), Path("<layout argument>"))
    max_positions = max_position_embeddings or 64 * math.ceil(layout.max_stream_len / 64)
    config = LlamaConfig(vocab_size=layout.vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=max_positions, rope_theta=rope_theta,
                         tie_word_embeddings=tie_word_embeddings)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in config.weight_shapes().items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            weights[name] = torch.ones(shape)
        else:
            weights[name] = torch.randn(shape, generator=generator) * init_std
    (path / WORLD_MODEL_DIR).mkdir(parents=True, exist_ok=True)
    layout.save(path / LAYOUT_FILE)
    (path / WORLD_MODEL_DIR / CONFIG_FILE).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    save_file(weights, str(path / WORLD_MODEL_DIR / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save_pretrained(path / TOKENIZER_DIR)
    return path


def _default_tokenizer_config(layout: TokenLayout) -> ImageTokenizerConfig:
    """The tokenizer config for a layout built with layout_for_tokenizer from a standard config."""
    candidates = [ImageTokenizerConfig(), ImageTokenizerConfig(image_size=8, fsq_levels=(4, 4),
                                                               stage_channels=(32, 32))]
    for config in candidates:
        if (config.codebook_size, config.tokens_per_view, config.image_size, config.image_size) == (
                layout.codebook_size, layout.tokens_per_view, layout.image_height, layout.image_width):
            return config
    raise CheckpointError(f"no default image tokenizer matches the layout (codebook_size={layout.codebook_size}, "
                          f"tokens_per_view={layout.tokens_per_view}, image {layout.image_height}x"
                          f"{layout.image_width}); pass tokenizer=ImageTokenizer.random(config) built for it")
