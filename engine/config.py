"""The engine's configuration: one frozen, validated dataclass built by the caller (CLI, server, tests)."""

from __future__ import annotations

from dataclasses import dataclass

from .types import InvalidRequestError

ATTENTION_BACKENDS = ("auto", "torch", "triton")
DTYPES = ("float32", "float16", "bfloat16")


class EngineConfigError(InvalidRequestError):
    """An EngineConfig field is out of range; the message names the field."""


@dataclass(frozen=True)
class EngineConfig:
    """How the engine lays out KV memory and batches work.

    KV memory is either `num_kv_blocks` blocks of `block_size` tokens, or when that is None as many
    blocks as fit in `kv_cache_memory_bytes`. `max_num_batched_tokens` is the token budget of one
    forward step (prefill and decode tokens together); `max_num_seqs` caps the sequences in one step.
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int = 2 * 1024**3
    max_num_batched_tokens: int = 4096
    max_num_seqs: int = 1024
    device: str = "cpu"
    dtype: str = "float32"
    attention_backend: str = "auto"
    enable_prefix_caching: bool = True
    # Shared-prefix (cascade) attention for branches of one state; exact, so only a speed switch.
    enable_cascade_attention: bool = True
    # torch intra-op threads for the engine's forward pass; None leaves torch's setting alone.
    num_threads: int | None = None
    # CPU only: keep freed host memory in the process heap (glibc mallopt) instead of returning every
    # large buffer to the OS. Each step allocates the same large K/V gathers; with glibc's default they
    # are mmap'ed and page-faulted afresh every layer, which costs more than the attention math.
    retain_host_memory: bool = True

    def __post_init__(self) -> None:
        problems = []
        for name in ("block_size", "kv_cache_memory_bytes", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks <= 0):
            problems.append(f"num_kv_blocks must be a positive integer or None, got {self.num_kv_blocks!r}")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads <= 0):
            problems.append(f"num_threads must be a positive integer or None, got {self.num_threads!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            problems.append(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if not isinstance(self.device, str) or self.device.split(":")[0] not in ("cpu", "cuda"):
            problems.append(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if problems:
            raise EngineConfigError("invalid engine config: " + "; ".join(problems))

    def kv_block_bytes(self, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
        """Bytes of one KV block (K and V of every layer)."""
        element = 4 if self.dtype == "float32" else 2
        return 2 * num_layers * self.block_size * num_kv_heads * head_dim * element

    def resolve_num_kv_blocks(self, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
        """The block count: `num_kv_blocks` if set, else what fits in `kv_cache_memory_bytes`."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        num_blocks = self.kv_cache_memory_bytes // self.kv_block_bytes(num_layers, num_kv_heads, head_dim)
        if num_blocks < 1:
            raise EngineConfigError(f"kv_cache_memory_bytes={self.kv_cache_memory_bytes} holds no block of "
                                    f"{self.kv_block_bytes(num_layers, num_kv_heads, head_dim)} bytes")
        return int(num_blocks)
