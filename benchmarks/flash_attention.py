"""Our from-scratch FlashAttention beside PyTorch's SDPA and the naive reference: time and peak extra memory.

Causal self-attention at several sequence lengths, forward alone (no_grad) and forward plus
backward. Peak memory is measured from torch.profiler's allocation events (profile_memory):
every CPU allocation and free is an event with its size, so the running sum over the call,
in time order, peaks at the most bytes the call held at once: its output, its temporaries
and (with backward) the input gradients; the inputs themselves are allocated before and
not counted. Prints a markdown table, the command, the machine and the load average.

    python benchmarks/flash_attention.py                      # T = 1024, 2048, 4096; 4 heads of 64
    python benchmarks/flash_attention.py --seq-len 4096 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from nanollm.hardware import describe_machine
from nanollm.model.attention import naive_attention
from nanollm.model.flash import BLOCK_K, BLOCK_Q, flash_attention

METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "naive": lambda q, k, v: naive_attention(q, k, v, 0),
    "flash (ours)": lambda q, k, v: flash_attention(q, k, v, 0),
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
}


def peak_bytes(fn: Callable[[], object]) -> int:
    """Most bytes held at once by allocations made inside fn(): the running sum of the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    held = peak = 0
    for event in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        held += event["args"]["Bytes"]  # > 0 allocation, < 0 free
        peak = max(peak, held)
    return peak


def seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, T: int, args: argparse.Namespace) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, T, args.head_dim, generator=g) for _ in range(3))
    attend = METHODS[name]

    def forward() -> None:
        with torch.no_grad():
            attend(q, k, v)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def forward_backward() -> None:
        attend(*leaves).sum().backward()
        for t in leaves:
            t.grad = None

    return {
        "fwd_ms": 1e3 * seconds(forward, args.repeats),
        "fwd_mb": peak_bytes(forward) / 1e6,
        "fwdbwd_ms": 1e3 * seconds(forward_backward, args.repeats),
        "fwdbwd_mb": peak_bytes(forward_backward) / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"machine: {describe_machine()}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"causal attention, B={args.batch}, heads={args.heads}, head_dim={args.head_dim}, fp32; "
        f"flash tiles {BLOCK_Q}x{BLOCK_K}; times are medians of {args.repeats}\n"
    )
    print(
        "| T | method | forward ms | forward peak MB | fwd+bwd ms | fwd+bwd peak MB | peak / naive's (fwd, fwd+bwd) |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    verdict = []
    for T in args.seq_len:
        rows = {name: measure(name, T, args) for name in METHODS}
        base = rows["naive"]
        for name, r in rows.items():
            share = f"{r['fwd_mb'] / base['fwd_mb']:.3f} / {r['fwdbwd_mb'] / base['fwdbwd_mb']:.3f}"
            print(
                f"| {T} | {name} | {r['fwd_ms']:.1f} | {r['fwd_mb']:.1f} | {r['fwdbwd_ms']:.1f} "
                f"| {r['fwdbwd_mb']:.1f} | {share} |"
            )
        ours = rows["flash (ours)"]
        worst = max(ours["fwd_mb"] / base["fwd_mb"], ours["fwdbwd_mb"] / base["fwdbwd_mb"])
        verdict.append((T, worst))
    print()
    for T, worst in verdict:
        status = "ok" if worst <= 0.25 else "ABOVE TARGET"
        print(f"T={T}: flash peak memory is at most {worst:.3f} of naive's (target <= 0.25): {status}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
