"""Per-image fidelity metrics (torchmetrics) on uint8 frames, shared by tokenizer and world-model evaluation."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1]."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 [B, H, W, C] images, got {images.dtype} {list(images.shape)}")
    return images.permute(0, 3, 1, 2).float() / 255.0


def psnr_per_image(real: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each predicted frame against its real frame: [B]. Identical frames give +inf."""
    return peak_signal_noise_ratio(_unit(predicted), _unit(real), data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim_per_image(real: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """SSIM (Gaussian window 11, sigma 1.5) of each predicted frame against its real frame: [B]."""
    return structural_similarity_index_measure(_unit(predicted), _unit(real), data_range=1.0, reduction="none")


def finite_mean(values: torch.Tensor, cap: float = 100.0) -> float:
    """Mean with +inf (a perfect frame) capped, so one exact copy cannot make the mean infinite."""
    return float(values.clamp(max=cap).mean())
