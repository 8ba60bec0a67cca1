"""The token layout: the world-model contract between training and serving (DESIGN.md).

One vocabulary: image codes | action bins | text bytes | special tokens. A branch is one stream:

    <bos> <instr> bytes </instr>
    <obs> <view:head> h1..hN <view:wrist> w1..wN                   real start observation
    <act> a1..a(k*d)                                                 the client's action chunk
    <obs> <view:head> h1..hN <view:wrist> w1..wN <rew> <yes|no>      generated (IVD order), then reward
    ...

Offsets and sizes live in the checkpoint's `layout.json`; this module is the only place that maps
between those numbers and token ids. Torch-free: numpy only, so the trainer may import it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

LAYOUT_VERSION = 1
NUM_ACTION_BINS = 256
NUM_TEXT_BYTES = 256
FIXED_SPECIALS = ("bos", "instr", "/instr", "obs", "act", "rew", "yes", "no", "pad")


class LayoutError(ValueError):
    """A layout.json that is malformed or does not match what the caller expects."""


@dataclass(frozen=True)
class TokenLayout:
    """Vocabulary and stream structure of one world model. Validated on construction."""

    codebook_size: int
    tokens_per_view: int
    views: tuple[str, ...] = ("head", "wrist")
    image_height: int = 64
    image_width: int = 64
    chunk_size: int = 8
    action_dim: int = 4
    action_low: tuple[float, ...] = (-1.0, -1.0, -1.0, -1.0)
    action_high: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    max_chunks_per_branch: int = 4
    max_instruction_bytes: int = 96
    version: int = LAYOUT_VERSION
    special_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "views", tuple(self.views))
        object.__setattr__(self, "action_low", tuple(float(x) for x in self.action_low))
        object.__setattr__(self, "action_high", tuple(float(x) for x in self.action_high))
        problems = []
        if self.version != LAYOUT_VERSION:
            problems.append(f"version {self.version} != supported {LAYOUT_VERSION}")
        for name in ("codebook_size", "tokens_per_view", "image_height", "image_width", "chunk_size",
                     "action_dim", "max_chunks_per_branch", "max_instruction_bytes"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.views or len(set(self.views)) != len(self.views):
            problems.append(f"views must be non-empty and unique, got {list(self.views)}")
        if len(self.action_low) != self.action_dim or len(self.action_high) != self.action_dim:
            problems.append(f"action_low/high need action_dim={self.action_dim} entries, got "
                            f"{len(self.action_low)}/{len(self.action_high)}")
        elif any(not lo < hi for lo, hi in zip(self.action_low, self.action_high, strict=True)):
            problems.append(f"action_low must be < action_high, got {self.action_low} / {self.action_high}")
        if problems:
            raise LayoutError("invalid token layout: " + "; ".join(problems))
        names = FIXED_SPECIALS + tuple(f"view:{v}" for v in self.views)
        object.__setattr__(self, "special_names", names)

    # ---- vocabulary ---------------------------------------------------------------------------
    @property
    def image_offset(self) -> int:
        return 0

    @property
    def action_offset(self) -> int:
        return self.codebook_size

    @property
    def text_offset(self) -> int:
        return self.action_offset + NUM_ACTION_BINS

    @property
    def special_offset(self) -> int:
        return self.text_offset + NUM_TEXT_BYTES

    @property
    def vocab_size(self) -> int:
        return self.special_offset + len(self.special_names)

    def special(self, name: str) -> int:
        """Token id of a special token, e.g. `special("obs")` or `special("view:head")`."""
        try:
            return self.special_offset + self.special_names.index(name)
        except ValueError:
            raise LayoutError(f"unknown special token {name!r}; known: {list(self.special_names)}") from None

    @property
    def yes_id(self) -> int:
        return self.special("yes")

    @property
    def no_id(self) -> int:
        return self.special("no")

    # ---- stream lengths -----------------------------------------------------------------------
    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def observation_len(self) -> int:
        """<obs> then, per view, <view:NAME> + tokens_per_view codes."""
        return 1 + self.num_views * (1 + self.tokens_per_view)

    @property
    def action_len(self) -> int:
        """<act> then chunk_size * action_dim bins."""
        return 1 + self.chunk_size * self.action_dim

    @property
    def generated_len(self) -> int:
        """Tokens the model produces per chunk: the observation, <rew>, <yes|no>."""
        return self.observation_len + 2

    @property
    def chunk_len(self) -> int:
        return self.action_len + self.generated_len

    def prefix_len(self, instruction_len_bytes: int) -> int:
        return 3 + instruction_len_bytes + self.observation_len

    @property
    def max_stream_len(self) -> int:
        return self.prefix_len(self.max_instruction_bytes) + self.max_chunks_per_branch * self.chunk_len

    # ---- encoding -----------------------------------------------------------------------------
    def encode_instruction(self, instruction: str) -> np.ndarray:
        """<bos> <instr> utf-8 bytes </instr>. Raises LayoutError on empty or oversize text."""
        data = instruction.encode("utf-8")
        if not data:
            raise LayoutError("instruction is empty")
        if len(data) > self.max_instruction_bytes:
            raise LayoutError(f"instruction is {len(data)} UTF-8 bytes, more than max_instruction_bytes="
                              f"{self.max_instruction_bytes}")
        body = np.frombuffer(data, dtype=np.uint8).astype(np.int64) + self.text_offset
        return np.concatenate([[self.special("bos"), self.special("instr")], body, [self.special("/instr")]])

    def encode_observation(self, codes: np.ndarray) -> np.ndarray:
        """codes: [num_views, tokens_per_view] image codes in view order -> observation tokens."""
        codes = np.asarray(codes)
        if codes.shape != (self.num_views, self.tokens_per_view):
            raise LayoutError(f"observation codes have shape {codes.shape}, expected "
                              f"{(self.num_views, self.tokens_per_view)}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise LayoutError(f"image codes must lie in [0, {self.codebook_size}), got "
                              f"[{codes.min()}, {codes.max()}]")
        parts: list[np.ndarray] = [np.array([self.special("obs")])]
        for view, view_codes in zip(self.views, codes, strict=True):
            parts.append(np.array([self.special(f"view:{view}")]))
            parts.append(view_codes.astype(np.int64) + self.image_offset)
        return np.concatenate(parts)

    def bin_actions(self, actions: np.ndarray) -> np.ndarray:
        """[chunk_size, action_dim] floats -> bins in [0, 256), clipped to [low, high], time-major."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.shape != (self.chunk_size, self.action_dim):
            raise LayoutError(f"action chunk has shape {actions.shape}, expected "
                              f"{(self.chunk_size, self.action_dim)}")
        if not np.all(np.isfinite(actions)):
            raise LayoutError("action chunk contains NaN or inf")
        low, high = np.asarray(self.action_low), np.asarray(self.action_high)
        scaled = (np.clip(actions, low, high) - low) / (high - low) * NUM_ACTION_BINS
        return np.clip(np.floor(scaled), 0, NUM_ACTION_BINS - 1).astype(np.int64)

    def unbin_actions(self, bins: np.ndarray) -> np.ndarray:
        """Inverse of bin_actions up to quantisation: the centre of each bin."""
        low, high = np.asarray(self.action_low), np.asarray(self.action_high)
        return low + (np.asarray(bins, dtype=np.float64) + 0.5) * (high - low) / NUM_ACTION_BINS

    def encode_actions(self, actions: np.ndarray) -> np.ndarray:
        """<act> then the binned chunk, time-major."""
        bins = self.bin_actions(actions).reshape(-1) + self.action_offset
        return np.concatenate([[self.special("act")], bins])

    def encode_reward(self, success: bool) -> np.ndarray:
        return np.array([self.special("rew"), self.yes_id if success else self.no_id], dtype=np.int64)

    # ---- decoding plan ------------------------------------------------------------------------
    def generation_plan(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the model emits per chunk, position by position.

        Returns (forced, low, high), each [generated_len]: forced[i] >= 0 is a marker token appended
        without sampling; otherwise position i is sampled from token ids in [low[i], high[i]).
        """
        forced, low, high = [], [], []

        def force(token: int) -> None:
            forced.append(token), low.append(0), high.append(0)

        def sample(lo: int, hi: int, n: int) -> None:
            forced.extend([-1] * n), low.extend([lo] * n), high.extend([hi] * n)

        force(self.special("obs"))
        for view in self.views:
            force(self.special(f"view:{view}"))
            sample(self.image_offset, self.image_offset + self.codebook_size, self.tokens_per_view)
        force(self.special("rew"))
        sample(min(self.yes_id, self.no_id), max(self.yes_id, self.no_id) + 1, 1)
        return (np.asarray(forced, dtype=np.int64), np.asarray(low, dtype=np.int64),
                np.asarray(high, dtype=np.int64))

    def view_code_positions(self) -> np.ndarray:
        """Index within a chunk's generated tokens of every image code: [num_views, tokens_per_view], view order
        (each block follows <obs> and its own <view:*> marker, as generation_plan emits them)."""
        first = 2 + np.arange(self.num_views)[:, None] * (1 + self.tokens_per_view)  # [num_views, 1]
        return first + np.arange(self.tokens_per_view)[None, :]

    def split_generated(self, generated: np.ndarray) -> tuple[np.ndarray, bool]:
        """A chunk's generated tokens -> ([num_views, tokens_per_view] codes, success)."""
        generated = np.asarray(generated)
        if generated.shape != (self.generated_len,):
            raise LayoutError(f"generated chunk has {generated.shape} tokens, expected ({self.generated_len},)")
        return generated[self.view_code_positions()] - self.image_offset, bool(generated[-1] == self.yes_id)

    # ---- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("special_names")
        data.update(views=list(self.views), action_low=list(self.action_low), action_high=list(self.action_high),
                    vocab_size=self.vocab_size,
                    offsets={"image": self.image_offset, "action": self.action_offset,
                             "text": self.text_offset, "special": self.special_offset},
                    special_tokens={name: self.special(name) for name in self.special_names},
                    num_action_bins=NUM_ACTION_BINS)
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TokenLayout:
        """Reads layout.json; every inconsistency raises LayoutError naming the file and the field."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LayoutError(f"{path}: layout file not found") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise LayoutError(f"{path}: not readable JSON ({exc})") from None
        if not isinstance(data, dict):
            raise LayoutError(f"{path}: expected a JSON object, got {type(data).__name__}")
        derived = {k: data.pop(k, None) for k in ("vocab_size", "offsets", "special_tokens", "num_action_bins")}
        try:
            layout = cls(**data)
        except TypeError as exc:
            raise LayoutError(f"{path}: {exc}") from None
        except LayoutError as exc:
            raise LayoutError(f"{path}: {exc}") from None
        expected = layout.to_dict()
        for key, value in derived.items():
            if value is not None and value != expected[key]:
                raise LayoutError(f"{path}: {key}={value} does not match the layout's derived {expected[key]}")
        return layout


def check_vocab_matches(layout: TokenLayout, vocab_size: int, source: str) -> None:
    """Raises LayoutError when a model's vocabulary cannot hold the layout's tokens."""
    if vocab_size != layout.vocab_size:
        raise LayoutError(f"{source}: model vocab_size={vocab_size} but layout.json needs {layout.vocab_size}")

