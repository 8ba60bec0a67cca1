"""Token streams for world-model training, built from recorded episodes with the shared TokenLayout.

An episode (trainer.data format) has per-view frames uint8 [T+1, H, W, 3], actions float32 [T, action_dim],
a latched success flag bool [T+1] and an instruction. The image tokenizer turns it into a TokenizedEpisode;
every stride-1 window (episode, start t) then becomes one training stream

    instruction, observation o_t, then for j = 1..n: actions a_{t+(j-1)k : t+jk}, observation o_{t+jk}, <rew> <yes|no>

with n = min(max_chunks, (T - t) // k) >= 1: windows near the episode end keep the chunks that fit (no padded
actions), so the final, successful frames are still targets. Reward label = success[t + jk] (latched): in a
recording filmed on after success (collect --post-success-steps) every chunk ending after the first success
is a <yes>, and windows that start after it answer <yes> throughout, as the engine's latched `done` expects.

Only the positions the model generates at serving time are trained: image codes of predicted observations and
the yes/no answer; forced markers, the instruction, the actions and the real start observation are context.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.image_tokenizer import ImageTokenizer
from engine.layout import TokenLayout

# What a stream position is, as a prediction target of the position before it.
TARGET_NONE, TARGET_IMAGE, TARGET_REWARD = 0, 1, 2
# The reward answer on the model's own imagined observation: trained on the real label, unweighted (calibrated).
TARGET_IMAGINED_REWARD = 3
# Per-position view tags for attention masks: which block of a *generated* observation a token belongs to.
VIEW_NONE = -1
CACHE_FORMAT = 1


class WorldModelDataError(ValueError):
    """Episodes or a token cache that cannot make training streams; the message names the problem."""


@dataclass(frozen=True)
class TokenizedEpisode:
    """One episode with its frames replaced by image codes."""

    instruction: str
    codes: np.ndarray  # int64 [T+1, num_views, tokens_per_view]
    actions: np.ndarray  # float32 [T, action_dim]
    success: np.ndarray  # bool [T+1], latched

    def __post_init__(self) -> None:
        steps = self.actions.shape[0]
        if self.codes.ndim != 3 or self.codes.shape[0] != steps + 1 or self.success.shape != (steps + 1,):
            raise WorldModelDataError(f"episode arrays disagree: codes {self.codes.shape}, actions "
                                      f"{self.actions.shape}, success {self.success.shape} (need T+1, T, T+1)")

    @property
    def num_steps(self) -> int:
        return self.actions.shape[0]


@dataclass(frozen=True)
class Window:
    """A training stream: `num_chunks` chunks of `chunk_size` steps from `start` in episode `episode_index`."""

    episode_index: int
    start: int
    num_chunks: int


@dataclass(frozen=True)
class Stream:
    """One encoded stream. targets[i] says how token i is trained (predicted from position i - 1)."""

    token_ids: np.ndarray  # int64 [L]
    targets: np.ndarray  # int8 [L]: TARGET_NONE / TARGET_IMAGE / TARGET_REWARD


def load_recorded_episodes(data_dir: str | Path) -> list:
    """All episodes of a recording made by `vla-mbpo collect` (trainer.data format)."""
    from trainer.data import EpisodeDataset  # the env helper's loader; imported here to keep tests light

    dataset = EpisodeDataset(data_dir)
    return [dataset.load(i) for i in range(len(dataset))]


def split_episode_ids(num_episodes: int, val_every: int = 10) -> tuple[list[int], list[int]]:
    """Train/validation split by episode: episode i is held out iff i % val_every == val_every - 1.

    Deterministic and interleaved, so every task of a multi-task recording lands in both parts.
    """
    if num_episodes < 2 or val_every < 2:
        raise WorldModelDataError(f"need >= 2 episodes and val_every >= 2 to split, got {num_episodes}, {val_every}")
    val = [i for i in range(num_episodes) if i % val_every == val_every - 1] or [num_episodes - 1]
    held = set(val)
    return [i for i in range(num_episodes) if i not in held], val


def episode_frames(episode, views: Sequence[str]) -> np.ndarray:
    """uint8 [T+1, num_views, H, W, 3] from an episode object with one attribute per view name."""
    try:
        return np.stack([np.asarray(getattr(episode, view)) for view in views], axis=1)
    except AttributeError as exc:
        raise WorldModelDataError(f"episode has no frames for a layout view: {exc}") from None


@torch.no_grad()
def tokenize_episode(tokenizer: ImageTokenizer, episode, views: Sequence[str], batch_size: int = 256,
                     ) -> TokenizedEpisode:
    """Encodes every frame of every view of one episode."""
    frames = episode_frames(episode, views)  # [T+1, V, H, W, 3]
    flat = frames.reshape(-1, *frames.shape[2:])
    codes = torch.cat([tokenizer.encode(flat[i:i + batch_size]).cpu() for i in range(0, len(flat), batch_size)])
    return TokenizedEpisode(
        instruction=str(episode.instruction),
        codes=codes.numpy().reshape(frames.shape[0], frames.shape[1], -1).astype(np.int64),
        actions=np.asarray(episode.actions, dtype=np.float32),
        success=np.asarray(episode.success, dtype=bool),
    )


def save_token_cache(path: str | Path, episodes: Sequence[TokenizedEpisode], episode_ids: Sequence[int]) -> None:
    """One compressed .npz holding all tokenized episodes (small: the GPU run carries it instead of frames)."""
    lengths = np.array([e.num_steps for e in episodes], dtype=np.int64)
    np.savez_compressed(
        Path(path),
        format=np.array(CACHE_FORMAT),
        episode_ids=np.asarray(episode_ids, dtype=np.int64),
        lengths=lengths,
        codes=np.concatenate([e.codes for e in episodes]).astype(np.int16),
        actions=np.concatenate([e.actions for e in episodes]),
        success=np.concatenate([e.success for e in episodes]),
        instructions=np.array(json.dumps([e.instruction for e in episodes])),
    )


def load_token_cache(path: str | Path) -> tuple[list[TokenizedEpisode], list[int]]:
    """Inverse of save_token_cache -> (episodes, their ids in the recording)."""
    path = Path(path)
    try:
        data = np.load(path)
        if int(data["format"]) != CACHE_FORMAT:
            raise WorldModelDataError(f"{path}: token cache format {int(data['format'])} != {CACHE_FORMAT}")
        lengths, codes, actions, success = data["lengths"], data["codes"], data["actions"], data["success"]
        instructions = json.loads(str(data["instructions"]))
        episode_ids = data["episode_ids"].tolist()
    except (OSError, KeyError, ValueError) as exc:
        if isinstance(exc, WorldModelDataError):
            raise
        raise WorldModelDataError(f"{path}: not a readable token cache ({exc})") from None
    episodes, frame, step = [], 0, 0
    for length, instruction in zip(lengths.tolist(), instructions, strict=True):
        episodes.append(TokenizedEpisode(instruction, codes[frame:frame + length + 1].astype(np.int64),
                                         actions[step:step + length], success[frame:frame + length + 1]))
        frame, step = frame + length + 1, step + length
    return episodes, episode_ids


def enumerate_windows(episodes: Sequence[TokenizedEpisode], chunk_size: int, max_chunks: int) -> list[Window]:
    """Every stride-1 start with at least one whole chunk ahead; chunks past the episode end are dropped."""
    windows = []
    for index, episode in enumerate(episodes):
        for start in range(episode.num_steps - chunk_size + 1):
            windows.append(Window(index, start, min(max_chunks, (episode.num_steps - start) // chunk_size)))
    return windows


def start_prefix(layout: TokenLayout, episode: TokenizedEpisode, start: int) -> np.ndarray:
    """The stream's context before the first action chunk: the instruction and the real observation `start`."""
    return np.concatenate([layout.encode_instruction(episode.instruction),
                           layout.encode_observation(episode.codes[start])])


def build_stream(layout: TokenLayout, episode: TokenizedEpisode, start: int, num_chunks: int,
                 imagined_codes: np.ndarray | None = None) -> Stream:
    """The token stream of one window, exactly as the engine will see it at serving time.

    imagined_codes (int [num_chunks, num_views, tokens_per_view], optional): the model's own prediction of the
    observations, put in place of the real ones. Their image positions are then context, not targets; the
    reward keeps the *real* label (TARGET_IMAGINED_REWARD), so the answer learns to judge the model's
    imagination by what really happened.
    """
    k = layout.chunk_size
    if num_chunks < 1 or start < 0 or start + num_chunks * k > episode.num_steps:
        raise WorldModelDataError(f"window start={start} num_chunks={num_chunks} does not fit an episode of "
                                  f"{episode.num_steps} steps with chunk_size={k}")
    expected_shape = (num_chunks, *episode.codes.shape[1:])
    if imagined_codes is not None and tuple(imagined_codes.shape) != expected_shape:
        raise WorldModelDataError(f"imagined codes have shape {tuple(imagined_codes.shape)}, the window needs "
                                  f"{expected_shape}")
    parts = [start_prefix(layout, episode, start)]
    targets = [np.zeros(len(parts[0]), dtype=np.int8)]
    forced, _, _ = layout.generation_plan()
    generated_targets = np.where(forced >= 0, TARGET_NONE, TARGET_IMAGE).astype(np.int8)
    generated_targets[-1] = TARGET_REWARD
    reward_only_targets = np.where(generated_targets == TARGET_REWARD, TARGET_IMAGINED_REWARD,
                                   TARGET_NONE).astype(np.int8)
    for j in range(num_chunks):
        step = start + (j + 1) * k
        actions = layout.encode_actions(episode.actions[step - k:step])
        observed = episode.codes[step] if imagined_codes is None else imagined_codes[j]
        generated = np.concatenate([layout.encode_observation(observed),
                                    layout.encode_reward(bool(episode.success[step]))])
        parts += [actions, generated]
        targets += [np.zeros(len(actions), dtype=np.int8),
                    generated_targets if imagined_codes is None else reward_only_targets]
    return Stream(np.concatenate(parts).astype(np.int64), np.concatenate(targets))


def view_tags(layout: TokenLayout, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: (observation index, view index inside a *generated* observation or VIEW_NONE).

    token_ids: [B, L]. The observation index counts <obs> markers (0 = the real start observation). A view
    block is its <view:NAME> marker plus its codes. Derived from the tokens alone, so training and decoding
    (where the stream grows token by token) tag positions identically.
    """
    obs_index = torch.cumsum(token_ids == layout.special("obs"), dim=1) - 1  # [B, L]
    marker_view = torch.full_like(token_ids, VIEW_NONE)
    for index, name in enumerate(layout.views):
        marker_view = torch.where(token_ids == layout.special(f"view:{name}"), index, marker_view)
    is_marker = marker_view >= 0
    is_code = (token_ids >= layout.image_offset) & (token_ids < layout.image_offset + layout.codebook_size)
    positions = torch.arange(token_ids.shape[1], device=token_ids.device).expand_as(token_ids)
    # Codes belong to the view whose marker came last; in a stream nothing else sits inside a view block.
    last_marker = torch.cummax(torch.where(is_marker, positions, 0), dim=1).values  # [B, L]
    view = torch.where(is_marker | is_code, torch.gather(marker_view, 1, last_marker), VIEW_NONE)
    view = torch.where(obs_index >= 1, view, VIEW_NONE)
    return obs_index, view


def independent_view_mask(layout: TokenLayout, token_ids: torch.Tensor, query_start: int = 0) -> torch.Tensor:
    """Boolean attention mask [B, 1, Q, K] (True = may attend) for the no-IVD ablation.

    Causal, except that a token of view v > 0 of a generated observation may not see the earlier views of the
    *same* observation: each view is predicted from the history alone, not from the freshly generated head
    view. token_ids: [B, K] the whole stream so far; queries are positions query_start..K-1.
    """
    obs_index, view = view_tags(layout, token_ids)  # [B, K]
    length = token_ids.shape[1]
    positions = torch.arange(length, device=token_ids.device)
    causal = positions[query_start:, None] >= positions[None, :]  # [Q, K]
    q_obs, q_view = obs_index[:, query_start:, None], view[:, query_start:, None]  # [B, Q, 1]
    k_obs, k_view = obs_index[:, None, :], view[:, None, :]  # [B, 1, K]
    hidden = (q_obs == k_obs) & (q_view > 0) & (k_view >= 0) & (k_view < q_view)
    return (causal[None] & ~hidden)[:, None]


@dataclass(frozen=True)
class StreamBatch:
    token_ids: torch.Tensor  # int64 [B, L], right-padded with <pad>
    targets: torch.Tensor  # int8 [B, L]; padding is TARGET_NONE


def collate_streams(layout: TokenLayout, streams: Iterable[Stream]) -> StreamBatch:
    streams = list(streams)
    length = max(len(s.token_ids) for s in streams)
    token_ids = np.full((len(streams), length), layout.special("pad"), dtype=np.int64)
    targets = np.zeros((len(streams), length), dtype=np.int8)
    for row, stream in enumerate(streams):
        token_ids[row, :len(stream.token_ids)] = stream.token_ids
        targets[row, :len(stream.targets)] = stream.targets
    return StreamBatch(torch.from_numpy(token_ids), torch.from_numpy(targets))


def window_reward_counts(episodes: Sequence[TokenizedEpisode], windows: Sequence[Window],
                         chunk_size: int) -> np.ndarray:
    """[num_windows, 2] int: the number of 'no' and 'yes' reward labels in each window's stream."""
    counts = np.zeros((len(windows), 2), dtype=np.int64)
    for row, window in enumerate(windows):
        labels = episodes[window.episode_index].success[window.start + chunk_size * np.arange(1, window.num_chunks + 1)]
        counts[row] = (len(labels) - int(labels.sum()), int(labels.sum()))
    return counts


def reward_class_weights(episodes: Sequence[TokenizedEpisode], windows: Sequence[Window], chunk_size: int,
                         positive_fraction: float = 0.0) -> tuple[float, float]:
    """(weight of a 'no' label, weight of a 'yes' label) so both classes carry equal expected loss under the
    sampling: windows drawn uniformly, except a `positive_fraction` of each batch drawn from windows that hold
    a 'yes'. Raises if a class is missing: a reward head trained on one class is useless."""
    counts = window_reward_counts(episodes, windows, chunk_size)
    no, yes = counts.sum(axis=0)
    if yes == 0 or no == 0:
        raise WorldModelDataError(f"reward labels need both classes, got {yes} yes and {no} no over "
                                  f"{len(windows)} windows (no successful episode recorded?)")
    expected = counts.mean(axis=0)
    if positive_fraction > 0:
        expected = (1 - positive_fraction) * expected + positive_fraction * counts[counts[:, 1] > 0].mean(axis=0)
    total = expected.sum()
    return float(total / (2 * expected[0])), float(total / (2 * expected[1]))
