"""Server benchmark: workload W served over gRPC vs the same work on the in-process engine, in one run.

Workload W (defaults): 64 real start states x 16 branches x 2 chunks, sampling at temperature 1. The
in-process baseline is `benchmarks.engine.run_engine_workload` on a synchronous `Engine`. The served
run starts `vla-mbpo serve` as a subprocess with the same checkpoint and engine configuration and drives
it through `trainer.rollout_client.WorldModelClient` from this process: CreateStates with the start
images on the wire, one streamed Imagine per chunk (chunk 1 keeps its states), exactly the same actions
and seeds. Both timings span create-states to the last result of the last chunk; loading and a small
warm-up run are excluded. The two alternate for `--repeats` rounds and the best of each is compared;
only one engine is alive at a time (memory). On a shared machine other processes' load can differ between
the phases, so CPU seconds of the same work (in-process engine vs server process + client) are reported
beside the wall-clock ratio.

    python -m benchmarks.server --json server.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import format_table, machine_info
from benchmarks.engine import (
    DEFAULT_CHECKPOINT,
    SAMPLING,
    Workload,
    chunk_actions,
    resolve_checkpoint,
    run_engine_workload,
    start_states,
)
from engine.checkpoint import load_checkpoint
from engine.config import EngineConfig
from engine.engine import Engine
from engine.layout import TokenLayout
from trainer.rollout_client import WorldModelClient

REPO_ROOT = Path(__file__).resolve().parent.parent
WARMUP = Workload(2, 4, 2, seed=99)


@dataclass(frozen=True)
class ServedRun:
    seconds: float
    first_result_seconds: float  # from the first Imagine call to its first streamed result
    results: int
    client_cpu_seconds: float


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of another process (Linux /proc), so load from others cannot bias it."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")  # utime, stime


def kv_blocks_for(layout: TokenLayout, workload: Workload, block_size: int, headroom: float = 1.25) -> int:
    """Enough KV blocks for W without preemption: every prefix once, every branch's suffix, plus headroom."""
    prefix = 3 + layout.max_instruction_bytes + layout.observation_len
    suffix = workload.num_chunks * layout.chunk_len
    ideal = workload.num_states * math.ceil(prefix / block_size) + workload.num_branches * math.ceil(
        suffix / block_size)
    return int(ideal * headroom) + 64


# ---- in-process ---------------------------------------------------------------------------------
def bench_in_process(checkpoint: Path, config: EngineConfig, workload: Workload) -> dict:
    engine = Engine.from_checkpoint(checkpoint, config)
    run_engine_workload(engine, WARMUP, SAMPLING)
    before = os.times()
    seconds, _ = run_engine_workload(engine, workload, SAMPLING)
    after = os.times()
    assert engine.stats().kv_blocks_used == 0, "in-process run leaked blocks"
    del engine
    gc.collect()
    return {"seconds": seconds, "cpu_seconds": after.user + after.system - before.user - before.system,
            "system_cpu_seconds": after.system - before.system}


# ---- served -------------------------------------------------------------------------------------
class ServerProcess:
    """`vla-mbpo serve` in a subprocess on a free localhost port; stopped with SIGTERM."""

    def __init__(self, checkpoint: Path, config: EngineConfig) -> None:
        command = [sys.executable, "-m", "vla_mbpo.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0",
                   "--engine-block-size", str(config.block_size), "--engine-num-kv-blocks", str(config.num_kv_blocks),
                   "--engine-max-num-batched-tokens", str(config.max_num_batched_tokens),
                   "--engine-max-num-seqs", str(config.max_num_seqs), "--engine-device", config.device,
                   "--engine-num-threads", str(config.num_threads),
                   # A root state sits untouched while its branches run the later chunks: on a slow, shared
                   # machine that outlasts the default lease, which would (correctly) expire it mid-run.
                   "--state-ttl", "86400"]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        self.log: list[str] = []
        self._reader = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
        self._reader.start()
        self.target = f"127.0.0.1:{self._wait_for_port(timeout=300)}"

    def _wait_for_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log:
                match = re.search(r" serving \S+ on 127\.0\.0\.1:(\d+):", line)
                if match:
                    return int(match.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError("server exited during start-up:\n" + "".join(self.log))
            time.sleep(0.05)
        raise TimeoutError(f"server not up within {timeout}s")

    def stop(self) -> None:
        self.proc.terminate()
        if self.proc.wait(timeout=120) != 0:
            raise RuntimeError("server did not stop cleanly:\n" + "".join(self.log))


def run_served_workload(client: WorldModelClient, layout: TokenLayout, workload: Workload) -> ServedRun:
    """W through the client, the same states, actions and seeds as run_engine_workload."""
    states = start_states(layout, workload.num_states, workload.seed)
    actions = chunk_actions(layout, workload).astype(np.float32)
    seeds = [workload.seed * 7919 + b for b in range(workload.num_branches)]
    cpu = time.process_time()
    start = time.perf_counter()
    roots = client.create_states([s.instruction for s in states], [s.images for s in states])
    parents = [roots[b // workload.branches_per_state] for b in range(workload.num_branches)]
    held, first_result, received = list(roots), None, 0
    for chunk in range(workload.num_chunks):
        last = chunk == workload.num_chunks - 1
        kept: list[str | None] = [None] * workload.num_branches
        call_start = time.perf_counter()
        for result in client.imagine(parents, actions[chunk], seeds=seeds, keep_state=not last,
                                     temperature=SAMPLING.temperature, top_k=SAMPLING.top_k, top_p=SAMPLING.top_p):
            if first_result is None:
                first_result = time.perf_counter() - call_start
            kept[result.index] = result.state_id
            received += 1
        if not last:
            parents = kept
            held += kept
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    client.release(held)
    return ServedRun(seconds, first_result or 0.0, received, cpu)


def bench_served(checkpoint: Path, config: EngineConfig, layout: TokenLayout, workload: Workload) -> dict:
    server = ServerProcess(checkpoint, config)
    try:
        with WorldModelClient(server.target, timeout=None) as client:
            client.wait_ready(60)
            run_served_workload(client, layout, WARMUP)
            user, system = process_cpu_seconds(server.proc.pid)
            run = run_served_workload(client, layout, workload)
            user_after, system_after = process_cpu_seconds(server.proc.pid)
            server_cpu, server_system = user_after + system_after - user - system, system_after - system
            stats = client.stats()
    finally:
        server.stop()
    assert run.results == workload.num_rollouts, f"{run.results} results for {workload.num_rollouts} rollouts"
    assert (stats.live_states, stats.kv_blocks_used) == (0, 0), f"served run left {stats} behind"
    return {"seconds": run.seconds, "first_result_seconds": run.first_result_seconds,
            "cpu_seconds": server_cpu + run.client_cpu_seconds, "server_cpu_seconds": server_cpu,
            "server_system_cpu_seconds": server_system, "client_cpu_seconds": run.client_cpu_seconds,
            "prefix_cache_hit_rate": stats.prefix_cache_hit_rate}


# ---- entry point --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vla-mbpo bench server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--states", type=int, default=64)
    parser.add_argument("--branches", type=int, default=16)
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best of each is compared")
    # One torch thread by default: the served engine shares the machine with the gRPC loop and the client,
    # and on an oversubscribed 2-core machine two OpenMP threads spin-wait (measured here: 60x slower).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    workload = Workload(args.states, args.branches, args.chunks)
    with tempfile.TemporaryDirectory() as workdir:
        checkpoint, checkpoint_note = resolve_checkpoint(args.checkpoint, Path(workdir))
        loaded = load_checkpoint(checkpoint)
        layout = loaded.layout
        num_kv_blocks = kv_blocks_for(layout, workload, args.block_size)
        config = EngineConfig(block_size=args.block_size, num_kv_blocks=num_kv_blocks,
                              max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                              num_threads=args.threads, device=args.device)
        report: dict = {"machine": machine_info(), "checkpoint": checkpoint_note, "workload": asdict(workload),
                        "model_parameters": loaded.model_config.num_parameters, "engine_config": asdict(config),
                        "in_process_seconds": [], "served_seconds": [], "served_first_result_seconds": [],
                        "in_process_cpu_seconds": [], "served_cpu_seconds": [], "in_process_system_cpu_seconds": [],
                        "server_system_cpu_seconds": [], "load_average_1m": []}
        del loaded
        print(json.dumps(report["machine"]), file=sys.stderr)
        for round_ in range(args.repeats):
            report["load_average_1m"].append(os.getloadavg()[0])
            in_process = bench_in_process(checkpoint, config, workload)
            report["in_process_seconds"].append(in_process["seconds"])
            report["in_process_cpu_seconds"].append(in_process["cpu_seconds"])
            report["in_process_system_cpu_seconds"].append(in_process["system_cpu_seconds"])
            report["load_average_1m"].append(os.getloadavg()[0])
            served = bench_served(checkpoint, config, layout, workload)
            report["served_seconds"].append(served["seconds"])
            report["served_cpu_seconds"].append(served["cpu_seconds"])
            report["server_system_cpu_seconds"].append(served["server_system_cpu_seconds"])
            report["served_first_result_seconds"].append(served["first_result_seconds"])
            print(f"  round {round_}: in-process {report['in_process_seconds'][-1]:.2f} s, "
                  f"served {served['seconds']:.2f} s", file=sys.stderr)
    in_process, served_best = min(report["in_process_seconds"]), min(report["served_seconds"])
    report["in_process_rollouts_per_s"] = workload.num_rollouts / in_process
    report["served_rollouts_per_s"] = workload.num_rollouts / served_best
    report["served_over_in_process"] = report["served_rollouts_per_s"] / report["in_process_rollouts_per_s"]
    # CPU seconds of the same work (server + client vs the in-process engine): immune to other processes' load.
    report["served_over_in_process_cpu"] = min(report["in_process_cpu_seconds"]) / min(report["served_cpu_seconds"])
    report["generated_tokens_per_rollout"] = layout.generated_len
    report["target"] = 0.9
    report["meets_target"] = report["served_over_in_process"] >= report["target"]
    print(format_table(summary_rows(report), "server benchmark"))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def summary_rows(report: dict) -> list[tuple[str, str]]:
    tokens = report["generated_tokens_per_rollout"]
    return [
        ("checkpoint", report["checkpoint"]),
        ("model parameters", f"{report['model_parameters'] / 1e6:.2f}M"),
        ("device / threads", f"{report['engine_config']['device']} / {report['engine_config']['num_threads']}"),
        ("workload", "{num_states} states x {branches_per_state} branches x {num_chunks} chunks"
         .format(**report["workload"])),
        ("in-process chunk rollouts/s", f"{report['in_process_rollouts_per_s']:.1f} "
                                        f"({report['in_process_rollouts_per_s'] * tokens:.0f} generated tok/s)"),
        ("gRPC-served chunk rollouts/s", f"{report['served_rollouts_per_s']:.1f} "
                                         f"({report['served_rollouts_per_s'] * tokens:.0f} generated tok/s)"),
        ("served / in-process", f"{report['served_over_in_process']:.1%} (target >= 90%: "
                                f"{'met' if report['meets_target'] else 'NOT met'})"),
        ("by CPU seconds (load-free)", f"{report['served_over_in_process_cpu']:.1%} "
                                       f"({min(report['in_process_cpu_seconds']):.1f} s in-process vs "
                                       f"{min(report['served_cpu_seconds']):.1f} s server + client)"),
        # System time is page faults here: a served engine that does not reuse its freed host memory shows it.
        ("system CPU s: in-process / server", " ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(
            report["in_process_system_cpu_seconds"], report["server_system_cpu_seconds"], strict=True))),
        ("load average at each phase", " ".join(f"{x:.1f}" for x in report["load_average_1m"])),
        ("served first result", f"{min(report['served_first_result_seconds']):.2f} s after the Imagine call"),
        ("rounds (s) in-process", " ".join(f"{s:.2f}" for s in report["in_process_seconds"])),
        ("rounds (s) served", " ".join(f"{s:.2f}" for s in report["served_seconds"])),
    ]


if __name__ == "__main__":
    sys.exit(main())
