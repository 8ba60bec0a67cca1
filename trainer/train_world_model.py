"""`vla-mbpo train-world-model`: a LlamaForCausalLM trained from scratch on token streams of recorded episodes.

The stream format is engine.layout's (DESIGN.md): instruction, real start observation, then up to
`max_chunks` chunks of (action chunk, next observation in IVD order, <rew> <yes|no>). Loss only on generated
positions, each restricted to the range the engine samples from (image codes, or yes/no), reward classes
balanced by loss weights. `--independent-views` trains the no-IVD ablation (a wrist block cannot attend to
the head block of the same generated observation). `--imagined-windows N --imagined-fraction F` (with
`--init-from`) also trains the reward on the model's own greedy imagination of N training windows, against the
real label: the answer RL reads is given on imagined frames, where a reward trained on real frames alone says
<yes> far too often.

Output: a checkpoint directory per DESIGN.md (layout.json, world_model/ in Hugging Face format, tokenizer/),
plus a work directory with `metrics.jsonl`, `train_state.pt` (resume with `--resume`) and `summary.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from engine.image_tokenizer import ImageTokenizer
from engine.layout import TokenLayout
from trainer.precision import PRECISIONS, precision_problem, uses_bf16_autocast
from trainer.tokenize_recording import TokenizeConfig, tokenize_recording
from trainer.world_model_data import (
    TARGET_IMAGE,
    TARGET_IMAGINED_REWARD,
    TARGET_REWARD,
    StreamBatch,
    TokenizedEpisode,
    Window,
    WorldModelDataError,
    build_stream,
    collate_streams,
    enumerate_windows,
    independent_view_mask,
    load_token_cache,
    reward_class_weights,
    save_token_cache,
    split_episode_ids,
    window_reward_counts,
)
from trainer.world_model_rollout import INDEPENDENT_VIEWS_KEY, GreedyImaginer, imagine_windows


@dataclass(frozen=True)
class WorldModelArchitecture:
    """Llama decoder shape. The default (~5M parameters) trains on 2 CPU cores within the hour."""

    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 704
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if min(self.hidden_size, self.num_layers, self.num_heads, self.num_kv_heads, self.intermediate_size) <= 0:
            raise ValueError(f"world model sizes must be > 0, got {self}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must divide by num_heads={self.num_heads}, which "
                             f"must divide by num_kv_heads={self.num_kv_heads}")

    def llama_config(self, layout: TokenLayout) -> LlamaConfig:
        # Positions beyond the layout's longest stream never occur; round up for a tidy number.
        max_positions = 64 * math.ceil(layout.max_stream_len / 64)
        return LlamaConfig(
            vocab_size=layout.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, max_position_embeddings=max_positions,
            rope_theta=self.rope_theta, bos_token_id=layout.special("bos"), eos_token_id=layout.special("pad"),
            pad_token_id=layout.special("pad"), tie_word_embeddings=False, attention_bias=False,
            attn_implementation="sdpa",
        )


@dataclass(frozen=True)
class WorldModelTrainConfig:
    """Everything one training run needs; built from the CLI at the entry point only."""

    out_dir: str
    tokenizer_dir: str
    # Recordings to train on, concatenated in this order (e.g. expert demos + the policy's replay buffer). Each
    # source i is read from token_caches[i] when that file exists, else tokenized from data_dirs[i] (and cached).
    data_dirs: tuple[str, ...] = ()
    token_caches: tuple[str, ...] = ()
    work_dir: str = "runs/world_model"
    architecture: WorldModelArchitecture = WorldModelArchitecture()
    steps: int = 800  # batch 8, 2 cores: 1.35 s/step measured in bf16 autocast (AVX512-BF16), 1.9 in float32
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    max_chunks: int = 2
    chunk_size: int = 8
    max_instruction_bytes: int = 96
    val_every: int = 10
    num_val_streams: int = 128
    independent_views: bool = False
    seed: int = 0
    device: str = "cpu"
    log_every: int = 25
    save_every: int = 250
    resume: bool = False
    stop_at_step: int | None = None  # end this run early (time-boxed sessions); `resume` continues it
    positive_fraction: float = 0.0  # share of each batch drawn from windows with a 'yes' (rare final frames)
    init_from: str | None = None  # a checkpoint directory whose world_model/ weights start this run
    # Reward trained on the model's own imagination: this many full-length training windows are rolled out
    # greedily (real actions) by the init_from weights once, and `imagined_fraction` of each batch is such a
    # stream, trained on its *real* reward label only. What RL sees is the answer on imagined frames.
    imagined_windows: int = 0
    imagined_fraction: float = 0.0
    save_dtype: str = "bfloat16"  # halves the shipped checkpoint; the engine computes in its own dtype
    precision: str = "auto"  # trainer/precision.py: bfloat16 autocast where native (CUDA, AVX512-BF16), else float32

    def __post_init__(self) -> None:
        problems = []
        if problem := precision_problem(self.precision):
            problems.append(problem)
        for name in ("steps", "batch_size", "max_chunks", "chunk_size", "num_val_streams", "log_every",
                     "save_every"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.lr < 1 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            problems.append(f"need 0 < lr < 1, 0 <= min_lr_ratio <= 1, warmup_steps >= 0; got {self.lr}, "
                            f"{self.min_lr_ratio}, {self.warmup_steps}")
        if not 0 <= self.positive_fraction < 1:
            problems.append(f"positive_fraction must lie in [0, 1), got {self.positive_fraction}")
        if self.imagined_windows < 0 or not 0 <= self.imagined_fraction < 1:
            problems.append(f"imagined_windows must be >= 0 and imagined_fraction in [0, 1), got "
                            f"{self.imagined_windows}, {self.imagined_fraction}")
        elif (self.imagined_windows > 0) != (self.imagined_fraction > 0):
            problems.append(f"imagined_windows ({self.imagined_windows}) and imagined_fraction "
                            f"({self.imagined_fraction}) must both be set or both be 0")
        elif self.imagined_windows and not self.init_from:
            problems.append("imagined_windows needs init_from: a model's imagination is only worth judging once "
                            "it is trained")
        if not self.data_dirs and not self.token_caches:
            problems.append("need data_dirs or token_caches")
        if self.data_dirs and self.token_caches and len(self.data_dirs) != len(self.token_caches):
            problems.append(f"data_dirs and token_caches pair up one to one, got {len(self.data_dirs)} and "
                            f"{len(self.token_caches)}")
        if self.save_dtype not in ("float32", "bfloat16"):
            problems.append(f"save_dtype must be float32 or bfloat16, got {self.save_dtype!r}")
        if problems:
            raise ValueError("invalid world-model training config: " + "; ".join(problems))


def prepare_tokens(config: WorldModelTrainConfig, tokenizer: ImageTokenizer, views: Sequence[str],
                   ) -> list[TokenizedEpisode]:
    """Tokenized episodes of every source, concatenated in source order, each from its cache when it exists."""
    num_sources = max(len(config.data_dirs), len(config.token_caches))
    episodes: list[TokenizedEpisode] = []
    for i in range(num_sources):
        cache = config.token_caches[i] if config.token_caches else None
        if cache and Path(cache).is_file():
            episodes += load_token_cache(cache)[0]
            continue
        if not config.data_dirs:
            raise WorldModelDataError(f"token cache {cache} does not exist and no recording was given to make it")
        tokenized, ids = tokenize_recording(TokenizeConfig(config.data_dirs[i]), tokenizer, views)
        if cache:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            save_token_cache(cache, tokenized, ids)
        episodes += tokenized
    return episodes


def restricted_losses(logits: torch.Tensor, batch: StreamBatch, layout: TokenLayout,
                      reward_weights: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image loss, balanced reward loss, imagined reward loss): cross-entropy over the allowed range of each
    generated position.

    logits: [B, L, V] predicting token i + 1 at position i. Image positions see only the codebook logits,
    reward positions only (no, yes), exactly the ranges the engine samples from. Answers on imagined
    observations are unweighted (zero when the batch has none): a class-balanced answer on frames the model
    cannot judge sits near even odds, i.e. says <yes> far more often than real success happens.
    """
    targets = batch.targets[:, 1:].to(logits.device)  # [B, L-1]
    next_ids = batch.token_ids[:, 1:].to(logits.device)
    logits = logits[:, :-1].float()
    image = targets == TARGET_IMAGE
    code_logits = logits[image][:, layout.image_offset:layout.image_offset + layout.codebook_size]
    image_loss = F.cross_entropy(code_logits, next_ids[image] - layout.image_offset)
    reward = targets == TARGET_REWARD
    answer_logits = logits[reward][:, [layout.no_id, layout.yes_id]]  # [R, 2]
    labels = (next_ids[reward] == layout.yes_id).long()
    weights = torch.tensor(reward_weights, device=logits.device)
    per_answer = F.cross_entropy(answer_logits, labels, reduction="none") * weights[labels]
    imagined = targets == TARGET_IMAGINED_REWARD
    imagined_loss = (F.cross_entropy(logits[imagined][:, [layout.no_id, layout.yes_id]],
                                     (next_ids[imagined] == layout.yes_id).long())
                     if imagined.any() else logits.new_zeros(()))
    return image_loss, per_answer.sum() / weights[labels].sum(), imagined_loss


def attention_mask_for(layout: TokenLayout, token_ids: torch.Tensor, independent_views: bool) -> torch.Tensor | None:
    """None (plain causal, IVD) or the no-IVD ablation's 4D boolean mask."""
    return independent_view_mask(layout, token_ids) if independent_views else None


def learning_rate(config: WorldModelTrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_window_ids(rng: np.random.Generator, num_windows: int, count: int, positive_ids: np.ndarray | None = None,
                      positive_fraction: float = 0.0) -> np.ndarray:
    """`count` window ids: uniform, except round(positive_fraction * count) drawn from `positive_ids`."""
    num_positive = int(round(positive_fraction * count)) if positive_ids is not None and len(positive_ids) else 0
    return np.concatenate([rng.integers(0, num_windows, size=count - num_positive),
                           positive_ids[rng.integers(0, len(positive_ids), size=num_positive)] if num_positive
                           else np.zeros(0, dtype=np.int64)])


@dataclass(frozen=True)
class ImaginedWindows:
    """Training windows (ids into the training window list) with the model's greedy codes [W, n, V, N]."""

    window_ids: np.ndarray
    codes: np.ndarray


def sample_batch(layout: TokenLayout, episodes: Sequence[TokenizedEpisode], windows: Sequence[Window],
                 rng: np.random.Generator, batch_size: int, positive_ids: np.ndarray | None = None,
                 positive_fraction: float = 0.0, imagined: ImaginedWindows | None = None,
                 imagined_fraction: float = 0.0) -> StreamBatch:
    """Real streams (sample_window_ids), the last round(imagined_fraction * batch_size) of them replaced by
    streams drawn uniformly from `imagined` (the model's own observations, reward-only targets)."""
    num_imagined = int(round(imagined_fraction * batch_size)) if imagined is not None else 0
    picks = sample_window_ids(rng, len(windows), batch_size - num_imagined, positive_ids, positive_fraction)
    streams = [build_stream(layout, episodes[windows[i].episode_index], windows[i].start, windows[i].num_chunks)
               for i in picks]
    for row in rng.integers(0, len(imagined.window_ids), size=num_imagined) if num_imagined else ():
        window = windows[int(imagined.window_ids[row])]
        streams.append(build_stream(layout, episodes[window.episode_index], window.start, window.num_chunks,
                                    imagined_codes=imagined.codes[row]))
    return collate_streams(layout, streams)


def prepare_imagined_windows(config: WorldModelTrainConfig, model: LlamaForCausalLM, layout: TokenLayout,
                             episodes: Sequence[TokenizedEpisode], windows: Sequence[Window]) -> ImaginedWindows:
    """`config.imagined_windows` full-length training windows drawn uniformly (the data's own success rate: the
    answer is trained calibrated, not balanced), rolled out greedily by the initial weights; cached in the work
    directory, so a resumed run judges the same ones."""
    cache = Path(config.work_dir) / "imagined_windows.npz"
    if config.resume and cache.is_file():
        data = np.load(cache)
        return ImaginedWindows(data["window_ids"], data["codes"].astype(np.int64))
    full_ids = np.flatnonzero([w.num_chunks == config.max_chunks for w in windows])
    ids = full_ids[sample_window_ids(np.random.default_rng(config.seed + 3), len(full_ids), config.imagined_windows)]
    imaginer = GreedyImaginer(model.eval(), layout, config.independent_views)
    codes = imagine_windows(imaginer, episodes, [windows[i] for i in ids], config.batch_size * 4)
    model.train()
    np.savez_compressed(cache, window_ids=ids, codes=codes.astype(np.int16))
    return ImaginedWindows(ids, codes)


def check_batches(layout: TokenLayout, episodes: Sequence[TokenizedEpisode], windows: Sequence[Window],
                  positive_ids: np.ndarray, count: int, rng: np.random.Generator, batch_size: int,
                  max_positives: int | None = None) -> list[StreamBatch]:
    """Fixed batches for a teacher-forced check: `count` uniform windows plus the windows in `positive_ids`
    (holding a 'yes'; at most `max_positives` of them, drawn with `rng`) not already picked. 'yes' is rare
    (final frames only): without them the balanced accuracy silently degenerates to the recall of 'no'."""
    picks = rng.choice(len(windows), size=min(count, len(windows)), replace=False)
    extra = np.setdiff1d(positive_ids, picks)
    if max_positives is not None and len(extra) > max_positives:
        extra = np.sort(rng.choice(extra, size=max_positives, replace=False))
    picks = np.concatenate([picks, extra]).astype(int)
    return [collate_streams(layout, (build_stream(layout, episodes[windows[i].episode_index], windows[i].start,
                                                  windows[i].num_chunks) for i in picks[s:s + batch_size]))
            for s in range(0, len(picks), batch_size)]


@torch.no_grad()
def validate(model: LlamaForCausalLM, layout: TokenLayout, batches: Sequence[StreamBatch],
             independent_views: bool, device: torch.device, prefix: str = "val") -> dict[str, float]:
    """Teacher-forced check: image-code loss and accuracy, reward balanced accuracy; keys start with `prefix`."""
    model.eval()
    image_loss_sum = image_correct = image_total = 0.0
    answers: list[tuple[bool, bool]] = []
    for batch in batches:
        ids = batch.token_ids.to(device)
        logits = model(input_ids=ids, attention_mask=attention_mask_for(layout, ids, independent_views)).logits
        targets, next_ids, logits = batch.targets[:, 1:].to(device), ids[:, 1:], logits[:, :-1].float()
        image = targets == TARGET_IMAGE
        code_logits = logits[image][:, layout.image_offset:layout.image_offset + layout.codebook_size]
        code_targets = next_ids[image] - layout.image_offset
        image_loss_sum += F.cross_entropy(code_logits, code_targets, reduction="sum").item()
        image_correct += (code_logits.argmax(-1) == code_targets).sum().item()
        image_total += code_targets.numel()
        reward = targets == TARGET_REWARD
        predicted = logits[reward][:, layout.yes_id] > logits[reward][:, layout.no_id]
        answers += list(zip((next_ids[reward] == layout.yes_id).tolist(), predicted.tolist(), strict=True))
    model.train()
    return {f"{prefix}_image_loss": image_loss_sum / image_total,
            f"{prefix}_image_accuracy": image_correct / image_total,
            f"{prefix}_reward_balanced_accuracy": balanced_accuracy(answers),
            f"{prefix}_num_yes_labels": sum(label for label, _ in answers),
            f"{prefix}_num_reward_labels": len(answers)}


def class_recalls(pairs: Sequence[tuple[bool, bool]]) -> dict[str, float | None]:
    """Recall of each reward class in (label, prediction) pairs: 'yes' (success caught) and 'no' (1 - the false
    success rate an RL learner would be paid); None for a class with no label (JSON has no nan)."""
    recalls: dict[str, float | None] = {}
    for cls, name in ((True, "yes_recall"), (False, "no_recall")):
        hits = [pred == label for label, pred in pairs if label == cls]
        recalls[name] = sum(hits) / len(hits) if hits else None
    return recalls


def balanced_accuracy(pairs: Sequence[tuple[bool, bool]]) -> float:
    """Mean of per-class recall over the classes present in (label, prediction) pairs."""
    present = [r for r in class_recalls(pairs).values() if r is not None]
    return float(np.mean(present)) if present else float("nan")


def save_checkpoint(out_dir: Path, layout: TokenLayout, model: LlamaForCausalLM, tokenizer_dir: Path,
                    dtype: torch.dtype) -> None:
    """Writes layout.json, world_model/ (transformers format, safetensors) and a copy of tokenizer/."""
    out_dir.mkdir(parents=True, exist_ok=True)
    layout.save(out_dir / "layout.json")
    copy.deepcopy(model).to(dtype).save_pretrained(out_dir / "world_model")
    target = out_dir / "tokenizer"
    if target.resolve() != tokenizer_dir.resolve():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(tokenizer_dir, target)


def load_initial_weights(checkpoint: str | Path, layout: TokenLayout, llama_config: LlamaConfig,
                         ) -> dict[str, torch.Tensor]:
    """float32 weights of `<checkpoint>/world_model`; its layout and shape must equal this run's."""
    checkpoint = Path(checkpoint)
    if TokenLayout.load(checkpoint / "layout.json") != layout:
        raise ValueError(f"{checkpoint / 'layout.json'}: layout differs from this run's; cannot start from it")
    source = LlamaForCausalLM.from_pretrained(checkpoint / "world_model", dtype=torch.float32)
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size"):
        if getattr(source.config, name) != getattr(llama_config, name):
            raise ValueError(f"{checkpoint / 'world_model'}: {name}={getattr(source.config, name)} but this run "
                             f"has {getattr(llama_config, name)}")
    return source.state_dict()


def make_layout(config: WorldModelTrainConfig, tokenizer: ImageTokenizer, episodes: Sequence[TokenizedEpisode],
                ) -> TokenLayout:
    action_dim = episodes[0].actions.shape[1]
    size = tokenizer.config.image_size
    return TokenLayout(codebook_size=tokenizer.config.codebook_size, tokens_per_view=tokenizer.config.tokens_per_view,
                       image_height=size, image_width=size, chunk_size=config.chunk_size, action_dim=action_dim,
                       action_low=(-1.0,) * action_dim, action_high=(1.0,) * action_dim,
                       max_chunks_per_branch=config.max_chunks, max_instruction_bytes=config.max_instruction_bytes)


def train(config: WorldModelTrainConfig) -> dict:
    """Runs training to `config.steps`, writes the checkpoint, returns the summary (also in summary.json)."""
    device = torch.device(config.device)
    work_dir, out_dir = Path(config.work_dir), Path(config.out_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = ImageTokenizer.from_pretrained(config.tokenizer_dir, device=device)
    episodes = prepare_tokens(config, tokenizer, ("head", "wrist"))
    layout = make_layout(config, tokenizer, episodes)
    train_ids, val_ids = split_episode_ids(len(episodes), config.val_every)
    train_eps, val_eps = [episodes[i] for i in train_ids], [episodes[i] for i in val_ids]
    k = layout.chunk_size
    train_windows = enumerate_windows(train_eps, k, config.max_chunks)
    val_windows = enumerate_windows(val_eps, layout.chunk_size, config.max_chunks)
    if not train_windows or not val_windows:
        raise WorldModelDataError(f"no training windows: episodes shorter than chunk_size={layout.chunk_size}")
    reward_weights = reward_class_weights(train_eps, train_windows, k, config.positive_fraction)
    positive_ids = np.flatnonzero(window_reward_counts(train_eps, train_windows, k)[:, 1] > 0)
    val_positive_ids = np.flatnonzero(window_reward_counts(val_eps, val_windows, k)[:, 1] > 0)
    val_batches = check_batches(layout, val_eps, val_windows, val_positive_ids, config.num_val_streams,
                                np.random.default_rng(config.seed + 1), config.batch_size)
    # The same check on training windows: a reward right here but wrong on held-out episodes was memorized.
    train_check_batches = check_batches(layout, train_eps, train_windows, positive_ids, config.num_val_streams,
                                        np.random.default_rng(config.seed + 2), config.batch_size,
                                        max_positives=config.num_val_streams)

    torch.manual_seed(config.seed)
    llama_config = config.architecture.llama_config(layout)
    if config.independent_views:  # marks the ablation so evaluation decodes it with the same mask
        setattr(llama_config, INDEPENDENT_VIEWS_KEY, True)
    model = LlamaForCausalLM(llama_config)
    if config.init_from:
        model.load_state_dict(load_initial_weights(config.init_from, layout, llama_config))
    model = model.to(device)
    imagined = (prepare_imagined_windows(config, model, layout, train_eps, train_windows)
                if config.imagined_windows else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.95))
    rng = np.random.default_rng(config.seed)
    state_path, metrics_path = work_dir / "train_state.pt", work_dir / "metrics.jsonl"
    step = 0
    if config.resume and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        step = state["step"]
    elif metrics_path.exists():
        metrics_path.unlink()
    num_params = sum(p.numel() for p in model.parameters())
    use_bf16 = uses_bf16_autocast(config.precision, device)
    started, tokens_seen = time.perf_counter(), 0
    model.train()
    progress = tqdm(total=config.steps, initial=step, desc="world model", leave=False)
    last_step = config.steps if config.stop_at_step is None else min(config.steps, config.stop_at_step)
    while step < last_step:
        batch = sample_batch(layout, train_eps, train_windows, rng, config.batch_size, positive_ids,
                             config.positive_fraction, imagined, config.imagined_fraction)
        ids = batch.token_ids.to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=ids, attention_mask=attention_mask_for(layout, ids, config.independent_views)
                           ).logits
        image_loss, reward_loss, imagined_reward_loss = restricted_losses(logits, batch, layout, reward_weights)
        loss = image_loss + reward_loss + imagined_reward_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        step += 1
        tokens_seen += ids.numel()
        progress.update(1)
        if step % config.log_every == 0 or step == config.steps:
            elapsed = time.perf_counter() - started
            record = {"step": step, "loss": loss.item(), "image_loss": image_loss.item(),
                      "reward_loss": reward_loss.item(), "imagined_reward_loss": imagined_reward_loss.item(),
                      "lr": learning_rate(config, step - 1),
                      "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed}
            progress.set_postfix(loss=f"{record['loss']:.3f}")
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if step % config.save_every == 0 or step == last_step:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "rng": rng.bit_generator.state, "step": step}, state_path)
    progress.close()
    train_seconds = time.perf_counter() - started
    summary = {"num_parameters": num_params, "steps": step, "train_seconds": train_seconds,
               "device": str(device), "bf16_autocast": use_bf16,
               "num_train_episodes": len(train_ids), "num_val_episodes": len(val_ids),
               "num_train_windows": len(train_windows), "reward_weights_no_yes": list(reward_weights),
               "independent_views": config.independent_views, "max_stream_len": layout.max_stream_len,
               **validate(model, layout, val_batches, config.independent_views, device),
               **validate(model, layout, train_check_batches, config.independent_views, device, prefix="train"),
               "config": asdict(config)}
    save_checkpoint(out_dir, layout, model, Path(config.tokenizer_dir), getattr(torch, config.save_dtype))
    (work_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    defaults = WorldModelTrainConfig(out_dir="", tokenizer_dir="", data_dirs=("",))
    arch = WorldModelArchitecture()
    parser = argparse.ArgumentParser(prog="vla-mbpo train-world-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=[], metavar="DIR",
                        help="recording directories made by `vla-mbpo collect` / `evaluate --record-to`, "
                             "trained on together (e.g. expert demos + the policy's replay buffer)")
    parser.add_argument("--tokenizer", required=True, help="image tokenizer directory (train-tokenizer --out)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--token-cache", nargs="+", default=[], metavar="NPZ",
                        help="tokenized-episode caches (.npz), one per --data directory: read if present, else "
                             "written; alone, every one must exist")
    parser.add_argument("--work-dir", default=defaults.work_dir, help="metrics.jsonl, train_state.pt, summary")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--max-chunks", type=int, default=defaults.max_chunks, help="chunks per stream (H)")
    parser.add_argument("--hidden-size", type=int, default=arch.hidden_size)
    parser.add_argument("--num-layers", type=int, default=arch.num_layers)
    parser.add_argument("--num-heads", type=int, default=arch.num_heads)
    parser.add_argument("--num-kv-heads", type=int, default=arch.num_kv_heads)
    parser.add_argument("--intermediate-size", type=int, default=arch.intermediate_size)
    parser.add_argument("--independent-views", action="store_true",
                        help="no-IVD ablation: wrist block cannot see the generated head block")
    parser.add_argument("--positive-fraction", type=float, default=defaults.positive_fraction,
                        help="share of each batch drawn from windows with a 'yes' reward label")
    parser.add_argument("--init-from", help="start from this checkpoint's world_model/ weights (same layout)")
    parser.add_argument("--imagined-windows", type=int, default=defaults.imagined_windows,
                        help="training windows the --init-from model imagines once (greedy, real actions) so the "
                             "reward also learns on its own predicted frames (their real label)")
    parser.add_argument("--imagined-fraction", type=float, default=defaults.imagined_fraction,
                        help="share of each batch drawn from the imagined windows (reward loss only)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--save-every", type=int, default=defaults.save_every)
    parser.add_argument("--save-dtype", default=defaults.save_dtype, choices=("float32", "bfloat16"))
    parser.add_argument("--precision", default=defaults.precision, choices=PRECISIONS,
                        help="auto: bfloat16 autocast on CUDA and on CPUs with native bfloat16, else float32")
    parser.add_argument("--resume", action="store_true", help="continue from <work-dir>/train_state.pt")
    parser.add_argument("--stop-at-step", type=int, help="end this run early at this step; --resume continues")
    parser.add_argument("--threads", type=positive_int,
                        help="torch CPU threads (default: torch's choice); 1 leaves the other cores to others")
    return parser


def positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    architecture = WorldModelArchitecture(hidden_size=args.hidden_size, num_layers=args.num_layers,
                                          num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                                          intermediate_size=args.intermediate_size)
    config = WorldModelTrainConfig(
        out_dir=args.out, tokenizer_dir=args.tokenizer, data_dirs=tuple(args.data),
        token_caches=tuple(args.token_cache), work_dir=args.work_dir, architecture=architecture, steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr, warmup_steps=args.warmup_steps, max_chunks=args.max_chunks,
        independent_views=args.independent_views, seed=args.seed, device=args.device, save_every=args.save_every,
        save_dtype=args.save_dtype, resume=args.resume, positive_fraction=args.positive_fraction,
        init_from=args.init_from, imagined_windows=args.imagined_windows, imagined_fraction=args.imagined_fraction,
        stop_at_step=args.stop_at_step, precision=args.precision)
    summary = train(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":  # build-default runs the ablation as a second process this way
    import sys

    sys.exit(main(sys.argv[1:]))
