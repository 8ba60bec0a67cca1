"""Cascade metadata shared by the torch and Triton cascade paths: which query tokens meet which prefix.

Everything is computed with tensor ops on the batch's device and without a device-to-host sync, so the
Triton path can be captured in a CUDA graph. The plan depends only on the batch layout, not on the
layer: an engine builds it once per step (plan_cascade) and passes it to every layer's call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class CascadePlan:
    """How one batch's queries split into the prefix pass and the suffix pass of cascade attention."""

    token_order: torch.Tensor  # int64 [num_tokens]: query tokens sorted by prefix id, prefix-less tokens last
    prefix_query_start_loc: torch.Tensor  # int32 [num_prefixes + 1]: segments of token_order, one per prefix
    suffix_starts: torch.Tensor  # int32 [num_seqs]: first key position read through the sequence's own table
    # Backend-private metadata derived from the same batch, filled by the first layer that needs it and reused
    # by the others (the torch path keeps its per-pass attention plans here; the Triton path needs none).
    memo: dict = field(default_factory=dict, compare=False, repr=False)


def group_queries_by_prefix(
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1]
    seq_prefix_ids: torch.Tensor,  # int32 [num_seqs], -1 = no prefix
    num_prefixes: int,
    num_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_order int64 [num_tokens], prefix_query_start_loc int32 [num_prefixes + 1]).

    token_order lists the query tokens sorted by their sequence's prefix id (stable, so branches keep
    batch order); the tokens of prefix p are token_order[prefix_query_start_loc[p]:prefix_query_start_loc[p+1]].
    Tokens of sequences without a prefix come last, past prefix_query_start_loc[-1], in no segment.
    """
    device = query_start_loc.device
    num_seqs = seq_prefix_ids.shape[0]
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens, output_size=num_tokens)
    token_prefix = seq_prefix_ids.long()[seq_of_token]  # [num_tokens]
    sort_keys = torch.where(token_prefix >= 0, token_prefix, num_prefixes)
    token_order = torch.sort(sort_keys, stable=True).indices
    # scatter_add rather than bincount: bincount reads the maximum back to the host on CUDA.
    counts = torch.zeros(num_prefixes + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, sort_keys, torch.ones_like(sort_keys))
    prefix_query_start_loc = torch.zeros(num_prefixes + 1, dtype=torch.int32, device=device)
    prefix_query_start_loc[1:] = torch.cumsum(counts[:num_prefixes], 0)
    return token_order, prefix_query_start_loc


def suffix_starts(
    prefix_lens: torch.Tensor,  # int32 [num_prefixes]
    seq_prefix_ids: torch.Tensor,  # int32 [num_seqs]
) -> torch.Tensor:  # int32 [num_seqs]
    """The first key position each sequence attends through its own block table (its prefix length, or 0)."""
    if prefix_lens.shape[0] == 0:
        return torch.zeros_like(seq_prefix_ids)
    lens = prefix_lens[seq_prefix_ids.clamp(min=0).long()]
    return torch.where(seq_prefix_ids >= 0, lens, 0).to(torch.int32)


def plan_cascade(
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1]
    prefix_lens: torch.Tensor,  # int32 [num_prefixes]
    seq_prefix_ids: torch.Tensor,  # int32 [num_seqs], -1 = no prefix
    num_tokens: int,
) -> CascadePlan:
    """The cascade plan of one batch; valid for every layer of the step."""
    token_order, prefix_query_start_loc = group_queries_by_prefix(
        query_start_loc, seq_prefix_ids, prefix_lens.shape[0], num_tokens
    )
    return CascadePlan(token_order, prefix_query_start_loc, suffix_starts(prefix_lens, seq_prefix_ids))
