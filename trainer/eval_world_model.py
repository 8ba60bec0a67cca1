"""`vla-mbpo eval-world-model`: fidelity of a world-model checkpoint on held-out real transitions.

From start observations of the held-out episodes (the training split's validation part), the model is rolled
out 1 and 2 chunks with the real recorded actions, *greedily* (argmax inside each position's allowed range,
forced markers, exactly the engine's decoding plan), and the imagined frames are compared with the real ones:
PSNR and SSIM per view (torchmetrics), reward balanced accuracy on the imagined observation, plus the
teacher-forced reward accuracy (real next observation in context). Two reference points are reported next to
them: the tokenizer's own reconstruction of the real frame (the ceiling) and repeating the start frame (the
floor). Rollouts use transformers directly; the trainer never imports the serving engine.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM

from engine.image_tokenizer import ImageTokenizer
from engine.layout import TokenLayout
from trainer.image_metrics import finite_mean, psnr_per_image, ssim_per_image
from trainer.train_world_model import balanced_accuracy, class_recalls, positive_int
from trainer.world_model_data import (
    TARGET_REWARD,
    TokenizedEpisode,
    build_stream,
    collate_streams,
    episode_frames,
    independent_view_mask,
    load_recorded_episodes,
    split_episode_ids,
    start_prefix,
    tokenize_episode,
)
from trainer.world_model_rollout import GreedyImaginer, uses_independent_views


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: str
    data_dir: str
    json_out: str | None = None
    grid_png: str | None = None
    num_windows: int = 256
    batch_size: int = 32
    num_chunks: int = 2
    val_every: int = 10
    seed: int = 0
    device: str = "cpu"
    # Also roll out with the real next head frame in place of the imagined one and score the wrist decoded after
    # it: how much the wrist's prediction leans on its head block (what interleaved view decoding can buy).
    real_head: bool = False

    def __post_init__(self) -> None:
        if min(self.num_windows, self.batch_size, self.num_chunks) <= 0:
            raise ValueError(f"num_windows, batch_size, num_chunks must be > 0, got {self.num_windows}, "
                             f"{self.batch_size}, {self.num_chunks}")


def select_windows(episodes: Sequence[TokenizedEpisode], chunk_size: int, num_chunks: int, count: int,
                   seed: int) -> list[tuple[int, int]]:
    """(episode, start) pairs with at least one whole chunk ahead: a seeded uniform sample, plus, for every
    successful episode, the windows whose chunk 1 or chunk `num_chunks` ends on the final (successful) frame,
    so the rare 'yes' class is always measured."""
    candidates = [(e, t) for e, ep in enumerate(episodes) for t in range(ep.num_steps - chunk_size + 1)]
    rng = np.random.default_rng(seed)
    picks = [candidates[i] for i in rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)]
    positives = [(e, ep.num_steps - chunk_size * j) for e, ep in enumerate(episodes) if ep.success[-1]
                 for j in sorted({1, num_chunks}) if ep.num_steps >= chunk_size * j]
    return picks + [p for p in positives if p not in picks]


def window_steps(episode: TokenizedEpisode, start: int, chunk_size: int, num_chunks: int) -> np.ndarray:
    """Frame index of a window's start and of the observation after each chunk [n+1]; past the episode's end,
    its last frame (never scored)."""
    return np.minimum(start + chunk_size * np.arange(num_chunks + 1), episode.num_steps)


def window_arrays(episode: TokenizedEpisode, frames: np.ndarray, start: int, chunk_size: int, num_chunks: int,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(actions [n, k, d], real frames [n+1, V, H, W, 3], labels [n], valid [n]) of one window. Chunks past
    the episode end are invalid: their actions are zeros and their frames repeat the last one (never scored)."""
    available = min(num_chunks, (episode.num_steps - start) // chunk_size)
    actions = np.zeros((num_chunks * chunk_size, episode.actions.shape[1]), dtype=np.float32)
    actions[:available * chunk_size] = episode.actions[start:start + available * chunk_size]
    steps = window_steps(episode, start, chunk_size, num_chunks)
    valid = np.arange(1, num_chunks + 1) <= available
    return (actions.reshape(num_chunks, chunk_size, -1), frames[steps], episode.success[steps[1:]] & valid, valid)


def rollout_in_batches(imaginer: GreedyImaginer, prefixes: Sequence[np.ndarray], actions: np.ndarray, batch_size: int,
                       given_view: int | None = None, given_codes: np.ndarray | None = None,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Greedy rollouts of every window, batch by batch: codes [W, n, V, N] and success answers [W, n]."""
    codes, answers = [], []
    for start in range(0, len(prefixes), batch_size):
        part = slice(start, start + batch_size)
        result = imaginer.rollout(prefixes[part], actions[part], given_view,
                                  None if given_codes is None else given_codes[part])
        codes.append(result.codes)
        answers.append(result.success)
    return np.concatenate(codes), np.concatenate(answers)


def decode_views(tokenizer: ImageTokenizer, codes: np.ndarray) -> torch.Tensor:
    """Codes [..., N] -> uint8 frames [..., H, W, 3] on the CPU."""
    frames = tokenizer.decode(torch.from_numpy(codes.reshape(-1, codes.shape[-1]))).cpu()
    return frames.reshape(*codes.shape[:-1], *frames.shape[1:])


@torch.no_grad()
def teacher_forced_rewards(model: LlamaForCausalLM, layout: TokenLayout, streams: Sequence,
                           independent_views: bool, batch_size: int) -> list[tuple[bool, bool]]:
    device = next(model.parameters()).device
    pairs: list[tuple[bool, bool]] = []
    for start in range(0, len(streams), batch_size):
        batch = collate_streams(layout, streams[start:start + batch_size])
        ids = batch.token_ids.to(device)
        mask = independent_view_mask(layout, ids) if independent_views else None
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        reward = batch.targets[:, 1:].to(device) == TARGET_REWARD
        predicted = logits[reward][:, layout.yes_id] > logits[reward][:, layout.no_id]
        pairs += list(zip((ids[:, 1:][reward] == layout.yes_id).tolist(), predicted.tolist(), strict=True))
    return pairs


def _view_metrics(real: torch.Tensor, predicted: torch.Tensor) -> dict[str, float]:
    return {"psnr": finite_mean(psnr_per_image(real, predicted)), "ssim": float(ssim_per_image(real, predicted).mean())}


def render_grid(real: np.ndarray, imagined: np.ndarray, path: Path, scale: int = 2) -> None:
    """PNG: per example 4 rows (real head, imagined head, real wrist, imagined wrist) x (start, +1, +2 chunks).

    real: uint8 [E, n+1, V, H, W, 3] frames; imagined: uint8 [E, n, V, H, W, 3]. The imagined start column
    repeats the real start (it is given, not predicted). A 2-pixel white rule separates examples.
    """
    import matplotlib.image

    rows = []
    for example in range(real.shape[0]):
        for view in range(real.shape[2]):
            rows.append(np.concatenate(list(real[example, :, view]), axis=1))
            rows.append(np.concatenate([real[example, 0, view], *imagined[example, :, view]], axis=1))
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, dtype=np.uint8))
    grid = np.concatenate(rows[:-1], axis=0).repeat(scale, axis=0).repeat(scale, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, grid)


def evaluate(config: EvalConfig, recorded: Sequence | None = None) -> dict:
    """The fidelity report. `recorded` (episodes in recording order) defaults to loading config.data_dir."""
    device = torch.device(config.device)
    checkpoint = Path(config.checkpoint)
    layout = TokenLayout.load(checkpoint / "layout.json")
    model = LlamaForCausalLM.from_pretrained(checkpoint / "world_model", dtype=torch.float32).to(device).eval()
    tokenizer = ImageTokenizer.from_pretrained(checkpoint / "tokenizer", device=device)
    independent = uses_independent_views(model)
    recorded = load_recorded_episodes(config.data_dir) if recorded is None else recorded
    _, val_ids = split_episode_ids(len(recorded), config.val_every)
    val_recorded = [recorded[i] for i in val_ids]
    val_tokens = [tokenize_episode(tokenizer, e, layout.views) for e in val_recorded]
    n, k = config.num_chunks, layout.chunk_size
    windows = select_windows(val_tokens, k, n, config.num_windows, config.seed)
    frames = [episode_frames(e, layout.views) for e in val_recorded]  # [T+1, V, H, W, 3] each
    per_window = [window_arrays(val_tokens[e], frames[e], t, k, n) for e, t in windows]
    actions, real, labels, valid = (np.stack(parts) for parts in zip(*per_window, strict=True))
    imaginer = GreedyImaginer(model, layout, independent)
    prefixes = [start_prefix(layout, val_tokens[e], t) for e, t in windows]
    codes, success = rollout_in_batches(imaginer, prefixes, actions, config.batch_size)  # [W, n, V, N], [W, n]
    imagined = decode_views(tokenizer, codes)  # [W, n, V, H, W, 3]
    real_t = torch.from_numpy(real)  # [W, n+1, V, H, W, 3]
    wrist_given_head = None
    if config.real_head:
        head, wrist = layout.views.index("head"), layout.views.index("wrist")
        real_heads = np.stack([val_tokens[e].codes[window_steps(val_tokens[e], t, k, n)[1:], head]
                               for e, t in windows])  # [W, n, N]
        given, _ = rollout_in_batches(imaginer, prefixes, actions, config.batch_size, head, real_heads)
        wrist_given_head = decode_views(tokenizer, given[:, :, wrist])  # [W, n, H, W, 3]
    report: dict = {"checkpoint": str(checkpoint), "decoding": "greedy", "independent_views": independent,
                    "num_windows": len(windows), "num_val_episodes": len(val_ids)}
    for chunk in range(n):
        scored = torch.from_numpy(valid[:, chunk])
        for v, view in enumerate(layout.views):
            target = real_t[scored, chunk + 1, v]
            recon = tokenizer.decode(tokenizer.encode(target)).cpu()
            report[f"chunk{chunk + 1}_{view}"] = {
                **_view_metrics(target, imagined[scored, chunk, v]),
                "tokenizer_ceiling": _view_metrics(target, recon),
                "copy_start_floor": _view_metrics(target, real_t[scored, 0, v]),
            }
        if wrist_given_head is not None:
            report[f"chunk{chunk + 1}_wrist_given_real_head"] = _view_metrics(
                real_t[scored, chunk + 1, wrist], wrist_given_head[scored, chunk])
        pairs = list(zip(labels[valid[:, chunk], chunk].tolist(), success[valid[:, chunk], chunk].tolist(),
                         strict=True))
        report[f"chunk{chunk + 1}_reward_balanced_accuracy"] = balanced_accuracy(pairs)
        report.update({f"chunk{chunk + 1}_reward_{name}": r for name, r in class_recalls(pairs).items()})
        report[f"chunk{chunk + 1}_num_scored"] = int(valid[:, chunk].sum())
        report[f"chunk{chunk + 1}_num_yes_labels"] = int(labels[:, chunk].sum())
    streams = [build_stream(layout, val_tokens[e], t, int(ok.sum())) for (e, t), ok in zip(windows, valid, strict=True)]
    teacher = teacher_forced_rewards(model, layout, streams, independent, config.batch_size)
    report["teacher_forced_reward_balanced_accuracy"] = balanced_accuracy(teacher)
    report.update({f"teacher_forced_reward_{name}": r for name, r in class_recalls(teacher).items()})
    if config.grid_png:
        shown = _grid_examples(valid, labels, count=3)
        render_grid(real[shown], imagined[shown].numpy(), Path(config.grid_png))
        report["grid_png"] = config.grid_png
    if config.json_out:
        Path(config.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _grid_examples(valid: np.ndarray, labels: np.ndarray, count: int) -> list[int]:
    """The first full-length windows of the sample, with one that ends in success if there is one."""
    full = np.flatnonzero(valid.all(axis=1))
    shown = [int(i) for i in full[:count]]
    positive = np.flatnonzero(labels[:, -1])
    if len(positive) and int(positive[0]) not in shown:
        shown[-1:] = [int(positive[0])]
    return shown


def build_parser() -> argparse.ArgumentParser:
    defaults = EvalConfig(checkpoint="", data_dir="")
    parser = argparse.ArgumentParser(prog="vla-mbpo eval-world-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (layout.json, world_model/, ...)")
    parser.add_argument("--data", required=True, help="the recording the checkpoint was trained on")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--grid-png", help="write the real-vs-imagined grid here")
    parser.add_argument("--num-windows", type=int, default=defaults.num_windows)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--real-head", action="store_true",
                        help="also score the wrist decoded after the real next head frame (a second rollout)")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = EvalConfig(checkpoint=args.checkpoint, data_dir=args.data, json_out=args.json, grid_png=args.grid_png,
                        num_windows=args.num_windows, batch_size=args.batch_size, seed=args.seed,
                        device=args.device, real_head=args.real_head)
    print(json.dumps(evaluate(config), indent=2))
    return 0
