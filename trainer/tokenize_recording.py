"""`vla-mbpo tokenize`: a recording's episodes as a token cache (.npz) for `train-world-model --token-cache`.

Tokenizing is the slow part of preparing world-model data on a CPU (the default tokenizer encodes ~50 frames/s
on 2 cores, ~2.9 s per expert episode), so it runs once per recording and the cache is reused. With
`--success-tail-steps N` only successful episodes are kept, each cropped to the N steps before its first success
and every frame from it on: the reward's positives and its hardest negatives (the frames just before the task
completes) at a fraction of the cost, for adding many more successes than whole episodes would afford. A cropped
episode starts mid-task, which streams allow: each starts from a real observation at any time step.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.image_tokenizer import ImageTokenizer
from trainer.data import VIEWS, Episode, EpisodeDataset
from trainer.world_model_data import TokenizedEpisode, save_token_cache, tokenize_episode


class TokenizeError(ValueError):
    """Arguments that select no episodes or a range outside the recording; the message names them."""


@dataclass(frozen=True)
class TokenizeConfig:
    """Which episodes of one recording to tokenize, and how to crop them."""

    data_dir: str
    first_episode: int = 0
    last_episode: int | None = None  # exclusive; None: to the end of the recording
    success_tail_steps: int | None = None  # keep successful episodes only, cropped to this many steps before success

    def __post_init__(self) -> None:
        problems = []
        if self.first_episode < 0:
            problems.append(f"first_episode must be >= 0, got {self.first_episode}")
        if self.last_episode is not None and self.last_episode <= self.first_episode:
            problems.append(f"last_episode must be > first_episode, got {self.last_episode} <= {self.first_episode}")
        if self.success_tail_steps is not None and self.success_tail_steps < 0:
            problems.append(f"success_tail_steps must be >= 0, got {self.success_tail_steps}")
        if problems:
            raise TokenizeError("invalid TokenizeConfig: " + "; ".join(problems))


def success_tail(episode: Episode, steps_before: int) -> Episode | None:
    """The episode from `steps_before` steps before its first success to its end; None if it never succeeds."""
    if not episode.success.any():
        return None
    start = max(0, int(np.argmax(episode.success)) - steps_before)
    return dataclasses.replace(episode, head=episode.head[start:], wrist=episode.wrist[start:],
                               actions=episode.actions[start:], success=episode.success[start:])


def tokenize_recording(config: TokenizeConfig, tokenizer: ImageTokenizer, views: Sequence[str] = VIEWS,
                       progress: bool = True) -> tuple[list[TokenizedEpisode], list[int]]:
    """(tokenized episodes, their indices in the recording) for the configured range, cropped when asked. The one
    way a recording becomes tokens: `tokenize`, `train-world-model` (missing caches) and `build-default` use it."""
    dataset = EpisodeDataset(config.data_dir)
    last = len(dataset) if config.last_episode is None else config.last_episode
    if last > len(dataset):
        raise TokenizeError(f"{config.data_dir} has {len(dataset)} episodes; asked for episodes up to {last}")
    episodes, ids = [], []
    for i in tqdm(range(config.first_episode, last), desc=f"tokenize {config.data_dir}", disable=not progress):
        episode = dataset.load(i)
        if config.success_tail_steps is not None:
            episode = success_tail(episode, config.success_tail_steps)
            if episode is None:
                continue
        episodes.append(tokenize_episode(tokenizer, episode, views))
        ids.append(i)
    if not episodes:
        raise TokenizeError(f"no episode of {config.data_dir} [{config.first_episode}, {last}) was selected"
                            + (" (none succeeds)" if config.success_tail_steps is not None else ""))
    return episodes, ids


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-mbpo tokenize", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="recording directory (collect / evaluate --record-to)")
    parser.add_argument("--tokenizer", required=True, help="image tokenizer directory (e.g. CKPT/tokenizer)")
    parser.add_argument("--out", required=True, help="token cache (.npz) to write")
    parser.add_argument("--episodes", default=None, metavar="A:B",
                        help="only episodes A <= i < B of the recording (either side may be empty)")
    parser.add_argument("--success-tail-steps", type=int, default=None, metavar="N",
                        help="keep successful episodes only, each from N steps before its first success to its end")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def parse_range(text: str | None) -> tuple[int, int | None]:
    """"A:B" -> (A, B); "A:" -> (A, None); ":B" -> (0, B); None -> (0, None)."""
    if text is None:
        return 0, None
    first, sep, last = text.partition(":")
    if not sep:
        raise TokenizeError(f"--episodes needs A:B, got {text!r}")
    try:
        return (int(first) if first else 0), (int(last) if last else None)
    except ValueError:
        raise TokenizeError(f"--episodes needs integers A:B, got {text!r}") from None


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        first, last = parse_range(args.episodes)
        config = TokenizeConfig(args.data, first, last, args.success_tail_steps)
        started = time.perf_counter()
        tokenizer = ImageTokenizer.from_pretrained(args.tokenizer).eval()
        episodes, ids = tokenize_recording(config, tokenizer)
    except TokenizeError as exc:
        parser.error(str(exc))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_token_cache(args.out, episodes, ids)
    print(f"wrote {args.out}: {len(episodes)} episodes, {sum(e.num_steps for e in episodes)} steps, "
          f"{time.perf_counter() - started:.0f} s")
    return 0
