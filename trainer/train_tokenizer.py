"""`vla-mbpo train-tokenizer`: train the FSQ image tokenizer on recorded frames of every view.

Frames of the training episodes (split by episode, as for the world model) are trained with MSE + L1
reconstruction; the held-out episodes give the reported PSNR/SSIM per view, measured on the served path
(uint8 -> encode -> codes -> decode -> uint8). Writes `<out>/config.json + model.safetensors` and, in the
work directory, `metrics.jsonl`, `train_state.pt` (`--resume`) and `summary.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.image_tokenizer import ImageTokenizer, ImageTokenizerConfig, images_to_unit
from trainer.image_metrics import finite_mean, psnr_per_image, ssim_per_image
from trainer.precision import PRECISIONS, precision_problem, uses_bf16_autocast
from trainer.world_model_data import episode_frames, load_recorded_episodes, split_episode_ids

VIEWS = ("head", "wrist")


@dataclass(frozen=True)
class TokenizerTrainConfig:
    """One tokenizer training run; built from the CLI at the entry point only."""

    out_dir: str
    data_dir: str
    work_dir: str = "runs/tokenizer"
    tokenizer: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    l1_weight: float = 0.5
    val_every: int = 10
    max_val_frames_per_view: int = 1024
    seed: int = 0
    device: str = "cpu"
    log_every: int = 50
    save_every: int = 500
    resume: bool = False
    save_dtype: str = "float16"  # storage of the shipped weights; the world model is trained on codes of these
    precision: str = "auto"  # trainer/precision.py: bfloat16 autocast where native (CUDA, AVX512-BF16), else float32

    def __post_init__(self) -> None:
        problems = []
        if problem := precision_problem(self.precision):
            problems.append(problem)
        for name in ("steps", "batch_size", "max_val_frames_per_view", "log_every", "save_every"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.lr < 1 or self.warmup_steps < 0 or self.l1_weight < 0:
            problems.append(f"need 0 < lr < 1, warmup_steps >= 0, l1_weight >= 0; got {self.lr}, "
                            f"{self.warmup_steps}, {self.l1_weight}")
        if self.save_dtype not in ("float32", "float16"):
            problems.append(f"save_dtype must be float32 or float16, got {self.save_dtype!r}")
        if problems:
            raise ValueError("invalid tokenizer training config: " + "; ".join(problems))


def collect_frames(episodes: Sequence, views: Sequence[str] = VIEWS) -> dict[str, torch.Tensor]:
    """view -> uint8 [N, H, W, 3]: every frame of that view over the given episodes."""
    per_view: dict[str, list[np.ndarray]] = {view: [] for view in views}
    for episode in episodes:
        frames = episode_frames(episode, views)  # [T+1, V, H, W, 3]
        for index, view in enumerate(views):
            per_view[view].append(frames[:, index])
    return {view: torch.from_numpy(np.concatenate(chunks)) for view, chunks in per_view.items()}


@torch.no_grad()
def reconstruction_metrics(tokenizer: ImageTokenizer, frames: dict[str, torch.Tensor], batch_size: int = 256,
                           ) -> dict[str, float]:
    """Served-path PSNR/SSIM per view and code usage over the given frames."""
    metrics: dict[str, float] = {}
    used = torch.zeros(tokenizer.config.codebook_size, dtype=torch.bool)
    for view, images in frames.items():
        psnr, ssim = [], []
        for start in range(0, len(images), batch_size):
            real = images[start:start + batch_size]
            codes = tokenizer.encode(real)
            used[codes.flatten().cpu()] = True
            decoded = tokenizer.decode(codes).cpu()
            psnr.append(psnr_per_image(real, decoded))
            ssim.append(ssim_per_image(real, decoded))
        metrics[f"{view}_psnr"] = finite_mean(torch.cat(psnr))
        metrics[f"{view}_ssim"] = float(torch.cat(ssim).mean())
    metrics["codebook_usage"] = float(used.float().mean())
    return metrics


def _learning_rate(config: TokenizerTrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_tokenizer(config: TokenizerTrainConfig, episodes: Sequence) -> dict:
    """Trains on the training episodes, writes the tokenizer, returns the summary (also summary.json)."""
    device = torch.device(config.device)
    work_dir = Path(config.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    train_ids, val_ids = split_episode_ids(len(episodes), config.val_every)
    train_frames = torch.cat(list(collect_frames([episodes[i] for i in train_ids]).values()))
    val_frames = collect_frames([episodes[i] for i in val_ids])
    generator = torch.Generator().manual_seed(config.seed)
    val_frames = {view: images[torch.randperm(len(images), generator=generator)[:config.max_val_frames_per_view]]
                  for view, images in val_frames.items()}

    model = ImageTokenizer.random(config.tokenizer, config.seed).to(device)
    if device.type == "cpu":  # oneDNN's convolutions: ~1.4x faster channels-last here, float32 and bf16
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0, betas=(0.9, 0.99))
    state_path, metrics_path = work_dir / "train_state.pt", work_dir / "metrics.jsonl"
    step = 0
    if config.resume and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step = state["step"]
    elif metrics_path.exists():
        metrics_path.unlink()
    train_frames = train_frames.to(device)
    use_bf16 = uses_bf16_autocast(config.precision, device)
    started = time.perf_counter()
    model.train()
    progress = tqdm(total=config.steps, initial=step, desc="tokenizer", leave=False)
    while step < config.steps:
        picks = torch.randint(0, len(train_frames), (config.batch_size,), generator=generator).to(device)
        pixels = images_to_unit(train_frames[picks])  # [B, 3, H, W] in [-1, 1]
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            reconstruction, _ = model(pixels)
        reconstruction = reconstruction.float()
        mse = F.mse_loss(reconstruction, pixels)
        loss = mse + config.l1_weight * F.l1_loss(reconstruction, pixels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        progress.update(1)
        if step % config.log_every == 0 or step == config.steps:
            # PSNR of the batch in dB on [0, 255] pixels: the [-1, 1] range is 2 wide, hence the 4.
            record = {"step": step, "loss": loss.item(), "train_psnr": 10 * math.log10(4 / max(mse.item(), 1e-10)),
                      "lr": _learning_rate(config, step - 1), "elapsed_s": time.perf_counter() - started}
            progress.set_postfix(psnr=f"{record['train_psnr']:.2f}")
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if step % config.save_every == 0 or step == config.steps:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "generator": generator.get_state(), "step": step}, state_path)
    progress.close()
    train_seconds = time.perf_counter() - started
    model.save_pretrained(config.out_dir, dtype=getattr(torch, config.save_dtype))
    # Report what ships: the stored (possibly half-precision) weights, not the in-memory ones.
    model = ImageTokenizer.from_pretrained(config.out_dir, device=device)
    summary = {"train_seconds": train_seconds, "device": str(device), "bf16_autocast": use_bf16, "steps": config.steps,
               "num_train_frames": len(train_frames), "num_val_episodes": len(val_ids),
               "num_parameters": sum(p.numel() for p in model.parameters()),
               "codebook_size": config.tokenizer.codebook_size, "tokens_per_view": config.tokenizer.tokens_per_view,
               **{f"val_{k}": v for k, v in reconstruction_metrics(model, val_frames).items()},
               "config": asdict(config)}
    (work_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    defaults = TokenizerTrainConfig(out_dir="", data_dir="")
    shape = defaults.tokenizer
    parser = argparse.ArgumentParser(prog="vla-mbpo train-tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="recording directory made by `vla-mbpo collect`")
    parser.add_argument("--out", required=True, help="tokenizer directory to write")
    parser.add_argument("--work-dir", default=defaults.work_dir, help="metrics.jsonl, train_state.pt, summary")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--fsq-levels", type=int, nargs="+", default=list(shape.fsq_levels))
    parser.add_argument("--stage-channels", type=int, nargs="+", default=list(shape.stage_channels))
    parser.add_argument("--res-blocks-per-stage", type=int, default=shape.res_blocks_per_stage)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--precision", default=defaults.precision, choices=PRECISIONS,
                        help="auto: bfloat16 autocast on CUDA and on CPUs with native bfloat16, else float32")
    parser.add_argument("--resume", action="store_true", help="continue from <work-dir>/train_state.pt")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    shape = ImageTokenizerConfig(fsq_levels=tuple(args.fsq_levels), stage_channels=tuple(args.stage_channels),
                                 res_blocks_per_stage=args.res_blocks_per_stage)
    config = TokenizerTrainConfig(out_dir=args.out, data_dir=args.data, work_dir=args.work_dir, tokenizer=shape,
                                  steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                  device=args.device, resume=args.resume, precision=args.precision)
    summary = train_tokenizer(config, load_recorded_episodes(config.data_dir))
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0
