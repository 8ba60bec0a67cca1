"""The discrete image tokenizer: 64x64 RGB <-> a grid of codes (FSQ autoencoder), shared by training and serving.

A convolutional encoder maps an image to a `grid x grid` map of `len(fsq_levels)`-dim latents; finite scalar
quantisation (FSQ, Mentzer et al. 2023) rounds each latent dimension to one of `levels[i]` values, so a grid
cell is one integer code in [0, prod(levels)). No codebook to collapse, no commitment loss: the only training
signal is reconstruction. The decoder maps the code grid back to pixels.

Torch-only and self-contained (FSQ is implemented here, ~30 lines), so the serving engine needs no extra
package. A checkpoint directory holds `config.json` and `model.safetensors`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

TOKENIZER_VERSION = 1
MODEL_TYPE = "vla_mbpo_fsq_image_tokenizer"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GROUP_NORM_GROUPS = 8


class ImageTokenizerError(ValueError):
    """Bad input to the tokenizer, or a checkpoint that is missing, corrupt or does not match its config."""


@dataclass(frozen=True)
class ImageTokenizerConfig:
    """Shape of one tokenizer. `codebook_size` and `tokens_per_view` are derived, never stored twice."""

    image_size: int = 64
    channels: int = 3
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    # One entry per resolution stage; every stage halves the resolution: grid = image_size / 2**len.
    stage_channels: tuple[int, ...] = (64, 128, 128)
    res_blocks_per_stage: int = 1
    version: int = TOKENIZER_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "fsq_levels", tuple(int(x) for x in self.fsq_levels))
        object.__setattr__(self, "stage_channels", tuple(int(x) for x in self.stage_channels))
        problems = []
        if self.version != TOKENIZER_VERSION:
            problems.append(f"version {self.version} != supported {TOKENIZER_VERSION}")
        if self.channels <= 0 or self.res_blocks_per_stage < 0:
            problems.append(f"channels must be > 0 and res_blocks_per_stage >= 0, got {self.channels}, "
                            f"{self.res_blocks_per_stage}")
        if not self.fsq_levels or any(level < 2 for level in self.fsq_levels):
            problems.append(f"fsq_levels must be non-empty with every level >= 2, got {list(self.fsq_levels)}")
        if not self.stage_channels or any(c <= 0 or c % GROUP_NORM_GROUPS for c in self.stage_channels):
            problems.append(f"stage_channels must be non-empty multiples of {GROUP_NORM_GROUPS}, got "
                            f"{list(self.stage_channels)}")
        elif self.image_size <= 0 or self.image_size % (2 ** len(self.stage_channels)):
            problems.append(f"image_size={self.image_size} must be a positive multiple of "
                            f"2**{len(self.stage_channels)} (one halving per stage)")
        if problems:
            raise ImageTokenizerError("invalid image tokenizer config: " + "; ".join(problems))

    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels)

    @property
    def grid_size(self) -> int:
        return self.image_size // 2 ** len(self.stage_channels)

    @property
    def tokens_per_view(self) -> int:
        return self.grid_size**2

    @property
    def latent_dim(self) -> int:
        return len(self.fsq_levels)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(fsq_levels=list(self.fsq_levels), stage_channels=list(self.stage_channels),
                    model_type=MODEL_TYPE, codebook_size=self.codebook_size, tokens_per_view=self.tokens_per_view)
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str) -> ImageTokenizerConfig:
        """Inverse of to_dict; the derived entries must agree with the fields. Errors name `source`."""
        data = dict(data)
        model_type = data.pop("model_type", None)
        if model_type != MODEL_TYPE:
            raise ImageTokenizerError(f"{source}: model_type={model_type!r}, expected {MODEL_TYPE!r}")
        derived = {key: data.pop(key, None) for key in ("codebook_size", "tokens_per_view")}
        try:
            config = cls(**data)
        except TypeError as exc:
            raise ImageTokenizerError(f"{source}: {exc}") from None
        except ImageTokenizerError as exc:
            raise ImageTokenizerError(f"{source}: {exc}") from None
        for key, value in derived.items():
            if value is not None and value != getattr(config, key):
                raise ImageTokenizerError(f"{source}: {key}={value} does not match the derived "
                                          f"{getattr(config, key)}")
        return config


class FiniteScalarQuantizer(nn.Module):
    """FSQ: bound each latent dim to (-L/2, L/2), round with a straight-through gradient, index the digits."""

    def __init__(self, levels: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.int64), persistent=False)
        basis = torch.cumprod(torch.tensor((1,) + levels[:-1], dtype=torch.int64), dim=0)
        self.register_buffer("basis", basis, persistent=False)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        # Even levels are asymmetric around 0 (e.g. 8 -> -4..3): shift so tanh lands on those integers.
        eps = 1e-3
        half = (self.levels.float() - 1) * (1 + eps) / 2
        offset = (self.levels % 2 == 0).float() * 0.5
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z: [..., D] -> (quantised latents [..., D] in [-1, 1] with straight-through grads, codes [...])."""
        bounded = self._bound(z)
        rounded = bounded + (bounded.round() - bounded).detach()
        half_width = (self.levels // 2).float()
        digits = (rounded.detach() + half_width).long()  # [..., D] in [0, L)
        return rounded / half_width, (digits * self.basis).sum(-1)

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [...] long -> latents [..., D] in [-1, 1]."""
        digits = (codes.unsqueeze(-1) // self.basis) % self.levels
        half_width = (self.levels // 2).float()
        return (digits.float() - half_width) / half_width


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(GROUP_NORM_GROUPS, in_channels), nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.GroupNorm(GROUP_NORM_GROUPS, out_channels), nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def _encoder(config: ImageTokenizerConfig) -> nn.Sequential:
    first = config.stage_channels[0]
    layers: list[nn.Module] = [nn.Conv2d(config.channels, first, 3, padding=1)]
    previous = first
    for width in config.stage_channels:
        for _ in range(config.res_blocks_per_stage):
            layers.append(ResBlock(previous, width))
            previous = width
        layers.append(nn.Conv2d(previous, width, 4, stride=2, padding=1))
        previous = width
    layers += [ResBlock(previous, previous), nn.GroupNorm(GROUP_NORM_GROUPS, previous), nn.SiLU(),
               nn.Conv2d(previous, config.latent_dim, 1)]
    return nn.Sequential(*layers)


def _decoder(config: ImageTokenizerConfig) -> nn.Sequential:
    last = config.stage_channels[-1]
    layers: list[nn.Module] = [nn.Conv2d(config.latent_dim, last, 3, padding=1), ResBlock(last, last)]
    previous = last
    for width in reversed(config.stage_channels):
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(previous, width, 3, padding=1)]
        previous = width
        for _ in range(config.res_blocks_per_stage):
            layers.append(ResBlock(previous, width))
    layers += [nn.GroupNorm(GROUP_NORM_GROUPS, previous), nn.SiLU(), nn.Conv2d(previous, config.channels, 3, padding=1)]
    return nn.Sequential(*layers)


def images_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float [B, C, H, W] in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def unit_to_images(pixels: torch.Tensor) -> torch.Tensor:
    """float [B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C] (clamped, rounded)."""
    return pixels.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class ImageTokenizer(nn.Module):
    """FSQ autoencoder. `encode`/`decode` are the inference API; `forward` is the training pass."""

    def __init__(self, config: ImageTokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = _encoder(config)
        self.quantizer = FiniteScalarQuantizer(config.fsq_levels)
        self.decoder = _decoder(config)

    @classmethod
    def random(cls, config: ImageTokenizerConfig, seed: int = 0) -> ImageTokenizer:
        """A freshly initialised tokenizer whose weights depend only on (config, seed); for tests."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels: float [B, C, H, W] in [-1, 1] -> (reconstruction [B, C, H, W], codes [B, grid, grid])."""
        latents = self.encoder(pixels).permute(0, 2, 3, 1)  # [B, grid, grid, D]
        quantised, codes = self.quantizer(latents)
        return self.decoder(quantised.permute(0, 3, 1, 2)), codes

    def _check_images(self, images: torch.Tensor) -> None:
        size, channels = self.config.image_size, self.config.channels
        if images.dtype != torch.uint8:
            raise ImageTokenizerError(f"images must be uint8, got {images.dtype}")
        if images.ndim != 4 or tuple(images.shape[1:]) != (size, size, channels):
            raise ImageTokenizerError(f"images must have shape [B, {size}, {size}, {channels}], got "
                                      f"{list(images.shape)}")

    @torch.no_grad()
    def encode(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, C] -> long codes [B, tokens_per_view], raster order, on the model's device."""
        images = torch.as_tensor(images)
        self._check_images(images)
        pixels = images_to_unit(images.to(self.device))
        latents = self.encoder(pixels).permute(0, 2, 3, 1)  # [B, grid, grid, D]
        return self.quantizer(latents)[1].reshape(images.shape[0], -1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """long codes [B, tokens_per_view] in [0, codebook_size) -> uint8 [B, H, W, C] on the model's device."""
        codes = torch.as_tensor(codes)
        if codes.dtype not in (torch.int64, torch.int32) or codes.ndim != 2 \
                or codes.shape[1] != self.config.tokens_per_view:
            raise ImageTokenizerError(f"codes must be integer [B, {self.config.tokens_per_view}], got "
                                      f"{codes.dtype} {list(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ImageTokenizerError(f"codes must lie in [0, {self.config.codebook_size}), got "
                                      f"[{int(codes.min())}, {int(codes.max())}]")
        grid = self.config.grid_size
        latents = self.quantizer.codes_to_latents(codes.to(self.device).long().reshape(-1, grid, grid))
        return unit_to_images(self.decoder(latents.permute(0, 3, 1, 2)))

    # ---- persistence --------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> None:
        """Writes `config.json` and `model.safetensors` into `directory` (created if needed).

        `dtype` is the storage type of the weights (float16 halves a shipped checkpoint); loading casts them
        to the model's float32 parameters.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {name: tensor.detach().to("cpu", dtype).contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "model_type": MODEL_TYPE})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> ImageTokenizer:
        """Loads a tokenizer; a missing, corrupt or mismatched file raises ImageTokenizerError naming it."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        try:
            data = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise ImageTokenizerError(f"{config_path}: tokenizer config not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ImageTokenizerError(f"{config_path}: not readable JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ImageTokenizerError(f"{config_path}: expected a JSON object, got {type(data).__name__}")
        model = cls(ImageTokenizerConfig.from_dict(data, str(config_path)))
        if not weights_path.is_file():
            raise ImageTokenizerError(f"{weights_path}: tokenizer weights not found")
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise ImageTokenizerError(f"{weights_path}: not a readable safetensors file ({exc})") from None
        _check_state_matches(model.state_dict(), state, str(weights_path))
        model.load_state_dict(state)
        return model.to(device).eval()


def _check_state_matches(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ImageTokenizerError(f"{source}: weights do not match config.json: missing {missing[:5]}"
                                  f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                                  f"{'...' if len(unexpected) > 5 else ''}")
    for name, tensor in expected.items():
        if tuple(found[name].shape) != tuple(tensor.shape):
            raise ImageTokenizerError(f"{source}: tensor {name} has shape {list(found[name].shape)}, config.json "
                                      f"implies {list(tensor.shape)}")
