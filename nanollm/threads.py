"""How many CPU threads one nanollm process may use: the machine's CPUs shared by the processes that run at once.

Two kinds of neighbour are known without asking the user: the other ranks of a torchrun job on
this node (LOCAL_WORLD_SIZE) and the other experiments of `dvc queue start -j N`, each of which
runs under a `dvc exp queue-worker` process of its own. Oversubscribing the cores is not a
small loss on a CPU: two queued experiments, each running torch's default of one thread per
core on 2 cores, were reported with cached decoding fallen from 384 to 33 tokens/s as OpenMP's
barriers stalled (docs/experiments.md measures -j 1 against -j 2 with the threads divided).
This module imports no torch, so the CLI can decide before any stage loads it; the caller
applies the answer (`apply_threads`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["apply_threads", "available_cpus", "default_threads", "queue_workers"]

# what other processes started by the same budget read: OpenMP (torch's intra-op pool, through
# which also numpy's BLAS) and MKL
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def queue_workers(proc: Path = Path("/proc")) -> int:
    """How many `dvc exp queue-worker` processes run on this machine now (0 outside a queue, or off Linux).

    Each runs one queued experiment at a time, so their number is the -j of `dvc queue start`
    (all queues of the machine count: they share its cores too).
    """
    count = 0
    try:
        entries = list(proc.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if b"queue-worker" in argv and b"exp" in argv:
            count += 1
    return count


def default_threads(environ: dict[str, str] | None = None) -> tuple[int, str]:
    """(threads, why): the available CPUs divided among this node's torchrun ranks and dvc queue workers."""
    environ = os.environ if environ is None else environ
    cpus = available_cpus()
    ranks = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    workers = queue_workers()
    sharing = max(1, ranks) * max(1, workers)
    threads = max(1, cpus // sharing)
    parts = [f"{cpus} CPUs"]
    if ranks > 1:
        parts.append(f"{ranks} torchrun processes")
    if workers > 1:
        parts.append(f"{workers} dvc queue workers")
    return threads, " / ".join(parts) if len(parts) > 1 else f"{cpus} CPUs, no other nanollm process known"


def apply_threads(threads: int) -> None:
    """Use `threads` threads from now on: torch's intra-op pool, and OpenMP/MKL of any child process."""
    for name in _THREAD_VARIABLES:
        os.environ[name] = str(threads)
    torch = sys.modules.get("torch")  # imported already: set it now; else it reads OMP_NUM_THREADS at import
    if torch is not None:
        torch.set_num_threads(threads)
