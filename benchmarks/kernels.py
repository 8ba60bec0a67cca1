"""Kernel benchmark: time and achieved memory bandwidth of decode and multi-prefix cascade attention.

Question: how close to the memory roofline do the Triton kernels run, and what does attending to each
shared prefix once (cascade) buy over plain paged attention when many branches share few prefixes?

On CUDA it times, in the same run, the Triton kernels and the vectorised torch path (kernels/
torch_attention.py, the CPU engine's implementation, run on the GPU as the baseline) and reports GB/s
against the device's peak. On CPU it measures the torch path only and says so.

Bytes counted are the least DRAM traffic the batch needs, the same figure for every implementation:
each distinct K/V row once (a shared prefix once, however many branches read it), the queries and the
outputs. Paged attention reads a shared prefix once per branch, and the GPU's L2 cache absorbs part of
that; cascade reads it once by construction.

Triton paths are timed twice: eager (each call pays Python and launch overhead) and replayed from a
CUDA graph (kernel time only, as an engine that captures its decode step would see it). The cascade
plan is built once outside the timed call, as the engine builds it once per step for all layers.

    python -m benchmarks.kernels --json kernels.json          # or: vla-mbpo bench kernels
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from benchmarks import common
from kernels import dispatch

# Peak DRAM bandwidth (bytes/s) by device name, used when torch does not report the memory clock.
KNOWN_PEAK_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12}


@dataclass(frozen=True)
class AttentionShape:
    """One benchmark case: num_prefixes x branches_per_prefix decoding sequences of prefix + suffix tokens."""

    name: str
    num_prefixes: int
    branches_per_prefix: int
    prefix_len: int
    suffix_len: int  # tokens after the prefix, this step's query included
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16

    def __post_init__(self) -> None:
        if min(self.num_prefixes, self.branches_per_prefix, self.suffix_len) < 1 or self.prefix_len < 0:
            raise ValueError(f"{self.name}: counts must be >= 1 and prefix_len >= 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_heads {self.num_heads} is not a multiple of {self.num_kv_heads}")

    @property
    def num_seqs(self) -> int:
        return self.num_prefixes * self.branches_per_prefix


@dataclass(frozen=True)
class Result:
    case: str
    implementation: str
    milliseconds: float
    bytes_moved: int
    gb_per_s: float
    fraction_of_peak: float | None
    speedup_vs_torch: float | None  # against the torch path's paged attention in the same case


@dataclass
class DecodeBatch:
    query: torch.Tensor  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    prefix_block_tables: torch.Tensor
    prefix_lens: torch.Tensor
    seq_prefix_ids: torch.Tensor
    scale: float


def build_decode_batch(shape: AttentionShape, dtype: torch.dtype, device: torch.device) -> DecodeBatch:
    """Every branch shares its prefix's block-aligned blocks and owns the rest (copy-on-write of the
    prefix's last partial block included), one decode query per sequence."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    bs = shape.block_size
    shared_blocks = shape.prefix_len // bs
    prefix_blocks = -(-shape.prefix_len // bs)
    seq_len = shape.prefix_len + shape.suffix_len
    own_blocks = -(-seq_len // bs) - shared_blocks
    num_blocks = shape.num_prefixes * (prefix_blocks + shape.branches_per_prefix * own_blocks)
    order = torch.randperm(num_blocks, generator=generator).to(torch.int32)
    prefix_tables, tables, cursor = [], [], 0
    for _ in range(shape.num_prefixes):
        prefix_table = order[cursor : cursor + prefix_blocks]
        cursor += prefix_blocks
        prefix_tables.append(prefix_table)
        for _ in range(shape.branches_per_prefix):
            tables.append(torch.cat([prefix_table[:shared_blocks], order[cursor : cursor + own_blocks]]))
            cursor += own_blocks
    cache_shape = (num_blocks, bs, shape.num_kv_heads, shape.head_dim)
    k_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    v_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    block_tables = torch.stack(tables).to(device)
    if shape.prefix_len % bs:  # the branches' copies of the prefix's partial last block
        partial = shape.prefix_len % bs
        owners = block_tables[:, shared_blocks].long()
        sources = torch.stack(prefix_tables)[:, shared_blocks].to(device).long()
        sources = sources.repeat_interleave(shape.branches_per_prefix)
        k_cache[owners, :partial] = k_cache[sources, :partial]
        v_cache[owners, :partial] = v_cache[sources, :partial]
    n = shape.num_seqs
    return DecodeBatch(
        query=torch.randn(n, shape.num_heads, shape.head_dim, dtype=dtype, device=device),
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        seq_lens=torch.full((n,), seq_len, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=device),
        prefix_block_tables=torch.stack(prefix_tables).to(device),
        prefix_lens=torch.full((shape.num_prefixes,), shape.prefix_len, dtype=torch.int32, device=device),
        seq_prefix_ids=torch.arange(shape.num_prefixes, dtype=torch.int32, device=device).repeat_interleave(
            shape.branches_per_prefix
        ),
        scale=shape.head_dim**-0.5,
    )


def bytes_moved(shape: AttentionShape, element_size: int) -> int:
    """Least DRAM traffic of one call: each distinct K/V row once, plus queries and outputs."""
    kv_row = 2 * shape.num_kv_heads * shape.head_dim * element_size  # one token's K and V
    kv_tokens = shape.num_prefixes * shape.prefix_len + shape.num_seqs * shape.suffix_len
    q_and_out = 2 * shape.num_seqs * shape.num_heads * shape.head_dim * element_size
    return kv_tokens * kv_row + q_and_out


def graph_replay(fn: Callable[[], object]) -> Callable[[], object]:
    """Capture fn (already compiled by a first call) in a CUDA graph; return its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, calls_per_sample: int = 5) -> float:
    """Median time per call of fn after warm-up (compilation excluded). On CUDA each sample times
    calls_per_sample back-to-back calls between two events, so the host's launch work overlaps the GPU's."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(calls_per_sample):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end) / calls_per_sample)
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def peak_bandwidth(device: torch.device) -> float | None:
    """Peak DRAM bytes/s: 2 transfers per memory clock times the bus width, or the known figure."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8
    return next((peak for name, peak in KNOWN_PEAK_BANDWIDTH.items() if name in props.name), None)


def machine_info(device: torch.device) -> dict:
    info = {**common.machine_info(), "device": str(device)}
    if device.type == "cuda":
        import triton

        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, num_sms=props.multi_processor_count, triton=triton.__version__,
                    peak_bandwidth_gb_per_s=(peak_bandwidth(device) or 0) / 1e9)
    return info


def run_case(shape: AttentionShape, dtype: torch.dtype, device: torch.device, repeats: int) -> list[Result]:
    batch = build_decode_batch(shape, dtype, device)
    paged_args = (batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                  batch.query_start_loc, batch.scale)
    cascade_args = (*paged_args[:-1], batch.prefix_block_tables, batch.prefix_lens, batch.seq_prefix_ids,
                    batch.scale)
    plan = dispatch.plan_cascade(batch.query_start_loc, batch.prefix_lens, batch.seq_prefix_ids, shape.num_seqs)
    backends = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    runs: dict[str, Callable[[], torch.Tensor]] = {}
    for backend in backends:
        runs[f"paged/{backend}"] = lambda b=backend: dispatch.paged_attention(*paged_args, backend=b)
        if shape.prefix_len:
            runs[f"cascade/{backend}"] = lambda b=backend: dispatch.cascade_attention(*cascade_args, plan=plan,
                                                                                      backend=b)
    expected = dispatch.paged_attention(*paged_args, backend="torch").float()
    peak = peak_bandwidth(device)
    moved = bytes_moved(shape, batch.k_cache.element_size())
    results: list[Result] = []
    torch_paged_ms = None
    for name, fn in runs.items():
        error = (fn().float() - expected).abs().max().item()
        if error > 3e-2:
            raise AssertionError(f"{shape.name} {name}: max abs error {error} against the torch path")
        timings = {name: time_ms(fn, device, repeats)}
        if name.endswith("/triton"):
            timings[f"{name}+graph"] = time_ms(graph_replay(fn), device, repeats)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the torch path's gathers must not crowd the next case
        torch_paged_ms = timings.get("paged/torch", torch_paged_ms)
        for implementation, ms in timings.items():
            gb_per_s = moved / (ms * 1e-3) / 1e9
            results.append(Result(
                case=shape.name, implementation=implementation, milliseconds=ms, bytes_moved=moved,
                gb_per_s=gb_per_s, fraction_of_peak=gb_per_s * 1e9 / peak if peak else None,
                speedup_vs_torch=torch_paged_ms / ms if torch_paged_ms else None,
            ))
    return results


def default_shapes(device: torch.device, quick: bool) -> list[AttentionShape]:
    if device.type != "cuda" or quick:  # the CPU torch path: the engine's tiny model sizes
        return [
            AttentionShape("decode_64x512", 64, 1, 0, 512, num_heads=8, num_kv_heads=2, head_dim=64),
            AttentionShape("cascade_16x16_p300_s100", 16, 16, 300, 100, num_heads=8, num_kv_heads=2, head_dim=64),
        ]
    return [
        AttentionShape("decode_256x1024", 256, 1, 0, 1024),
        AttentionShape("decode_8x16384_splitkv", 8, 1, 0, 16384),
        AttentionShape("cascade_64x16_p300_s100", 64, 16, 300, 100),
        AttentionShape("cascade_16x64_p1000_s50", 16, 64, 1000, 50),
    ]


def format_table(results: list[Result]) -> str:
    header = f"{'case':<26} {'implementation':<22} {'ms':>9} {'GB/s':>9} {'% peak':>7} {'vs torch paged':>15}"
    lines = [header, "-" * len(header)]
    for r in results:
        peak = f"{100 * r.fraction_of_peak:6.1f}%" if r.fraction_of_peak is not None else "    n/a"
        speedup = f"{r.speedup_vs_torch:14.2f}x" if r.speedup_vs_torch is not None else " " * 15
        lines.append(f"{r.case:<26} {r.implementation:<22} {r.milliseconds:9.3f} {r.gb_per_s:9.1f} {peak} {speedup}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vla-mbpo bench kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="the small CPU shapes on any device")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    if device.type != "cuda":
        print("NOTE: no CUDA device: this run measured the torch path (kernels/torch_attention.py) only; "
              "the Triton kernels were not timed.", file=sys.stderr)
    results, failures = [], []
    for shape in default_shapes(device, args.quick):
        try:
            results += run_case(shape, dtype, device, args.repeats)
        except (AssertionError, RuntimeError) as error:  # report the case and go on with the others
            failures.append(f"{shape.name}: {type(error).__name__}: {error}")
            print(f"FAILED {failures[-1]}", file=sys.stderr)
    print(format_table(results))
    report = {
        "benchmark": "kernels",
        "measured": "triton and torch" if device.type == "cuda" else "torch path only (no CUDA device)",
        "dtype": str(dtype),
        "machine": machine_info(device),
        "results": [asdict(r) for r in results],
        "failures": failures,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
