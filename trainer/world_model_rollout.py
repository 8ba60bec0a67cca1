"""Greedy world-model rollouts with transformers: the engine's decoding plan, token by token, batched.

Used to measure fidelity (eval-world-model) and to imagine training windows whose reward is then trained on the
model's own predicted observation (train-world-model --imagined-windows). The trainer never imports the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm
from transformers import DynamicCache, LlamaForCausalLM

from engine.layout import TokenLayout
from trainer.world_model_data import TokenizedEpisode, Window, WorldModelDataError, independent_view_mask, start_prefix

# Stored in the ablation's world_model/config.json; the served default never carries it.
INDEPENDENT_VIEWS_KEY = "vla_mbpo_independent_views"


@dataclass(frozen=True)
class Rollout:
    """Greedy imagination of one batch: codes [B, n, V, N] and success answers [B, n]."""

    codes: np.ndarray
    success: np.ndarray


def uses_independent_views(model: LlamaForCausalLM) -> bool:
    """Whether a checkpoint is the no-IVD ablation (flag stored in its config.json by the trainer)."""
    return bool(getattr(model.config, INDEPENDENT_VIEWS_KEY, False))


class GreedyImaginer:
    """Batched greedy rollouts with a KV cache, following layout.generation_plan() token by token."""

    def __init__(self, model: LlamaForCausalLM, layout: TokenLayout, independent_views: bool) -> None:
        self.model, self.layout, self.independent_views = model, layout, independent_views
        self.device = next(model.parameters()).device
        self.plan = layout.generation_plan()

    def _forward(self, new_tokens: torch.Tensor, new_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Appends new_tokens [B, q] (new_valid [B, q]: False for left padding) to the stream and returns the
        last position's logits [B, V]."""
        if new_valid is None:
            new_valid = torch.ones_like(new_tokens, dtype=torch.bool)
        self.history = torch.cat([self.history, new_tokens], dim=1)  # [B, K]
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        length, q = self.history.shape[1], new_tokens.shape[1]
        if self.independent_views:
            mask = independent_view_mask(self.layout, self.history, query_start=length - q)
        else:
            positions = torch.arange(length, device=self.device)
            mask = (positions[length - q:, None] >= positions[None, :])[None, None]
        # Padding is never attended; a padding query attends to itself so its softmax stays finite.
        eye = torch.arange(length, device=self.device)[None, length - q:, None] == torch.arange(
            length, device=self.device)[None, None, :]
        mask = (mask & self.valid[:, None, None, :]) | eye[:, None]
        position_ids = (torch.cumsum(self.valid.long(), dim=1) - 1).clamp(min=0)[:, length - q:]
        out = self.model(input_ids=new_tokens, attention_mask=mask, position_ids=position_ids,
                         past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def rollout(self, prefixes: Sequence[np.ndarray], actions: np.ndarray, given_view: int | None = None,
                given_codes: np.ndarray | None = None) -> Rollout:
        """prefixes: B token arrays (instruction + start observation); actions: [B, n, chunk_size, action_dim].

        given_view / given_codes ([B, n, N]): that view's block takes these codes instead of the model's argmax
        (e.g. the real head frame, to measure how much the wrist gains from a correct head block).
        """
        if (given_view is None) != (given_codes is None):
            raise WorldModelDataError("given_view and given_codes go together")
        layout, pad = self.layout, self.layout.special("pad")
        given_at = {}  # generated position -> code index, for the given view's block
        if given_view is not None:
            given_at = {int(p): i for i, p in enumerate(layout.view_code_positions()[given_view])}
            given_tokens = torch.from_numpy(np.asarray(given_codes, dtype=np.int64) + layout.image_offset).to(
                self.device)  # [B, n, N]
        width = max(len(p) for p in prefixes)
        padded = np.full((len(prefixes), width), pad, dtype=np.int64)
        valid = np.zeros((len(prefixes), width), dtype=bool)
        for row, prefix in enumerate(prefixes):  # left-pad so every row's generated tokens line up
            padded[row, width - len(prefix):], valid[row, width - len(prefix):] = prefix, True
        batch = len(prefixes)
        self.history = torch.empty(batch, 0, dtype=torch.long, device=self.device)
        self.valid = torch.empty(batch, 0, dtype=torch.bool, device=self.device)
        self.cache = DynamicCache()
        first = torch.from_numpy(padded).to(self.device)
        self._forward(first[:, :-1], torch.from_numpy(valid[:, :-1]).to(self.device))
        pending = first[:, -1:]  # the last prefix token is always real (left padding)
        forced, low, high = self.plan
        chunk_codes, chunk_success = [], []
        for chunk in range(actions.shape[1]):
            act = np.stack([layout.encode_actions(a) for a in actions[:, chunk]])
            pending = torch.cat([pending, torch.from_numpy(act).to(self.device)], dim=1)
            generated = []
            for position in range(len(forced)):
                if forced[position] >= 0:
                    token = torch.full((batch, 1), int(forced[position]), device=self.device)
                else:
                    logits = self._forward(pending)
                    token = logits[:, low[position]:high[position]].argmax(-1, keepdim=True) + int(low[position])
                    if position in given_at:
                        token = given_tokens[:, chunk, given_at[position], None]
                    pending = pending[:, :0]
                pending = torch.cat([pending, token], dim=1)
                generated.append(token)
            tokens = torch.cat(generated, dim=1).cpu().numpy()  # [B, generated_len]
            split = [layout.split_generated(row) for row in tokens]
            chunk_codes.append(np.stack([codes for codes, _ in split]))
            chunk_success.append(np.array([success for _, success in split]))
        return Rollout(np.stack(chunk_codes, axis=1), np.stack(chunk_success, axis=1))


def imagine_windows(imaginer: GreedyImaginer, episodes: Sequence[TokenizedEpisode], windows: Sequence[Window],
                    batch_size: int, description: str = "imagine windows") -> np.ndarray:
    """Greedy codes int64 [W, n, V, N] of each window, rolled out from its real start with its real actions.

    Every window must hold the same number of chunks n (one batched rollout plan).
    """
    layout = imaginer.layout
    num_chunks = {w.num_chunks for w in windows}
    if len(num_chunks) != 1:
        raise WorldModelDataError(f"windows to imagine must share one chunk count, got {sorted(num_chunks)}")
    n, k = num_chunks.pop(), layout.chunk_size
    codes = []
    for start in tqdm(range(0, len(windows), batch_size), desc=description, leave=False):
        part = windows[start:start + batch_size]
        prefixes = [start_prefix(layout, episodes[w.episode_index], w.start) for w in part]
        actions = np.stack([episodes[w.episode_index].actions[w.start:w.start + n * k].reshape(n, k, -1)
                            for w in part])
        codes.append(imaginer.rollout(prefixes, actions).codes)
    return np.concatenate(codes).astype(np.int64)
