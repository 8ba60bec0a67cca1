"""Training-precision benchmark: one optimizer step of the image tokenizer and of the world model, float32 (the
trainers' CPU path before `--precision auto`) against what `auto` picks on this machine, in the same run.

Question: how much faster do `train-tokenizer` and `train-world-model` train with bfloat16 autocast (and, for the
tokenizer's convolutions, channels-last memory) on a CPU that computes bfloat16 natively, and do their losses
agree? Each case starts from the same seeded weights and batch; the step (forward, loss, backward, AdamW) is
timed best-of-N after a warm-up, and the first step's loss of each precision is reported next to the other.
Shapes are the defaults: tokenizer batch 64 of 64x64 frames, world model batch 8 of full-length streams of the
shipped layout (`checkpoints/default/layout.json`). On a CPU without native bfloat16 `auto` is float32 and the
ratio is ~1.

    python -m benchmarks.training_precision --json out.json      # or: vla-mbpo bench training_precision
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from benchmarks.common import best_seconds, format_table, machine_info
from engine.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from engine.layout import TokenLayout
from trainer.precision import cpu_has_native_bf16, uses_bf16_autocast
from trainer.train_world_model import WorldModelArchitecture

DEFAULT_LAYOUT = Path(__file__).resolve().parent.parent / "checkpoints" / "default" / "layout.json"


@dataclass(frozen=True)
class StepSetup:
    """One precision of one model's training step: bfloat16 autocast or not, channels-last weights or not."""

    name: str
    bf16: bool
    channels_last: bool


def tokenizer_step(setup: StepSetup, batch_size: int, seed: int) -> tuple[Callable[[], float], float]:
    model = ImageTokenizer.random(ImageTokenizerConfig(), seed)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch_size, 64, 64, 3, generator=generator).mul(2).sub(1).permute(0, 3, 1, 2)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    else:
        pixels = pixels.contiguous()
    return optimizer_step(model, lambda: model(pixels)[0], lambda out: F.mse_loss(out.float(), pixels), setup.bf16)


def world_model_step(setup: StepSetup, batch_size: int, seed: int, layout: TokenLayout,
                     ) -> tuple[Callable[[], float], float]:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(WorldModelArchitecture().llama_config(layout))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, layout.vocab_size, (batch_size, layout.max_stream_len), generator=generator)
    return optimizer_step(model, lambda: model(input_ids=ids).logits,
                          lambda logits: F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten()),
                          setup.bf16)


def optimizer_step(model: torch.nn.Module, forward: Callable[[], torch.Tensor],
                   loss_of: Callable[[torch.Tensor], torch.Tensor], bf16: bool) -> tuple[Callable[[], float], float]:
    """The timed step (forward under autocast when bf16, float32 loss, backward, AdamW) and its first call's loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = forward()
        loss = loss_of(out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step, step()


def measure(make_step: Callable[[StepSetup], tuple[Callable[[], float], float]], baseline: StepSetup,
            candidate: StepSetup, repeats: int) -> dict:
    """Seconds per step and first-step loss of both setups, and the candidate's speed-up over the baseline."""
    result = {}
    for setup in (baseline, candidate):
        step, first_loss = make_step(setup)
        result[setup.name] = {"bf16_autocast": setup.bf16, "channels_last": setup.channels_last,
                              "seconds_per_step": best_seconds(step, repeats), "first_step_loss": first_loss}
    result["speedup"] = result[baseline.name]["seconds_per_step"] / result[candidate.name]["seconds_per_step"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer-batch-size", type=int, default=64)
    parser.add_argument("--world-model-batch-size", type=int, default=8)
    parser.add_argument("--layout", default=str(DEFAULT_LAYOUT))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layout = TokenLayout.load(args.layout)
    auto_bf16 = uses_bf16_autocast("auto", torch.device("cpu"))
    float32 = StepSetup("float32", bf16=False, channels_last=False)
    results = {
        "machine": machine_info(), "cpu_has_native_bf16": cpu_has_native_bf16(), "auto_uses_bf16": auto_bf16,
        "tokenizer": measure(lambda s: tokenizer_step(s, args.tokenizer_batch_size, args.seed), float32,
                             StepSetup("auto", bf16=auto_bf16, channels_last=True), args.repeats),
        "world_model": measure(lambda s: world_model_step(s, args.world_model_batch_size, args.seed, layout),
                               float32, StepSetup("auto", bf16=auto_bf16, channels_last=False), args.repeats),
    }
    rows = []
    for name in ("tokenizer", "world_model"):
        case = results[name]
        rows.append((f"{name} float32 s/step", f"{case['float32']['seconds_per_step']:.3f}"))
        rows.append((f"{name} auto s/step", f"{case['auto']['seconds_per_step']:.3f}"))
        rows.append((f"{name} speed-up (float32 / auto)", f"{case['speedup']:.2f}x"))
        rows.append((f"{name} first-step loss float32 / auto",
                     f"{case['float32']['first_step_loss']:.4f} / {case['auto']['first_step_loss']:.4f}"))
    print(format_table(rows, f"training step, {args.threads} threads, auto = "
                             f"{'bfloat16 autocast' if auto_bf16 else 'float32'} on {results['machine']['processor']}"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
