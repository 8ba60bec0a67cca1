"""A Llama-family decoder (RMSNorm, RoPE, SwiGLU, GQA) over a ragged batch of tokens with a paged KV cache.

No padding anywhere: a step's tokens from every sequence are one [num_tokens, hidden] matrix; attention
goes through kernels.dispatch, which knows the per-sequence boundaries from the AttentionMetadata.
Weights use the Hugging Face names, so a checkpoint that loads in transformers.LlamaForCausalLM loads
here; q/k/v and gate/up are fused at load time so one step runs two GEMMs fewer per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels import dispatch

# lm_head's rows are padded with zeros to a multiple of this: MKL's fp32 GEMM runs a 1,523-wide output at
# ~60% of the rate of a 1,536-wide one (measured on the 2-core CPU, 1,024 rows), and the logits of the real
# rows come out bitwise the same.
LM_HEAD_ROW_MULTIPLE = 64


@dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Hugging Face Llama config.json this engine uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems:
            if self.hidden_size % self.num_attention_heads:
                problems.append(f"hidden_size={self.hidden_size} is not a multiple of "
                                f"num_attention_heads={self.num_attention_heads}")
            if self.num_attention_heads % self.num_key_value_heads:
                problems.append(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                                f"num_key_value_heads={self.num_key_value_heads}")
            elif (self.hidden_size // self.num_attention_heads) % 2:
                problems.append(f"head_dim={self.hidden_size // self.num_attention_heads} must be even for RoPE")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            problems.append(f"rms_norm_eps and rope_theta must be > 0, got {self.rms_norm_eps}, {self.rope_theta}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_parameters(self) -> int:
        """Weights that take part in a token's forward pass (embedding lookup excluded, lm_head included)."""
        return self.num_hidden_layers * self.layer_parameters + self.vocab_size * self.hidden_size + self.hidden_size

    @property
    def layer_parameters(self) -> int:
        q_and_o = 2 * self.hidden_size * self.hidden_size
        k_and_v = 2 * self.hidden_size * self.num_key_value_heads * self.head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size
        return q_and_o + k_and_v + mlp + 2 * self.hidden_size

    def to_hf_dict(self) -> dict:
        """config.json as transformers writes it for LlamaForCausalLM."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings, "torch_dtype": "float32",
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        }

    @classmethod
    def from_hf_dict(cls, data: dict, source: str) -> LlamaConfig:
        """Parses a Hugging Face config.json; anything this engine cannot run raises ValueError naming it."""
        if data.get("model_type") != "llama":
            raise ValueError(f"{source}: model_type={data.get('model_type')!r}, expected 'llama'")
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{source}: rope_type={rope_type!r} is not supported (only 'default')")
        for name, supported in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if data.get(name, supported) != supported:
                raise ValueError(f"{source}: {name}={data[name]!r} is not supported (only {supported!r})")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in data]
        if missing:
            raise ValueError(f"{source}: missing fields {missing}")
        heads = data["num_attention_heads"]
        config = cls(
            vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"], num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=data.get("num_key_value_heads") or heads,
            max_position_embeddings=data.get("max_position_embeddings", 2048),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        )
        head_dim = data.get("head_dim")
        if head_dim is not None and head_dim != config.head_dim:
            raise ValueError(f"{source}: head_dim={head_dim} != hidden_size/num_attention_heads={config.head_dim}")
        return config

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name of model.safetensors (transformers naming) -> its shape."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h),
                                              "model.norm.weight": (h,)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (self.intermediate_size, h),
                       p + "mlp.up_proj.weight": (self.intermediate_size, h),
                       p + "mlp.down_proj.weight": (h, self.intermediate_size),
                       p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV cache (built by the model runner)."""

    slot_mapping: torch.Tensor  # int64 [num_tokens]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor  # int32 [num_seqs], context including this step's tokens
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    # Cascade (shared-prefix) attention; None runs plain paged attention.
    prefix_block_tables: torch.Tensor | None = None  # int32 [num_prefixes, max_prefix_blocks]
    prefix_lens: torch.Tensor | None = None  # int32 [num_prefixes]
    seq_prefix_ids: torch.Tensor | None = None  # int32 [num_seqs], -1 = none
    cascade_plan: object = None  # dispatch.plan_cascade(...) for this step, shared by every layer
    backend: str = "auto"  # kernels.dispatch backend: "auto", "torch" or "triton"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm, computed in float32 like transformers does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Default (unscaled) RoPE with the rotate-half convention of transformers' Llama."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [max_pos, head_dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_pos, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, 1, head_dim] of positions int64 [T]: looked up once per step, shared by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d] rotated by cos/sin [T, 1, d] (transformers' formula, so the same rounding)."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        h, inter = config.hidden_size, config.intermediate_size
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        self.eps = config.rms_norm_eps
        self.qkv_proj = nn.Linear(h, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.gate_up_proj = nn.Linear(h, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)
        self.input_layernorm = nn.Parameter(torch.ones(h))
        self.post_attention_layernorm = nn.Parameter(torch.ones(h))
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, rope_tables: tuple[torch.Tensor, torch.Tensor], k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(rms_norm(x, self.input_layernorm, self.eps))  # [T, (heads + 2 kv_heads) * d]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # q and k heads are adjacent in each row: one RoPE pass over [T, heads + kv_heads, d] rotates both.
        qk = apply_rotary(qkv[:, :q_size + kv_size].view(num_tokens, self.num_heads + self.num_kv_heads,
                                                         self.head_dim), *rope_tables)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, q_size + kv_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        dispatch.store_kv(k, v, k_cache, v_cache, meta.slot_mapping, backend=meta.backend)
        if meta.seq_prefix_ids is not None:
            attn = dispatch.cascade_attention(q.contiguous(), k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                              meta.query_start_loc, meta.prefix_block_tables, meta.prefix_lens,
                                              meta.seq_prefix_ids, self.scale, backend=meta.backend,
                                              plan=meta.cascade_plan)
        else:
            attn = dispatch.paged_attention(q.contiguous(), k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                            meta.query_start_loc, self.scale, backend=meta.backend)
        x = x + self.o_proj(attn.reshape(num_tokens, q_size))
        gate_up = self.gate_up_proj(rms_norm(x, self.post_attention_layernorm, self.eps))  # [T, 2 * inter]
        gate, up = gate_up.chunk(2, dim=-1)
        return x + self.down_proj(nn.functional.silu(gate).mul_(up))


class LlamaForCausalLM(nn.Module):
    """The decoder plus lm_head; `forward` returns hidden states, `compute_logits` only for chosen rows."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        padded_vocab = -(-config.vocab_size // LM_HEAD_ROW_MULTIPLE) * LM_HEAD_ROW_MULTIPLE
        self.lm_head = nn.Linear(config.hidden_size, padded_vocab, bias=False)
        self.rope = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: int64 [num_tokens]; kv_caches [layers, 2, blocks, block_size, kv_heads, d].
        Returns final-normed hidden states [num_tokens, hidden]."""
        x = self.embed_tokens(input_ids)  # [T, hidden]
        rope_tables = self.rope.tables(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope_tables, kv_caches[i, 0], kv_caches[i, 1], meta)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden] (pre-norm) -> float32 logits [n, vocab]."""
        logits = self.lm_head(rms_norm(hidden, self.norm, self.config.rms_norm_eps))  # [n, padded vocab]
        return logits[:, :self.config.vocab_size].float()

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copies transformers-named tensors in, fusing q/k/v and gate/up. Names/shapes were checked already."""
        with torch.no_grad():
            self.embed_tokens.weight.copy_(weights["model.embed_tokens.weight"])
            self.norm.copy_(weights["model.norm.weight"])
            head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
            self.lm_head.weight.zero_()
            self.lm_head.weight[:self.config.vocab_size].copy_(head)
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                layer.qkv_proj.weight.copy_(torch.cat([weights[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
                layer.o_proj.weight.copy_(weights[p + "self_attn.o_proj.weight"])
                layer.gate_up_proj.weight.copy_(torch.cat([weights[p + "mlp.gate_proj.weight"],
                                                           weights[p + "mlp.up_proj.weight"]]))
                layer.down_proj.weight.copy_(weights[p + "mlp.down_proj.weight"])
                layer.input_layernorm.copy_(weights[p + "input_layernorm.weight"])
                layer.post_attention_layernorm.copy_(weights[p + "post_attention_layernorm.weight"])
