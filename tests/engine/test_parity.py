"""Greedy parity with transformers.LlamaForCausalLM on full multi-chunk streams.

transformers cannot force marker tokens, so the comparison is teacher-forced: HF runs the engine's
whole stream in one forward pass, and at every sampled position its argmax inside the allowed range
must equal the engine's token (and every forced position must hold the plan's marker). The benchmark
script measures 50+ streams on the default-size model; here a handful keeps the suite fast.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_helpers import branch, make_engine, start_state, tiny_layout_with, write_tiny_checkpoint

from engine.types import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def roll_out(engine, layout, num_states: int, branches_per_state: int, num_chunks: int) -> list[list[int]]:
    """Greedy multi-chunk rollouts; returns the final token stream of every branch."""
    starts = engine.create_states([start_state(layout, s, f"task number {s}") for s in range(num_states)])
    states = [starts[i // branches_per_state] for i in range(num_states * branches_per_state)]
    for chunk in range(num_chunks):
        results = engine.imagine([branch(layout, s, seed=100 * chunk + i, keep_state=True)
                                  for i, s in enumerate(states)], GREEDY)
        states = [r.state_id for r in results]
    return [list(engine._states[s].token_ids) for s in states]


def hf_mismatches(checkpoint, layout, streams: list[list[int]], num_chunks: int) -> tuple[int, int]:
    """(sampled positions checked, positions where HF's restricted argmax differs from the engine)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint / "world_model", dtype=torch.float32).eval()
    forced, low, high = layout.generation_plan()
    checked = mismatched = 0
    for stream in streams:
        with torch.inference_mode():
            logits = model(torch.tensor([stream])).logits[0]  # [len, vocab]
        for chunk in range(num_chunks):
            gen_start = len(stream) - chunk * layout.chunk_len - layout.generated_len
            for offset in range(layout.generated_len):
                position = gen_start + offset
                if forced[offset] >= 0:
                    assert stream[position] == forced[offset]
                    continue
                predicted = int(logits[position - 1, low[offset]:high[offset]].argmax()) + low[offset]
                checked += 1
                mismatched += predicted != stream[position]
    return checked, mismatched


def test_greedy_streams_equal_transformers_teacher_forced(tiny_checkpoint, tiny_layout):
    engine = make_engine(tiny_checkpoint)
    streams = roll_out(engine, tiny_layout, num_states=3, branches_per_state=3, num_chunks=3)
    assert len({tuple(s) for s in streams}) == 9  # different actions give different streams
    checked, mismatched = hf_mismatches(tiny_checkpoint, tiny_layout, streams, num_chunks=3)
    assert (checked, mismatched) == (9 * 3 * 9, 0)


def test_cascade_plain_attention_and_no_prefix_cache_give_the_same_greedy_streams(tiny_checkpoint, tiny_layout):
    reference = roll_out(make_engine(tiny_checkpoint, enable_cascade_attention=False), tiny_layout, 2, 4, 2)
    cascade = roll_out(make_engine(tiny_checkpoint), tiny_layout, 2, 4, 2)
    no_cache = roll_out(make_engine(tiny_checkpoint, enable_prefix_caching=False, max_num_batched_tokens=48),
                        tiny_layout, 2, 4, 2)
    assert reference == cascade == no_cache


def test_greedy_parity_with_the_triton_kernels_in_the_interpreter(tmp_path):
    pytest.importorskip("kernels.paged_attention")
    layout = tiny_layout_with(max_chunks_per_branch=2)
    checkpoint = write_tiny_checkpoint(tmp_path / "t", layout, hidden_size=32, num_layers=1, num_heads=2,
                                       num_kv_heads=1, intermediate_size=64)
    torch_streams = roll_out(make_engine(checkpoint, attention_backend="torch"), layout, 1, 2, 2)
    triton_streams = roll_out(make_engine(checkpoint, attention_backend="triton"), layout, 1, 2, 2)
    assert triton_streams == torch_streams
    checked, mismatched = hf_mismatches(checkpoint, layout, triton_streams, num_chunks=2)
    assert (checked, mismatched) == (2 * 2 * 9, 0)


def test_lm_head_rows_are_zero_padded_to_a_multiple_of_64_and_logits_unchanged():
    """The padded lm_head (a faster GEMM shape) gives bitwise the logits of the checkpoint's own weight."""
    from engine.models.llama import LlamaConfig, LlamaForCausalLM, rms_norm

    config = LlamaConfig(vocab_size=1523, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    generator = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(shape, generator=generator) for name, shape in config.weight_shapes().items()}
    model = LlamaForCausalLM(config)
    model.load_hf_weights(weights)
    assert model.lm_head.weight.shape == (1536, 32) and not model.lm_head.weight[1523:].any()
    hidden = torch.randn(5, 32, generator=generator)
    with torch.inference_mode():
        logits = model.compute_logits(hidden)
    expected = torch.nn.functional.linear(rms_norm(hidden, weights["model.norm.weight"], config.rms_norm_eps),
                                          weights["lm_head.weight"])
    assert logits.shape == (5, 1523) and torch.equal(logits, expected)


def test_sampled_tokens_stay_in_their_ranges(tiny_checkpoint, tiny_layout):
    engine = make_engine(tiny_checkpoint)
    (state,) = engine.create_states([start_state(tiny_layout, 0)])
    results = engine.imagine([branch(tiny_layout, state, seed=i, keep_state=True) for i in range(20)],
                             SamplingParams(temperature=5.0))
    forced, low, high = tiny_layout.generation_plan()
    for result in results:
        generated = np.asarray(engine._states[result.state_id].token_ids[-tiny_layout.generated_len:])
        sampled = forced < 0
        assert np.array_equal(generated[~sampled], forced[~sampled])
        assert np.all((generated[sampled] >= low[sampled]) & (generated[sampled] < high[sampled]))


@pytest.mark.gpu
def test_greedy_parity_on_cuda_with_the_triton_kernels(tiny_checkpoint, tiny_layout):
    from kernels import dispatch

    engine = make_engine(tiny_checkpoint, device="cuda")
    assert dispatch.resolve_backend(engine.runner.kv_caches.device, "auto") == "triton"
    streams = roll_out(engine, tiny_layout, num_states=2, branches_per_state=4, num_chunks=3)
    checked, mismatched = hf_mismatches(tiny_checkpoint, tiny_layout, streams, num_chunks=3)
    assert (checked, mismatched) == (8 * 3 * 9, 0)
