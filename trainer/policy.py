"""The small VLA policy: images of both views + the instruction's UTF-8 bytes -> a binned action chunk.

Each of the chunk's `chunk_size * action_dim` action values is a categorical over `num_bins` evenly
spaced values in [-1, 1], so the log-probability of a chunk is an exact sum of log-softmax terms (what
PPO's ratio needs). The critic is an MLP on the trunk's pooled features with a stop-gradient, as in the
paper: value regression never moves the features the actor uses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.config import PolicyConfig

POLICY_WEIGHTS = "policy.safetensors"
POLICY_CONFIG = "policy_config.json"
BYTE_PAD = 0  # byte b is embedded as b + 1 so 0 can mean "no byte"


class PolicyInputError(ValueError):
    """Observations or actions whose shape, dtype or range does not match the policy config."""


@dataclass(frozen=True)
class PolicyBatch:
    """A batch of policy inputs as tensors."""

    head: torch.Tensor  # [B, H, W, 3] uint8
    wrist: torch.Tensor  # [B, H, W, 3] uint8
    instruction: torch.Tensor  # [B, L] int64, byte + 1, 0 = padding

    def __len__(self) -> int:
        return int(self.head.shape[0])

    def index(self, idx: torch.Tensor) -> PolicyBatch:
        return PolicyBatch(self.head[idx], self.wrist[idx], self.instruction[idx])


def encode_instructions(instructions: list[str], max_bytes: int) -> torch.Tensor:
    """UTF-8 bytes of each instruction, shifted by one and right-padded with 0. Returns [B, max_bytes] int64."""
    out = torch.zeros((len(instructions), max_bytes), dtype=torch.int64)
    for i, text in enumerate(instructions):
        data = text.encode("utf-8")
        if not data:
            raise PolicyInputError(f"instruction {i} is empty")
        if len(data) > max_bytes:
            raise PolicyInputError(f"instruction {i} has {len(data)} UTF-8 bytes > max_instruction_bytes={max_bytes}")
        out[i, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64) + 1
    return out


def make_batch(head: np.ndarray, wrist: np.ndarray, instructions: list[str], config: PolicyConfig) -> PolicyBatch:
    """Checks and converts numpy observations ([B, H, W, 3] uint8 per view) and instructions to a PolicyBatch."""
    size = config.image_size
    for name, images in (("head", head), ("wrist", wrist)):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise PolicyInputError(f"{name} images must be uint8 [B, {size}, {size}, 3], "
                                   f"got {images.dtype} {list(images.shape)}")
    if not head.shape[0] == wrist.shape[0] == len(instructions):
        raise PolicyInputError(f"batch sizes differ: head {head.shape[0]}, wrist {wrist.shape[0]}, "
                               f"instructions {len(instructions)}")
    return PolicyBatch(torch.from_numpy(np.ascontiguousarray(head)), torch.from_numpy(np.ascontiguousarray(wrist)),
                       encode_instructions(instructions, config.max_instruction_bytes))


def actions_to_bins(actions: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Nearest bin of each action value. [B, k, d] float in [-1, 1] (clipped) -> [B, k * d] int64."""
    clipped = actions.clamp(-1.0, 1.0).reshape(actions.shape[0], -1)
    return torch.round((clipped + 1.0) * 0.5 * (num_bins - 1)).to(torch.int64)


def bins_to_actions(bins: torch.Tensor, config: PolicyConfig) -> torch.Tensor:
    """Bin centres. [B, k * d] int64 -> [B, k, d] float32 in [-1, 1]."""
    values = bins.to(torch.float32) * (2.0 / (config.num_bins - 1)) - 1.0
    return values.reshape(bins.shape[0], config.chunk_size, config.action_dim)


def action_dim_log_probs(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Exact log-probability of each chosen bin. logits [B, D, nb], bins [B, D] -> [B, D]."""
    log_probs = F.log_softmax(logits, dim=-1)
    return log_probs.gather(-1, bins.unsqueeze(-1)).squeeze(-1)


def chunk_log_prob(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Exact log-probability of whole chunks: sum over action dims. logits [B, D, nb], bins [B, D] -> [B]."""
    return action_dim_log_probs(logits, bins).sum(-1)


def chunk_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the factorised chunk distribution (sum over action dims). [B, D, nb] -> [B]."""
    log_probs = F.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1).sum(-1)


def sample_bins(logits: torch.Tensor, generator: torch.Generator | None, temperature: float = 1.0) -> torch.Tensor:
    """Draws one bin per action dim from one stream for the whole batch. logits [B, D, nb] -> [B, D] int64."""
    probs = F.softmax(logits.float() / temperature, dim=-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.reshape(probs.shape[:-1])


def sample_bins_per_row(logits: torch.Tensor, generators: Sequence[torch.Generator],
                        temperature: float = 1.0) -> torch.Tensor:
    """Draws one bin per action dim, row b from its own stream `generators[b]`: a row's draw does not depend on
    which other rows share the batch (inverse CDF of one uniform per dim). logits [B, D, nb] -> [B, D] int64."""
    if len(generators) != logits.shape[0]:
        raise ValueError(f"one generator per batch row: got {len(generators)} for {logits.shape[0]} rows")
    probs = F.softmax(logits.float() / temperature, dim=-1)
    uniforms = torch.stack([torch.rand(logits.shape[1], generator=g) for g in generators]).to(logits.device)  # [B, D]
    cdf = probs.cumsum(-1)  # [B, D, nb]
    # right=True: the first bin whose cdf exceeds u, so a zero-probability bin (cdf equal to its left) is never drawn
    bins = torch.searchsorted(cdf, uniforms.unsqueeze(-1), right=True).squeeze(-1)
    # a float cdf can end just below 1: a u above it takes the last bin that has mass
    num_bins = logits.shape[-1]
    last_with_mass = num_bins - 1 - torch.flip(probs > 0, dims=[-1]).to(torch.int64).argmax(-1)
    return torch.where(bins >= num_bins, last_with_mass, bins)


class SpatialSoftmax(nn.Module):
    """Expected image coordinates of each channel's softmax over positions (the keypoints of Levine et al.):
    [N, K, h, w] -> [N, 2K] in [-1, 1]. Where a feature fires matters for grasping at pixel precision, and a
    flattened or pooled map keeps that only coarsely."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        ys, xs = torch.meshgrid(torch.linspace(-1.0, 1.0, height), torch.linspace(-1.0, 1.0, width), indexing="ij")
        self.register_buffer("grid", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1), persistent=False)  # [hw, 2]
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        n, k = maps.shape[:2]
        attention = F.softmax(maps.reshape(n, k, -1) * torch.exp(-self.log_temperature), dim=-1)  # [N, K, hw]
        return (attention @ self.grid).reshape(n, 2 * k)


class ImageEncoder(nn.Module):
    """A CNN shared by all views whose feature maps are modulated by the instruction (FiLM, as in RT-1), read
    out as spatial-softmax keypoints plus mean-pooled features: [N, H, W, 3] uint8, [N, T] -> [N, image_feature_dim].

    FiLM lets the instruction pick what the maps respond to (the named object among three), so the keypoints can
    point at it; its projections start at zero, so a fresh encoder is an unconditioned CNN."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        in_channels = 3
        for out_channels in config.conv_channels:
            self.convs.append(nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1))
            in_channels = out_channels
        for _ in range(config.refine_convs):
            self.convs.append(nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1))
        self.films = nn.ModuleList([nn.Linear(config.text_feature_dim, 2 * conv.out_channels) for conv in self.convs])
        for film in self.films:
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)
        side = config.image_size // (2 ** len(config.conv_channels))
        self.keypoint_maps = nn.Conv2d(in_channels, config.num_keypoints, kernel_size=1)
        self.keypoints = SpatialSoftmax(side, side)
        self.project = nn.Linear(2 * config.num_keypoints + in_channels, config.image_feature_dim)

    def forward(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32) * (1.0 / 255.0) - 0.5  # [N, 3, H, W]
        for conv, film in zip(self.convs, self.films, strict=True):
            scale, shift = film(text_features).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)  # [N, C, 1, 1] each
            x = F.relu(conv(x) * (1.0 + scale) + shift)
        readout = torch.cat([self.keypoints(self.keypoint_maps(x)), x.mean(dim=(2, 3))], dim=-1)
        return F.relu(self.project(readout))


class InstructionEncoder(nn.Module):
    """Byte embedding + a 1-D conv, masked mean and max pooling: [B, L] int64 -> [B, text_feature_dim]."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(257, config.text_embed_dim, padding_idx=BYTE_PAD)
        self.conv = nn.Conv1d(config.text_embed_dim, config.text_embed_dim, kernel_size=5, padding=2)
        self.project = nn.Linear(2 * config.text_embed_dim, config.text_feature_dim)

    def forward(self, instruction: torch.Tensor) -> torch.Tensor:
        mask = (instruction != BYTE_PAD).unsqueeze(-1).to(torch.float32)  # [B, L, 1]
        x = F.relu(self.conv(self.embed(instruction).transpose(1, 2))).transpose(1, 2)  # [B, L, E]
        mean = (x * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        peak = x.masked_fill(mask == 0, float("-inf")).amax(1).clamp_min(0.0)  # relu features are >= 0
        return F.relu(self.project(torch.cat([mean, peak], dim=-1)))


@dataclass(frozen=True)
class PolicyOutput:
    logits: torch.Tensor  # [B, chunk_size * action_dim, num_bins]
    values: torch.Tensor  # [B]


class VlaPolicy(nn.Module):
    """Actor (binned action chunk) and critic (stop-gradient MLP) over images + instruction."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.instruction_encoder = InstructionEncoder(config)
        fused = config.num_views * config.image_feature_dim + config.text_feature_dim
        self.trunk = nn.Sequential(nn.Linear(fused, config.hidden_dim), nn.ReLU(),
                                   nn.Linear(config.hidden_dim, config.hidden_dim), nn.ReLU())
        self.action_head = nn.Linear(config.hidden_dim, config.num_action_tokens * config.num_bins)
        self.critic = nn.Sequential(nn.Linear(config.hidden_dim, config.critic_hidden_dim), nn.ReLU(),
                                    nn.Linear(config.critic_hidden_dim, 1))

    def features(self, batch: PolicyBatch) -> torch.Tensor:
        """Pooled trunk features. -> [B, hidden_dim]"""
        n = len(batch)
        text = self.instruction_encoder(batch.instruction)  # [B, T]
        images = torch.cat([batch.head, batch.wrist], dim=0)  # [2B, H, W, 3]: one CNN pass for both views
        image_features = self.image_encoder(images, torch.cat([text, text], dim=0))  # [2B, F]
        per_view = torch.cat([image_features[:n], image_features[n:]], dim=-1)  # [B, 2F]
        return self.trunk(torch.cat([per_view, text], dim=-1))

    def forward(self, batch: PolicyBatch) -> PolicyOutput:
        features = self.features(batch)
        logits = self.action_head(features).reshape(len(batch), self.config.num_action_tokens, self.config.num_bins)
        return PolicyOutput(logits=logits, values=self.critic_values(features))

    def critic_values(self, features: torch.Tensor) -> torch.Tensor:
        """The critic on trunk features [B, hidden_dim], behind a stop-gradient into the backbone (PAPER.md). -> [B]"""
        return self.critic(features.detach()).squeeze(-1)

    def actor_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("critic.")]

    def critic_parameters(self) -> list[nn.Parameter]:
        return list(self.critic.parameters())

    @torch.no_grad()
    def act(self, batch: PolicyBatch, generator: torch.Generator | Sequence[torch.Generator] | None = None,
            greedy: bool = False, temperature: float = 1.0,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chooses action chunks from softmax(logits / temperature), the distribution PPO then trains (its
        log-probs are of that tempered distribution). `generator`: one stream for the batch, or one per row
        (see `sample_bins_per_row`). Returns (actions [B, k, d], bins [B, D], log_probs [B], values [B])."""
        out = self(batch)
        if greedy:
            bins = out.logits.argmax(-1)
        elif generator is None or isinstance(generator, torch.Generator):
            bins = sample_bins(out.logits, generator, temperature)
        else:
            bins = sample_bins_per_row(out.logits, list(generator), temperature)
        return bins_to_actions(bins, self.config), bins, chunk_log_prob(out.logits / temperature, bins), out.values


def save_policy(policy: VlaPolicy, directory: Path, metadata: dict | None = None) -> None:
    """Writes policy.safetensors + policy_config.json (config and free-form metadata) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in policy.state_dict().items()}
    save_file(state, str(directory / POLICY_WEIGHTS))
    payload = {"config": asdict(policy.config), "metadata": metadata or {}}
    (directory / POLICY_CONFIG).write_text(json.dumps(payload, indent=2))


def load_policy(directory: Path) -> tuple[VlaPolicy, dict]:
    """Reads a policy written by `save_policy`. Returns (policy in eval mode, metadata)."""
    config_path, weights_path = directory / POLICY_CONFIG, directory / POLICY_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{directory} is not a policy checkpoint: needs {POLICY_CONFIG} and {POLICY_WEIGHTS}")
    payload = json.loads(config_path.read_text())
    policy = VlaPolicy(PolicyConfig(**payload["config"]))
    policy.load_state_dict(load_file(str(weights_path)))
    policy.eval()
    return policy, payload.get("metadata", {})
