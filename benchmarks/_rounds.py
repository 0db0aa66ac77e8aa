"""Timing sides against each other in alternating rounds, and the table of their medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternating_medians(sides: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each side: `rounds` rounds of `calls` calls each, the order reversed every
    other round, so ordering effects (a neighbour evicting the cache, the clock ramping) fall on every side."""
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            for _ in range(calls):
                sides[name]()
            times[name].append((time.perf_counter() - t0) / calls)
    return {name: statistics.median(v) for name, v in times.items()}


def print_table(what: str, medians: dict[str, float], baseline: str) -> None:
    """A markdown table of each side's milliseconds per call and its ratio to `baseline`'s."""
    print(f"| {what} | ms a step | this / {baseline} |")
    print("| --- | ---: | ---: |")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1e3:.1f} | x{seconds / medians[baseline]:.2f} |")
