"""`vla-mbpo` console script: one subcommand per job, each owned by the module that implements it.

Subcommand modules are imported only when run, so `--help` stays fast and a CPU machine never imports
GPU-only code. Each module exposes `main(argv: list[str]) -> int` with its own argparse parser.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys

# name -> (module with main(argv), one-line help). Order is the order of the workflow.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("vla_mbpo.demo", "the main job, end to end on the embedded default: server + trainer + report"),
    "collect": ("trainer.collect", "record episodes of a scripted expert or a policy in the MuJoCo env"),
    "render": ("trainer.render", "write a PNG strip of a recorded episode, all views side by side"),
    "train-tokenizer": ("trainer.train_tokenizer", "train the discrete image tokenizer on recorded frames"),
    "tokenize": ("trainer.tokenize_recording", "encode a recording's frames once into a token cache (.npz)"),
    "train-world-model": ("trainer.train_world_model", "train the token world model on recorded episodes"),
    "eval-world-model": ("trainer.eval_world_model", "fidelity report: PSNR/SSIM per view, reward accuracy"),
    "build-default": ("trainer.build_default", "rebuild the embedded default checkpoint from scratch"),
    "serve": ("runtime.server", "start the gRPC rollout server over the engine"),
    "sft": ("trainer.sft", "behaviour-clone the VLA policy on recorded demos"),
    "train": ("trainer.mbpo", "VLA-MBPO: PPO on imagined rollouts served over gRPC (--simulator: the real env)"),
    "train-online-ppo": ("trainer.online_ppo", "baseline: PPO directly in the real env"),
    "evaluate": ("trainer.evaluate", "real-env success rate of a policy per task"),
    "report": ("trainer.report", "results table over methods and seeds (mean, spread) + learning-curve PNGs"),
    "bench": ("benchmarks", "run a benchmark: `vla-mbpo bench NAME [args]` (engine, server, kernels, env)"),
}


def available() -> dict[str, tuple[str, str]]:
    """The subcommands whose module is installed (each lands with its own issue)."""
    return {name: entry for name, entry in SUBCOMMANDS.items() if importlib.util.find_spec(entry[0])}


def run_benchmark(argv: list[str]) -> int:
    # Benchmarks are leaves: nothing imports them, so run them as their own process.
    if not argv or argv[0].startswith("-"):
        print("usage: vla-mbpo bench NAME [args...]   e.g. vla-mbpo bench engine --help", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if importlib.util.find_spec(f"benchmarks.{name}") is None:
        print(f"vla-mbpo bench: unknown benchmark {name!r}", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *rest])


def build_parser(commands: dict[str, tuple[str, str]]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vla-mbpo",
        description="Rollout-serving runtime and trainer for world-model-based RL of VLA policies. "
                    "Run `vla-mbpo COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in commands.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = available()
    parser = build_parser(commands)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        parser.parse_args(argv[:1] or ["--help"])  # prints help or the "invalid choice" error
        return 2
    name, rest = argv[0], argv[1:]
    if name == "bench":
        return run_benchmark(rest)
    from engine.host_memory import retain_freed_host_memory

    retain_freed_host_memory()  # every command's training or serving steps reuse their large CPU buffers
    module = importlib.import_module(commands[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
