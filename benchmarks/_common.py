"""Shared helpers of the benchmarks: interleaved repeats and medians of wall-clock and CPU time."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Times:
    """Seconds per run: wall clock, and CPU time of this process (all its threads)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def median(self, kind: str = "wall") -> float:
        return statistics.median(getattr(self, kind))

    def scaled(self, factor: float) -> Times:
        return Times([t * factor for t in self.wall], [t * factor for t in self.cpu])

    def show(self, unit: str = "s") -> str:
        scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
        runs = ", ".join(f"{v * scale:.3g}" for v in self.wall)
        return (f"median {self.median() * scale:.4g} {unit} wall (runs: {runs}), "
                f"{self.median('cpu') * scale:.4g} {unit} CPU")


def interleaved(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, Times]:
    """Time each case `repeats` times, the cases taking turns (so a change of load hits all of them alike)."""
    times = {name: Times() for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].cpu.append(time.process_time() - cpu)
            times[name].wall.append(time.perf_counter() - wall)
    return times


def ratio(slow: Times, fast: Times) -> str:
    return (f"{slow.median() / fast.median():.2f}x wall, "
            f"{slow.median('cpu') / fast.median('cpu'):.2f}x CPU")


def set_threads(threads: int | None) -> int:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def load_average() -> str:
    import os

    try:
        return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except OSError:
        return ""
