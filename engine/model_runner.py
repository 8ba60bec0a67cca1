"""Runs one scheduled step: builds the ragged batch's input tensors from the SchedulerOutput (numpy,
no per-token Python), makes the copy-on-write block copies, runs the model, samples.

The runner owns the model and the KV tensors; it never sees the block pool, only block ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from kernels import dispatch

from .host_memory import retain_freed_host_memory
from .models.llama import AttentionMetadata, LlamaConfig, LlamaForCausalLM
from .prefix_sharing import shared_prefix_groups
from .sampler import DecodingPlan, SamplingBatch, sample, yes_probability
from .scheduler import SchedulerOutput

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RunnerOutput:
    """Per sampling sequence of the step (in SchedulerOutput.sample_indices order)."""

    sampled: np.ndarray  # int64 [num_sampled]
    success_probs: np.ndarray  # float32 [num_sampled]: P(<yes>) over {<yes>, <no>} at this position


def allocate_kv_caches(config: LlamaConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device, heads_major: bool) -> torch.Tensor:
    """The KV cache of every layer as one [layers, K/V, num_blocks, block_size, kv_heads, head_dim] tensor, so a
    copy-on-write block copy is one op.

    heads_major lays the memory out as [layers, K/V, kv_heads, num_blocks, block_size, head_dim] and returns the
    permuted view: the shape every kernel expects, with each (kv head, block) tile contiguous, which lets the
    CPU attention read tiles in place (kernels/torch_decode.py). The Triton kernels want the contiguous NHD layout.
    """
    shape = (config.num_hidden_layers, 2, config.num_key_value_heads, num_blocks, block_size, config.head_dim)
    if not heads_major:
        shape = shape[:2] + (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device).permute(0, 1, 3, 4, 2, 5)


class ModelRunner:
    def __init__(self, config: LlamaConfig, weights: dict[str, torch.Tensor], *, num_blocks: int, block_size: int,
                 plan: DecodingPlan, yes_id: int, no_id: int, device: str = "cpu", dtype: str = "float32",
                 attention_backend: str = "auto", enable_cascade: bool = True,
                 retain_host_memory: bool = False) -> None:
        self.config = config
        self.block_size = block_size
        self.plan = plan
        self.yes_id, self.no_id = yes_id, no_id
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype]
        self.attention_backend = attention_backend
        self.enable_cascade = enable_cascade
        if retain_host_memory and self.device.type == "cpu":
            retain_freed_host_memory()
        model = LlamaForCausalLM(config)
        model.load_hf_weights(weights)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.model.rope.to(torch.float32)  # cos/sin tables stay float32 (cast per step)
        self.kv_caches = allocate_kv_caches(config, num_blocks, block_size, self.dtype, self.device,
                                            heads_major=dispatch.resolve_backend(self.device, attention_backend)
                                            == "torch")
        # Work counters for FLOP accounting (benchmarks): tokens through the layers, rows through lm_head,
        # and (query, key) pairs attended.
        self.num_forward_tokens = 0
        self.num_logits_rows = 0
        self.num_attended_pairs = 0

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        if out.block_copies:
            src, dst = (torch.tensor(ids, dtype=torch.long, device=self.device) for ids in zip(*out.block_copies,
                                                                                                 strict=True))
            self.kv_caches[:, :, dst] = self.kv_caches[:, :, src]
        input_ids, positions, meta, logits_rows = self.prepare_inputs(out)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [num_tokens, hidden]
        self.num_forward_tokens += int(input_ids.shape[0])
        self.num_attended_pairs += int(positions.sum()) + int(positions.shape[0])  # query at p sees p + 1 keys
        self.num_logits_rows += len(out.sample_indices)
        if not out.sample_indices:
            return RunnerOutput(np.zeros(0, np.int64), np.zeros(0, np.float32))
        logits = self.model.compute_logits(hidden[logits_rows])  # float32 [num_sampled, vocab]
        tokens = sample(logits.cpu(), self.sampling_batch(out))
        probs = yes_probability(logits, self.yes_id, self.no_id)
        return RunnerOutput(tokens.numpy(), probs.cpu().numpy())

    def prepare_inputs(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                             torch.Tensor]:
        """Flattens the step's tokens; positions, slots and block tables come from numpy arithmetic."""
        seqs = out.seqs
        num_new = np.asarray(out.num_scheduled_tokens, dtype=np.int64)  # [num_seqs]
        computed = np.fromiter((seq.num_computed_tokens for seq in seqs), dtype=np.int64, count=len(seqs))
        seq_lens = computed + num_new
        query_start_loc = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        token_ids = np.fromiter(
            chain.from_iterable(seq.token_ids[c:c + n] for seq, c, n in zip(seqs, computed.tolist(),
                                                                            num_new.tolist(), strict=True)),
            dtype=np.int64, count=num_tokens)
        positions = np.repeat(computed - query_start_loc[:-1], num_new) + np.arange(num_tokens)
        max_blocks = -(-int(seq_lens.max()) // self.block_size)
        block_tables = np.stack([table[:max_blocks] for table in out.block_tables])  # int32 [num_seqs, max_blocks]
        seq_of_token = np.repeat(np.arange(len(seqs)), num_new)
        slots = block_tables[seq_of_token, positions // self.block_size].astype(np.int64) * self.block_size \
            + positions % self.block_size
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots), block_tables=self._tensor(block_tables),
            seq_lens=self._tensor(seq_lens.astype(np.int32)),
            query_start_loc=self._tensor(query_start_loc.astype(np.int32)), backend=self.attention_backend)
        if self.enable_cascade:
            self._add_cascade(meta, block_tables, seq_lens - num_new)
        logits_rows = query_start_loc[1:][np.asarray(out.sample_indices, dtype=np.int64)] - 1
        return self._tensor(token_ids), self._tensor(positions), meta, self._tensor(logits_rows)

    def _add_cascade(self, meta: AttentionMetadata, block_tables: np.ndarray, context_before: np.ndarray) -> None:
        """Sequences sharing a prefix (forks of one state) meet its keys in one pass; see prefix_sharing."""
        groups = shared_prefix_groups(block_tables, context_before, self.block_size)
        if not len(groups.prefix_lens):
            return
        meta.prefix_block_tables = self._tensor(groups.prefix_tables)
        meta.prefix_lens = self._tensor(groups.prefix_lens)
        meta.seq_prefix_ids = self._tensor(groups.seq_prefix_ids)
        meta.cascade_plan = dispatch.plan_cascade(meta.query_start_loc, meta.prefix_lens, meta.seq_prefix_ids,
                                                  int(meta.slot_mapping.shape[0]))

    def sampling_batch(self, out: SchedulerOutput) -> SamplingBatch:
        seqs = [out.seqs[i] for i in out.sample_indices]
        count = len(seqs)
        positions = np.fromiter((seq.num_tokens for seq in seqs), dtype=np.int64, count=count)
        offsets = positions - np.fromiter((seq.gen_start for seq in seqs), dtype=np.int64, count=count)
        return SamplingBatch(
            low=self.plan.low[offsets], high=self.plan.high[offsets],
            temperature=np.fromiter((seq.temperature for seq in seqs), dtype=np.float32, count=count),
            top_k=np.fromiter((seq.top_k for seq in seqs), dtype=np.int64, count=count),
            top_p=np.fromiter((seq.top_p for seq in seqs), dtype=np.float32, count=count),
            seeds=np.fromiter((seq.seed for seq in seqs), dtype=np.uint64, count=count),
            positions=positions)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
