"""`vla-mbpo sft`: behaviour-clone the VLA policy on recorded demos -> the initial policy for RL.

Every recorded step t of every episode is a sample: the observation before action t and the next
`chunk_size` expert actions (an episode's last chunk is padded with its last action, and the padding is
left out of the loss). The loss is the cross-entropy of each action dimension's bin. Images get a random
shift of up to 4 pixels (DrQ-style) so a few hundred demos do not get memorised pixel by pixel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.config import PolicyConfig, SFTConfig
from trainer.data import EpisodeDataset
from trainer.policy import PolicyBatch, VlaPolicy, actions_to_bins, encode_instructions, save_policy

SHIFT_PIXELS = 4


@dataclass(frozen=True)
class DemoSet:
    """Every (observation, next expert chunk) pair of a dataset, in memory. N samples."""

    head: torch.Tensor  # [N, H, W, 3] uint8
    wrist: torch.Tensor  # [N, H, W, 3] uint8
    instruction_ids: torch.Tensor  # [N] int64 index into instructions
    instructions: torch.Tensor  # [num_instructions, L] int64 encoded bytes
    target_bins: torch.Tensor  # [N, chunk_size * action_dim] int64
    target_mask: torch.Tensor  # [N, chunk_size * action_dim] bool: False on padding past the episode end
    num_episodes: int

    def __len__(self) -> int:
        return int(self.head.shape[0])


def chunk_targets(actions: np.ndarray, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For every step t of an episode, actions[t : t + chunk_size], padded with the last action.

    actions [T, A] -> (chunks [T, chunk_size, A] float32, real [T, chunk_size] bool).
    """
    num_steps = actions.shape[0]
    if num_steps == 0:
        raise ValueError("an episode with no actions has no behaviour-cloning targets")
    idx = np.arange(num_steps)[:, None] + np.arange(chunk_size)[None, :]  # [T, k]
    return actions[np.minimum(idx, num_steps - 1)].astype(np.float32), idx < num_steps


def load_demos(data_dir: Path, config: PolicyConfig, only_successful: bool) -> DemoSet:
    """Reads every (or every successful) episode of `data_dir` into a DemoSet."""
    dataset = EpisodeDataset(data_dir)
    heads, wrists, instr_ids, bins, masks = [], [], [], [], []
    instructions: dict[str, int] = {}
    used = 0
    for i, entry in enumerate(dataset.episodes):
        if (only_successful and not entry["success"]) or entry["num_steps"] == 0:
            continue
        episode = dataset.load(i)
        # Clone up to the first success: later frames (collect --post-success-steps) show the expert holding a
        # finished task, and the env ends an episode at its first success anyway.
        steps = int(np.argmax(episode.success)) if episode.succeeded else episode.num_steps
        if steps == 0:
            continue
        used += 1
        chunks, real = chunk_targets(episode.actions[:steps], config.chunk_size)
        heads.append(episode.head[:steps])  # the frame at `steps` has no cloned action after it
        wrists.append(episode.wrist[:steps])
        instr_ids.append(np.full(steps, instructions.setdefault(episode.instruction, len(instructions))))
        bins.append(actions_to_bins(torch.from_numpy(chunks), config.num_bins))
        masks.append(torch.from_numpy(np.repeat(real, config.action_dim, axis=1)))  # time-major like the bins
    if used == 0:
        raise ValueError(f"{data_dir} has no {'successful ' if only_successful else ''}episodes to clone")
    return DemoSet(torch.from_numpy(np.concatenate(heads)), torch.from_numpy(np.concatenate(wrists)),
                   torch.from_numpy(np.concatenate(instr_ids)).to(torch.int64),
                   encode_instructions(list(instructions), config.max_instruction_bytes),
                   torch.cat(bins), torch.cat(masks), used)


def random_shift(images: torch.Tensor, generator: torch.Generator, pad: int = SHIFT_PIXELS) -> torch.Tensor:
    """Shifts each image by up to `pad` pixels (edge-replicated). [B, H, W, 3] uint8 -> same."""
    b, h, w, _ = images.shape
    padded = F.pad(images.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="replicate")  # [B, 3, H+2p, W+2p]
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(b, 3, h, w + 2 * pad)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(b, 3, h, w)
    return cropped.gather(3, cols).to(torch.uint8).permute(0, 2, 3, 1)


def bc_loss(logits: torch.Tensor, target_bins: torch.Tensor, mask: torch.Tensor,
            label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean cross-entropy over action dims and bin accuracy. logits [B, D, nb] -> (loss, accuracy)."""
    per_dim = F.cross_entropy(logits.transpose(1, 2), target_bins, reduction="none",
                              label_smoothing=label_smoothing)  # [B, D]
    m = mask.to(per_dim.dtype)
    loss = (per_dim * m).sum() / m.sum().clamp_min(1.0)
    accuracy = ((logits.argmax(-1) == target_bins).to(per_dim.dtype) * m).sum() / m.sum().clamp_min(1.0)
    return loss, accuracy


def train_sft(demos: DemoSet, out_dir: Path, config: SFTConfig, policy_config: PolicyConfig,
              progress: bool = True) -> VlaPolicy:
    """Trains a fresh policy by behaviour cloning; writes the checkpoint and metrics.jsonl into out_dir."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = torch.device(config.device)
    policy = VlaPolicy(policy_config).to(device)
    optimizer = torch.optim.AdamW(policy.actor_parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps,
                                                   pct_start=0.05)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bar = tqdm(range(config.steps), desc="sft", disable=not progress)
    with open(out_dir / "metrics.jsonl", "w") as metrics:
        for step in bar:
            idx = torch.randint(0, len(demos), (config.batch_size,), generator=generator)
            batch = PolicyBatch(random_shift(demos.head[idx], generator).to(device),
                                random_shift(demos.wrist[idx], generator).to(device),
                                demos.instructions[demos.instruction_ids[idx]].to(device))
            loss, accuracy = bc_loss(policy(batch).logits, demos.target_bins[idx].to(device),
                                     demos.target_mask[idx].to(device), config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.actor_parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % config.log_every == 0 or step == config.steps - 1:
                record = {"step": step, "sft/loss": float(loss.detach()), "sft/bin_accuracy": float(accuracy),
                          "sft/lr": schedule.get_last_lr()[0], "time_s": time.perf_counter() - started}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{record['sft/loss']:.3f}", acc=f"{record['sft/bin_accuracy']:.3f}")
    bar.close()
    policy = policy.cpu().eval()
    save_policy(policy, out_dir, {"stage": "sft", "sft_config": asdict(config), "num_samples": len(demos),
                                  "num_episodes": demos.num_episodes})
    return policy


def build_parser() -> argparse.ArgumentParser:
    defaults = SFTConfig()
    parser = argparse.ArgumentParser(prog="vla-mbpo sft", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="recorded demo directory (vla-mbpo collect)")
    parser.add_argument("--out", type=Path, required=True, help="policy checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="gradient steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    parser.add_argument("--all-demos", action="store_true",
                        help="also clone the failed demos (default: successful demos only)")
    parser.add_argument("--num-bins", type=int, default=PolicyConfig().num_bins, help="bins per action dimension")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda")
    parser.add_argument("--eval-workers", type=int, default=2, help="processes for the evaluation")
    parser.add_argument("--eval-episodes", type=int, default=0,
                        help="after training, evaluate this many real episodes per task family")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str]) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")  # the entry point picks the GL backend before MuJoCo loads
    args = build_parser().parse_args(argv)
    config = SFTConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, label_smoothing=args.label_smoothing,
                       only_successful=not args.all_demos, seed=args.seed, device=args.device)
    policy_config = PolicyConfig(num_bins=args.num_bins)
    demos = load_demos(args.data, policy_config, config.only_successful)
    print(f"sft: {len(demos)} samples from {demos.num_episodes} episodes of {args.data}", file=sys.stderr)
    train_sft(demos, args.out, config, policy_config, progress=not args.no_progress)
    print(f"wrote {args.out}")
    if args.eval_episodes > 0:
        from trainer.config import EvalConfig
        from trainer.evaluate import evaluate_policy, format_table

        result = evaluate_policy(args.out, EvalConfig(episodes=args.eval_episodes, num_workers=args.eval_workers))
        print(format_table({"sft": result}))
        (args.out / "eval.json").write_text(json.dumps(result.to_json(), indent=2))
    return 0
