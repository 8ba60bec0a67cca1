"""`vla-mbpo build-default`: rebuild the embedded default checkpoint (checkpoints/default) from scratch.

Stages, each the project's own command with the arguments shown in `<work-dir>/commands.json`:
  1. collect      the demo recording (skipped when --data already holds a manifest.json)
  2. train-tokenizer
  3. tokenize every episode once into <work-dir>/tokens.npz (shared by both world models)
  4. train-world-model (IVD, the served default) and, with --ablation, the no-IVD variant at the same budget,
     run side by side (a second process) since neither fills a GPU
     then, with --finetune-steps N, fine-tune the default from its own weights (oversampled 'yes' windows, lower
     lr; the paper fine-tunes the world model on each refill's data this way)
  5. eval-world-model on held-out episodes -> <work-dir>/eval_ivd.json (+ eval_independent.json) and the grid

Stage 1 of the shipped checkpoints/default (stages 2-4 are fine-tunes of it, each with its own JSON in
checkpoints/default_build/) was produced by this command on one H100 (the recording made by
`vla-mbpo collect --task multi --episodes 300 --skill 0.5 --post-success-steps 0 --out /work/data/demos`, the
recording from before collect filmed on after success; step 1 now records with collect's default of 16
post-success steps); it took 166 s there (tokenizer 36 s, world model 69 s, each eval ~19 s):

    vla-mbpo build-default --data /work/data/demos --out checkpoints/default --work-dir runs/build_default \\
        --device cuda --tokenizer-steps 1500 --world-model-steps 1500 --world-model-batch-size 32 \\
        --ablation --eval-windows 128 --grid-png docs/images/world_model_rollout.png

Its reports are in checkpoints/default_build/. That budget was set by the GPU time left, not by quality:
the model is undertrained (see the report); more --world-model-steps is the first thing to raise.
On a 2-core CPU drop `--device cuda`: with native bfloat16 (AVX512-BF16, `--precision auto`) the tokenizer's
3,000 steps come to ~2 hours at the 2.6 s per step the precision benchmark measured (7.0 s in float32), and
`vla-mbpo train-world-model`'s 800 default steps to ~18 minutes at the 1.35 s per step of a 3,000-step run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from engine.image_tokenizer import ImageTokenizer
from trainer import eval_world_model, train_tokenizer, train_world_model
from trainer.precision import PRECISIONS
from trainer.tokenize_recording import TokenizeConfig, tokenize_recording
from trainer.world_model_data import save_token_cache


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-mbpo build-default", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/work/data/demos", help="recording; collected here if missing")
    parser.add_argument("--collect-episodes", type=int, default=300)
    parser.add_argument("--collect-skill", type=float, default=0.5)
    parser.add_argument("--out", default="checkpoints/default", help="checkpoint directory to write")
    parser.add_argument("--work-dir", default="runs/build_default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="training precision of the tokenizer and world models (trainer/precision.py)")
    parser.add_argument("--tokenizer-steps", type=int, default=3000)
    parser.add_argument("--world-model-steps", type=int, default=800)
    parser.add_argument("--world-model-batch-size", type=int, default=8)
    parser.add_argument("--world-model-positive-fraction", type=float, default=0.0,
                        help="share of each world-model batch drawn from windows with a 'yes' reward")
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="then fine-tune the world model from its own weights this many steps (0: skip)")
    parser.add_argument("--finetune-batch-size", type=int, default=8)
    parser.add_argument("--finetune-lr", type=float, default=2e-4)
    parser.add_argument("--finetune-warmup-steps", type=int, default=20)
    parser.add_argument("--finetune-positive-fraction", type=float, default=0.25)
    parser.add_argument("--finetune-device", help="device of the fine-tune stage (default: --device)")
    parser.add_argument("--finetune-threads", type=train_world_model.positive_int,
                        help="torch CPU threads of the fine-tune stage")
    parser.add_argument("--ablation", action="store_true", help="also train and evaluate the no-IVD variant")
    parser.add_argument("--grid-png", help="real-vs-imagined grid of the default checkpoint")
    parser.add_argument("--eval-windows", type=int, default=256)
    return parser


def world_model_argv(args: argparse.Namespace, tokenizer_dir: Path, tokens: Path) -> list[str]:
    """train-world-model arguments shared by the default and its no-IVD ablation (same data, same budget)."""
    return ["--tokenizer", str(tokenizer_dir), "--token-cache", str(tokens), "--device", args.device,
            "--precision", args.precision, "--steps", str(args.world_model_steps),
            "--batch-size", str(args.world_model_batch_size),
            "--positive-fraction", str(args.world_model_positive_fraction)]


def finetune_argv(args: argparse.Namespace, tokenizer_dir: Path, tokens: Path) -> list[str] | None:
    """train-world-model arguments of the fine-tune stage (starts from and overwrites --out), or None to skip.

    Why a second stage: 'yes' labels are ~1% of windows (only an episode's final frame), so the reward answer
    is learned last; a short run from the trained weights with oversampled positives and a lower learning
    rate teaches it without retraining the image prediction.
    """
    if args.finetune_steps <= 0:
        return None
    return ["--tokenizer", str(tokenizer_dir), "--token-cache", str(tokens),
            "--device", args.finetune_device or args.device, "--precision", args.precision,
            "--init-from", args.out, "--out", args.out,
            "--work-dir", str(Path(args.work_dir) / "world_model_finetune_work"),
            "--steps", str(args.finetune_steps), "--batch-size", str(args.finetune_batch_size),
            "--lr", str(args.finetune_lr), "--warmup-steps", str(args.finetune_warmup_steps),
            "--positive-fraction", str(args.finetune_positive_fraction),
            *(["--threads", str(args.finetune_threads)] if args.finetune_threads else [])]


def _run_stage(name: str, main, argv: list[str], log: dict) -> None:
    started = time.perf_counter()
    print(f"[build-default] {name}: {' '.join(argv)}", flush=True)
    code = main(argv)
    if code:
        raise SystemExit(f"build-default: stage {name} failed with exit code {code}")
    log[name] = {"argv": argv, "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log: dict = {}
    if not (Path(args.data) / "manifest.json").is_file():
        from trainer import collect  # needs MuJoCo, so only imported when recording

        _run_stage("collect", collect.main, ["--task", "multi", "--episodes", str(args.collect_episodes),
                                             "--skill", str(args.collect_skill), "--out", args.data], log)
    tokenizer_dir = work / "tokenizer"
    _run_stage("train-tokenizer", train_tokenizer.main,
               ["--data", args.data, "--out", str(tokenizer_dir), "--work-dir", str(work / "tokenizer_work"),
                "--steps", str(args.tokenizer_steps), "--device", args.device, "--precision", args.precision], log)

    started = time.perf_counter()
    tokenizer = ImageTokenizer.from_pretrained(tokenizer_dir, device=args.device)
    tokens = work / "tokens.npz"
    save_token_cache(tokens, *tokenize_recording(TokenizeConfig(args.data), tokenizer))
    log["tokenize"] = {"seconds": round(time.perf_counter() - started, 1)}

    common = world_model_argv(args, tokenizer_dir, tokens)
    ablation_ckpt = work / "independent_views"
    ablation = None
    if args.ablation:
        ablation_argv = [*common, "--out", str(ablation_ckpt), "--work-dir", str(work / "independent_views_work"),
                         "--independent-views"]
        ablation = subprocess.Popen([sys.executable, "-m", "trainer.train_world_model", *ablation_argv],
                                    stdout=subprocess.DEVNULL)
        log["train-world-model-independent"] = {"argv": ablation_argv}
    _run_stage("train-world-model", train_world_model.main,
               [*common, "--out", args.out, "--work-dir", str(work / "world_model_work")], log)
    finetune = finetune_argv(args, tokenizer_dir, tokens)
    if finetune is not None:
        _run_stage("finetune-world-model", train_world_model.main, finetune, log)
    eval_argv = ["--checkpoint", args.out, "--data", args.data, "--json", str(work / "eval_ivd.json"),
                 "--device", args.device, "--num-windows", str(args.eval_windows)]
    _run_stage("eval-world-model", eval_world_model.main,
               [*eval_argv, *(["--grid-png", args.grid_png] if args.grid_png else [])], log)
    if ablation is not None:
        if ablation.wait():
            raise SystemExit(f"build-default: the independent-views training failed ({ablation.returncode})")
        _run_stage("eval-world-model-independent", eval_world_model.main,
                   ["--checkpoint", str(ablation_ckpt), "--data", args.data, "--json",
                    str(work / "eval_independent.json"), "--device", args.device,
                    "--num-windows", str(args.eval_windows)], log)
    (work / "commands.json").write_text(json.dumps(log, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
