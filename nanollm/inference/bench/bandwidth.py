"""How close decoding comes to the memory's speed: weight bytes read per token, and the machine's copy bandwidth.

Owns gpt-fast's bandwidth figure for the benchmark's rows; the rows themselves are timing.py's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from nanollm.inference.bench.timing import Row, sync

__all__ = ["bandwidth", "memory_bandwidth", "weight_bytes_per_token"]


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once, bar an untied embedding table.

    The input embedding is a lookup that reads one row per token; tied to the LM head, the
    same table is read whole by the output matmul, so it counts. The KV cache read (which
    grows with the context) is not included, as in gpt-fast's figure.
    """
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied tensor is yielded once
    if not model.cfg.tie_embeddings:
        table = model.tok_embeddings.weight
        total -= table.numel() * table.element_size()
    return total


def memory_bandwidth(size_mb: int = 256, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Bytes/s of a large tensor copy (each byte read once and written once), best of `repeats`.

    256 MB is far past every cache level, so this is what DRAM delivers to torch's copy
    kernel with the current thread count: the ceiling a memory-bound decode step can reach.
    The best run is reported, not the median: it is the machine's capacity, and other
    processes only ever lower it.
    """
    device = torch.device(device)
    src = torch.rand(size_mb * 2**20 // 4, device=device)  # fp32; rand touches every page
    dst = torch.empty_like(src)
    dst.copy_(src)  # untimed: faults in dst's pages
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def bandwidth(rows: Sequence[Row], weight_bytes: int, copy_bytes_s: float) -> dict[str, float]:
    """gpt-fast's figure: weight bytes per token x cached tokens/s, next to the measured copy bandwidth.

    Uses the fastest cached point (the shortest prompt, where prefill and KV reads matter
    least). tokens/s there is end to end, so the figure slightly understates the decode
    loop's own bandwidth. A share near 1 means decoding is as fast as memory allows.
    """
    tok_s = max(r["cached_tok_s"] for r in rows)
    achieved = weight_bytes * tok_s
    return {
        "weight_mb": round(weight_bytes / 1e6, 4),
        "weight_read_gb_s": round(achieved / 1e9, 4),
        "memory_copy_gb_s": round(copy_bytes_s / 1e9, 4),
        "bandwidth_utilisation": round(achieved / copy_bytes_s, 4),
    }
