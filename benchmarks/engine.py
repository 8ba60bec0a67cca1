"""Engine benchmark: branched imagined rollouts vs HF transformers `generate`, on the same checkpoint.

Workload W (defaults): 64 real start states x 16 branches x 2 chunks. The engine prefills each start
state once, forks 16 branches per state, imagines chunk 1 (keeping the states), then chunk 2 from
them. HF `generate` does the same work the only way it can: every branch's whole prefix is prefilled
in its prompt, with a logits processor that forces the layout's markers and restricts the sampled
ranges (so both produce the same number of tokens per chunk); its batch size is the best of a sweep.

Reported: imagined chunk rollouts/s for both and their ratio, the engine's achieved model FLOP/s
against a large fp32 GEMM measured in the same run, peak KV blocks against the ideal (every prefix
once + every branch's own suffix), and greedy parity with HF on full multi-chunk streams.
Warm-up is excluded; seeds are fixed. Usage:

    python -m benchmarks.engine --checkpoint checkpoints/default --json engine.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import format_table, gemm_flops_per_second, machine_info
from engine.checkpoint import layout_for_tokenizer, load_checkpoint, write_random_checkpoint
from engine.config import EngineConfig
from engine.engine import Engine
from engine.image_tokenizer import ImageTokenizerConfig
from engine.layout import TokenLayout
from engine.types import BranchRequest, SamplingParams, StartState

DEFAULT_CHECKPOINT = Path("checkpoints/default")
# The size of the default world model (~6.6M parameters) for when no trained checkpoint exists yet.
RANDOM_MODEL = dict(hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=2, intermediate_size=688)
SAMPLING = SamplingParams(temperature=1.0)


@dataclass(frozen=True)
class Workload:
    num_states: int = 64
    branches_per_state: int = 16
    num_chunks: int = 2
    seed: int = 0

    @property
    def num_branches(self) -> int:
        return self.num_states * self.branches_per_state

    @property
    def num_rollouts(self) -> int:
        return self.num_branches * self.num_chunks


def start_states(layout: TokenLayout, count: int, seed: int) -> list[StartState]:
    rng = np.random.default_rng(seed)
    shape = (layout.image_height, layout.image_width, 3)
    tasks = ("pick up the red cube", "open the top drawer", "push the block to the goal", "stack the cubes")
    return [StartState(f"{tasks[i % len(tasks)]} ({i})",
                       {view: rng.integers(0, 256, shape, dtype=np.uint8) for view in layout.views})
            for i in range(count)]


def chunk_actions(layout: TokenLayout, workload: Workload) -> np.ndarray:
    """[num_chunks, num_branches, chunk_size, action_dim], fixed by the workload seed."""
    rng = np.random.default_rng(workload.seed + 1)
    return rng.uniform(-1, 1, (workload.num_chunks, workload.num_branches, layout.chunk_size, layout.action_dim))


# ---- the engine ---------------------------------------------------------------------------------
def run_engine_workload(engine: Engine, workload: Workload, sampling: SamplingParams) -> tuple[float, list[int]]:
    """Runs W once: create states, imagine every chunk, release. Returns (seconds, prefix lengths)."""
    layout = engine.layout
    actions = chunk_actions(layout, workload)
    start = time.perf_counter()
    state_ids = engine.create_states(start_states(layout, workload.num_states, workload.seed))
    parents = [state_ids[b // workload.branches_per_state] for b in range(workload.num_branches)]
    held = list(state_ids)
    for chunk in range(workload.num_chunks):
        last = chunk == workload.num_chunks - 1
        results = engine.imagine([BranchRequest(parent, actions[chunk, b], seed=workload.seed * 7919 + b,
                                                keep_state=not last) for b, parent in enumerate(parents)], sampling)
        parents = [r.state_id for r in results]
        held += [] if last else parents
    seconds = time.perf_counter() - start
    prefix_lens = [len(layout.encode_instruction(s.instruction)) + layout.observation_len
                   for s in start_states(layout, workload.num_states, workload.seed)]
    engine.release(held)
    return seconds, prefix_lens


def ideal_kv_blocks(layout: TokenLayout, workload: Workload, prefix_lens: list[int], block_size: int) -> int:
    """Every prefix once + every branch's own suffix (the KV it stores: all its tokens but the last)."""
    suffix = workload.num_chunks * layout.chunk_len - 1
    return sum(math.ceil(n / block_size) for n in prefix_lens) + workload.num_branches * math.ceil(suffix / block_size)


def model_flops(config, forward_tokens: float, logits_rows: float, attended_pairs: float) -> float:
    """Matmul FLOPs of the work the engine did: weights per token, lm_head per sampled row, attention
    (QK^T and PV) per attended (query, key) pair."""
    per_token = 2 * config.num_hidden_layers * (config.layer_parameters - 2 * config.hidden_size)
    lm_head = 2 * config.vocab_size * config.hidden_size
    attention = 2 * 2 * config.num_attention_heads * config.head_dim * config.num_hidden_layers
    return per_token * forward_tokens + lm_head * logits_rows + attention * attended_pairs


def bench_engine(checkpoint: Path, workload: Workload, config: EngineConfig) -> dict:
    engine = Engine.from_checkpoint(checkpoint, config)
    run_engine_workload(engine, Workload(2, 4, workload.num_chunks, seed=99), SAMPLING)  # warm-up, excluded
    before = engine.stats()
    seconds, prefix_lens = run_engine_workload(engine, workload, SAMPLING)
    after = engine.stats()
    delta = {key: after.extra[key] - before.extra[key]
             for key in ("num_forward_tokens", "num_logits_rows", "num_attended_pairs", "num_steps",
                         "num_preemptions")}
    flops = model_flops(engine.checkpoint.model_config, delta["num_forward_tokens"], delta["num_logits_rows"],
                        delta["num_attended_pairs"])
    ideal = ideal_kv_blocks(engine.layout, workload, prefix_lens, config.block_size)
    peak = after.extra["peak_kv_blocks_used"]
    assert after.kv_blocks_used == 0, "blocks leaked after releasing every state"
    return {
        "seconds": seconds, "rollouts_per_s": workload.num_rollouts / seconds,
        "generated_tokens_per_s": workload.num_rollouts * engine.layout.generated_len / seconds,
        "model_flops": flops, "model_flops_per_s": flops / seconds, "steps": delta["num_steps"],
        "preemptions": delta["num_preemptions"], "forward_tokens": delta["num_forward_tokens"],
        "peak_kv_blocks": peak, "ideal_kv_blocks": ideal, "peak_over_ideal": peak / ideal,
        "prefix_cache_hit_rate": after.prefix_cache_hit_rate,
    }


# ---- HF transformers ----------------------------------------------------------------------------
def plan_masks(layout: TokenLayout) -> torch.Tensor:
    """[generated_len, vocab] additive masks: 0 where the plan allows a token, -inf elsewhere."""
    forced, low, high = layout.generation_plan()
    masks = torch.full((layout.generated_len, layout.vocab_size), float("-inf"))
    for i in range(layout.generated_len):
        if forced[i] >= 0:
            masks[i, forced[i]] = 0.0
        else:
            masks[i, low[i]:high[i]] = 0.0
    return masks


class PlanLogitsProcessor:
    """Makes HF generate follow the layout's plan: markers forced, sampled ranges restricted."""

    def __init__(self, prompt_len: int, masks: torch.Tensor) -> None:
        self.prompt_len, self.masks = prompt_len, masks

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.masks[input_ids.shape[1] - self.prompt_len]


def hf_generate_chunk(model, layout: TokenLayout, streams: list[list[int]], do_sample: bool,
                      masks: torch.Tensor) -> list[list[int]]:
    """One chunk for every stream in one generate call (left-padded); returns the extended streams."""
    from transformers import LogitsProcessorList

    pad = layout.special("pad")
    width = max(len(s) for s in streams)
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in streams])
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in streams])
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=layout.generated_len,
            min_new_tokens=layout.generated_len, do_sample=do_sample, temperature=1.0 if do_sample else None,
            top_k=0 if do_sample else None, top_p=1.0 if do_sample else None, pad_token_id=pad,
            logits_processor=LogitsProcessorList([PlanLogitsProcessor(width, masks)]))
    return [s + output[i, width:].tolist() for i, s in enumerate(streams)]


def bench_hf(checkpoint: Path, workload: Workload, batch_sizes: list[int]) -> dict:
    """HF generate with sampling on the first B branches of W, all chunks; best rate over batch sizes."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint / "world_model", dtype=torch.float32).eval()
    layout = load_checkpoint(checkpoint).layout
    masks = plan_masks(layout)
    tokenizer = load_checkpoint(checkpoint).tokenizer
    states = start_states(layout, workload.num_states, workload.seed)
    with torch.inference_mode():
        codes = [tokenizer.encode(np.stack([s.images[v] for s in states])).numpy() for v in layout.views]
    prefixes = [layout.encode_instruction(s.instruction).tolist()
                + layout.encode_observation(np.stack([c[i] for c in codes])).tolist() for i, s in enumerate(states)]
    actions = chunk_actions(layout, workload)
    hf_generate_chunk(model, layout, [prefixes[0] + layout.encode_actions(actions[0, 0]).tolist()], True, masks)
    per_batch = {}
    for batch in batch_sizes:
        streams = [prefixes[b // workload.branches_per_state] for b in range(batch)]
        start = time.perf_counter()
        for chunk in range(workload.num_chunks):
            streams = [s + layout.encode_actions(actions[chunk, b]).tolist() for b, s in enumerate(streams)]
            streams = hf_generate_chunk(model, layout, streams, True, masks)
        per_batch[batch] = batch * workload.num_chunks / (time.perf_counter() - start)
        print(f"  hf generate batch {batch}: {per_batch[batch]:.2f} rollouts/s", file=sys.stderr)
    best = max(per_batch, key=per_batch.get)
    return {"rollouts_per_s": per_batch[best], "best_batch_size": best,
            "generated_tokens_per_s": per_batch[best] * layout.generated_len,
            "rollouts_per_s_by_batch_size": {str(k): v for k, v in per_batch.items()}}


# ---- greedy parity --------------------------------------------------------------------------------
def greedy_parity(checkpoint: Path, config: EngineConfig, num_streams: int, num_chunks: int) -> dict:
    """Engine greedy multi-chunk streams vs HF teacher-forced restricted argmax at every sampled position."""
    from transformers import LlamaForCausalLM

    # Its streams are not the timed workload's, so its KV memory is not sized for it: the config's default.
    engine = Engine.from_checkpoint(checkpoint, replace(config, num_kv_blocks=None))
    layout = engine.layout
    workload = Workload(num_states=max(1, num_streams // 8), branches_per_state=8, num_chunks=num_chunks, seed=3)
    actions = chunk_actions(layout, workload)
    state_ids = engine.create_states(start_states(layout, workload.num_states, workload.seed))
    parents = [state_ids[b // 8] for b in range(workload.num_branches)]
    streams: list[list[int]] = []
    for chunk in range(num_chunks):
        results = engine.imagine([BranchRequest(p, actions[chunk, b], seed=b, keep_state=True)
                                  for b, p in enumerate(parents)], SamplingParams(temperature=0.0), return_tokens=True)
        parents = [r.state_id for r in results]
    model = LlamaForCausalLM.from_pretrained(checkpoint / "world_model", dtype=torch.float32).eval()
    forced, low, high = layout.generation_plan()
    equal_streams = checked = mismatched = 0
    for parent in parents:
        stream = engine.stream_tokens(parent)
        streams.append(stream)
        with torch.inference_mode():
            logits = model(torch.tensor([stream])).logits[0]
        stream_ok = True
        for chunk in range(num_chunks):
            gen_start = len(stream) - chunk * layout.chunk_len - layout.generated_len
            for offset in np.flatnonzero(forced < 0).tolist():
                position = gen_start + offset
                predicted = int(logits[position - 1, low[offset]:high[offset]].argmax()) + int(low[offset])
                checked += 1
                if predicted != stream[position]:
                    mismatched += 1
                    stream_ok = False
        equal_streams += stream_ok
    return {"streams": len(parents), "streams_equal": equal_streams, "positions_checked": checked,
            "positions_mismatched": mismatched, "stream_match_rate": equal_streams / len(parents)}


# ---- entry point --------------------------------------------------------------------------------
def resolve_checkpoint(path: Path, workdir: Path) -> tuple[Path, str]:
    if (path / "layout.json").is_file():
        return path, str(path)
    layout = layout_for_tokenizer(ImageTokenizerConfig())
    random_path = write_random_checkpoint(workdir / "random-default", layout, seed=0, **RANDOM_MODEL)
    return random_path, f"random checkpoint of the default size ({path} not found)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vla-mbpo bench engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--states", type=int, default=64)
    parser.add_argument("--branches", type=int, default=16)
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--parity-streams", type=int, default=64, help="greedy parity streams (0 = skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workload = Workload(args.states, args.branches, args.chunks)
    with tempfile.TemporaryDirectory() as workdir:
        checkpoint, checkpoint_note = resolve_checkpoint(args.checkpoint, Path(workdir))
        model_config = load_checkpoint(checkpoint).model_config
        layout = load_checkpoint(checkpoint).layout
        prefix_lens = [len(layout.encode_instruction(s.instruction)) + layout.observation_len
                       for s in start_states(layout, workload.num_states, workload.seed)]
        # KV memory for the workload: 25% above the ideal, so the peak/ideal ratio is the engine's own.
        num_kv_blocks = int(1.25 * ideal_kv_blocks(layout, workload, prefix_lens, args.block_size)) + 64
        config = EngineConfig(block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
                              max_num_seqs=args.max_num_seqs, num_threads=args.threads, num_kv_blocks=num_kv_blocks)
        report: dict = {"machine": machine_info(), "checkpoint": checkpoint_note, "workload": asdict(workload),
                        "model_parameters": model_config.num_parameters, "engine_config": asdict(config)}
        print(json.dumps(report["machine"]), file=sys.stderr)
        report["gemm_flops_per_s"] = gemm_flops_per_second()
        report["engine"] = bench_engine(checkpoint, workload, config)
        report["gemm_flops_per_s"] = max(report["gemm_flops_per_s"], gemm_flops_per_second())
        report["engine"]["fraction_of_gemm"] = report["engine"]["model_flops_per_s"] / report["gemm_flops_per_s"]
        if not args.skip_hf:
            report["hf_generate"] = bench_hf(checkpoint, workload, args.hf_batch_sizes)
            report["speedup_vs_hf"] = report["engine"]["rollouts_per_s"] / report["hf_generate"]["rollouts_per_s"]
        if args.parity_streams:
            report["greedy_parity"] = greedy_parity(checkpoint, config, args.parity_streams, args.chunks)
    print(format_table(summary_rows(report), "engine benchmark"))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def summary_rows(report: dict) -> list[tuple[str, str]]:
    engine = report["engine"]
    rows = [("checkpoint", report["checkpoint"]), ("model parameters", f"{report['model_parameters'] / 1e6:.2f}M"),
            ("workload", "{num_states} states x {branches_per_state} branches x {num_chunks} chunks"
             .format(**report["workload"])),
            ("engine chunk rollouts/s", f"{engine['rollouts_per_s']:.1f} ({engine['seconds']:.1f} s)"),
            ("engine generated tok/s", f"{engine['generated_tokens_per_s']:.0f}"),
            ("engine model GFLOP/s", f"{engine['model_flops_per_s'] / 1e9:.1f}"),
            ("fp32 GEMM GFLOP/s", f"{report['gemm_flops_per_s'] / 1e9:.1f}"),
            ("engine / GEMM", f"{engine['fraction_of_gemm']:.1%}"),
            ("peak KV blocks / ideal", f"{engine['peak_kv_blocks']:.0f} / {engine['ideal_kv_blocks']} = "
                                       f"{engine['peak_over_ideal']:.3f}")]
    if "hf_generate" in report:
        hf = report["hf_generate"]
        rows += [("HF generate chunk rollouts/s", f"{hf['rollouts_per_s']:.2f} (batch {hf['best_batch_size']})"),
                 ("speedup vs HF", f"{report['speedup_vs_hf']:.1f}x")]
    if "greedy_parity" in report:
        parity = report["greedy_parity"]
        rows.append(("greedy parity (streams)", f"{parity['streams_equal']}/{parity['streams']} "
                                                f"({parity['positions_mismatched']} of {parity['positions_checked']} "
                                                f"positions differ)"))
    return rows


if __name__ == "__main__":
    sys.exit(main())
