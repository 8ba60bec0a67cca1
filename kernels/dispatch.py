"""One entry point per kernel that picks the implementation for each call.

Backends:
- "auto" (default): the Triton kernels for CUDA tensors, the vectorised torch path for CPU tensors.
- "torch": kernels/torch_attention.py on any device.
- "triton": the Triton kernels on any device. On CPU tensors this runs the Triton interpreter, which
  Triton only enables when TRITON_INTERPRET=1 is set before the kernel modules are imported (the test
  conftest does it); otherwise forcing it on CPU raises a RuntimeError that says so.
- "reference": kernels/reference.py (slow; the definition of correct).

The choice is explicit: a `backend=` argument per call, or the process-wide `set_backend(...)` /
`use_backend(...)` setting. Nothing here reads environment variables.
The Triton modules are imported on first use, so a CPU-only process never pays for compiling them.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import ModuleType
from typing import Literal

import torch

from . import reference, torch_attention
from .prefix_groups import CascadePlan, plan_cascade

__all__ = [
    "BACKENDS", "Backend", "CascadePlan", "cascade_attention", "get_backend", "merge_attention_states",
    "paged_attention", "paged_attention_with_lse", "plan_cascade", "resolve_backend", "set_backend", "store_kv",
    "use_backend",
]

Backend = Literal["auto", "torch", "triton", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton", "reference")

_default_backend: str = "auto"


def set_backend(backend: Backend) -> None:
    """Set the process-wide default backend used when a call passes backend=None."""
    global _default_backend
    _default_backend = _validated(backend)


def get_backend() -> str:
    """The process-wide default backend."""
    return _default_backend


@contextlib.contextmanager
def use_backend(backend: Backend) -> Iterator[None]:
    """Temporarily set the default backend (restored on exit, also on error)."""
    previous = _default_backend
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)  # type: ignore[arg-type]


def _validated(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


def resolve_backend(device: torch.device, backend: Backend | None = None) -> str:
    """The concrete backend ("torch", "triton" or "reference") a call on `device` would use."""
    chosen = _validated(_default_backend if backend is None else backend)
    if chosen == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return chosen


def _triton_module(name: str, device: torch.device) -> ModuleType:
    module = importlib.import_module(f"kernels.{name}")
    if device.type != "cuda" and not module.runs_in_interpreter():
        raise RuntimeError(
            f"the triton backend on {device.type} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing the kernels"
        )
    return module


def _implementation(function: str, triton_module: str, device: torch.device, backend: Backend | None):
    """The `function` of the backend a call on `device` resolves to (Triton kernels live in `triton_module`)."""
    chosen = resolve_backend(device, backend)
    if chosen == "triton":
        return getattr(_triton_module(triton_module, device), function)
    return getattr(torch_attention if chosen == "torch" else reference, function)


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # int64 [num_tokens]; slot = block_id * block_size + offset, < 0 = padding
    backend: Backend | None = None,
) -> None:
    """Write new K/V rows into the paged cache in place, skipping padding slots."""
    _implementation("store_kv", "kv_store", key.device, backend)(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], ragged over sequences
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq], padded with 0
    seq_lens: torch.Tensor,  # int32 [num_seqs], context length including this step's tokens
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1], cumulative query counts
    scale: float,
    backend: Backend | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], dtype of query
    """Causal attention: query i of sequence s sits at position seq_len - q_len + i and sees keys [0, pos].

    GQA when num_heads is a multiple of num_kv_heads; float32/float16/bfloat16, accumulated in float32.
    """
    attend = _implementation("paged_attention", "paged_attention", query.device, backend)
    return attend(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


def paged_attention_with_lse(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1]
    scale: float,
    kv_start: torch.Tensor | None = None,  # int32 [num_seqs]: first key position attended (default 0)
    causal: bool = True,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # out float32 [num_tokens, num_heads, head_dim], lse float32 [.., H]
    """Partial attention over key positions [kv_start, seq_len) (also <= the query position when causal),
    returning the float32 output and the log-sum-exp of the scores (-inf for a row that saw no key)."""
    attend = _implementation("paged_attention_with_lse", "paged_attention", query.device, backend)
    return attend(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, kv_start, causal)


def merge_attention_states(
    out_a: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    lse_a: torch.Tensor,  # float32 [num_tokens, num_heads]
    out_b: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    lse_b: torch.Tensor,  # float32 [num_tokens, num_heads]
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # out float32 [num_tokens, num_heads, head_dim], lse float32
    """Exact attention over the union of two disjoint key sets from the (out, lse) of each."""
    merge = _implementation("merge_attention_states", "cascade", out_a.device, backend)
    return merge(out_a, lse_a, out_b, lse_b)


def cascade_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1]
    prefix_block_tables: torch.Tensor,  # int32 [num_prefixes, max_prefix_blocks]
    prefix_lens: torch.Tensor,  # int32 [num_prefixes]
    seq_prefix_ids: torch.Tensor,  # int32 [num_seqs], -1 = the sequence has no shared prefix
    scale: float,
    plan: CascadePlan | None = None,
    backend: Backend | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], dtype of query
    """paged_attention for a batch whose sequences share prefixes: the queries of all sequences on prefix
    p attend to its prefix_lens[p] keys in one pass, then each sequence attends causally to its own
    positions [prefix_len, pos], and the two parts are merged by log-sum-exp.

    Requires, for a sequence on prefix p: its block table starts with the prefix's blocks (the prefix may
    end mid-block) and its queries lie after the prefix (prefix_lens[p] <= seq_len - q_len).

    plan: optional plan_cascade(query_start_loc, prefix_lens, seq_prefix_ids, num_tokens), built once per
    step and reused by every layer (the reference backend ignores it).
    """
    args = (
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, prefix_block_tables, prefix_lens,
        seq_prefix_ids, scale,
    )
    return _implementation("cascade_attention", "cascade", query.device, backend)(*args, plan=plan)
