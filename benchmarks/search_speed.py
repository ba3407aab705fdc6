"""Time best_under and pareto_front on a realistic-size space (single width per block).

Run from the repository root: python -m benchmarks.search_speed
"""

import time

import numpy as np
import pandas as pd

from dna.search import best_under, min_cost, pareto_front

ROWS = [288, 1548, 1548, 2808, 16848, 6]


def space(seed: int = 0) -> list[pd.DataFrame]:
    rng = np.random.default_rng(seed)

    def stage(n: int, in_w: int, out_w: int, scored: bool) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "in_width": np.full(n, in_w),
                "out_width": np.full(n, out_w),
                "score": rng.uniform(0.2, 1.5, n) if scored else np.zeros(n),
                "params": rng.integers(10_000, 1_000_000, n),
                "macs": rng.integers(1_000_000, 100_000_000, n),
            }
        )

    widths = [16, 24, 40, 80, 112, 192, 320]
    stages = [stage(1, 0, widths[0], False)]
    stages += [stage(n, widths[i], widths[i + 1], True) for i, n in enumerate(ROWS)]
    stages.append(stage(1, widths[-1], 0, False))
    return stages


def timed(label: str, fn, repeat: int = 3):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    print(f"{label:<48} best of {repeat}: {min(times) * 1e3:8.1f} ms")
    return result


def main() -> None:
    stages = space()
    lo, hi = min_cost(stages, "params"), sum(float(df["params"].max()) for df in stages)
    budget = {"params": lo + 0.3 * (hi - lo)}
    mlo = min_cost(stages, "macs")
    mhi = sum(float(df["macs"].max()) for df in stages)
    both = {"params": budget["params"], "macs": mlo + 0.3 * (mhi - mlo)}
    print(f"rows per searched block: {ROWS}")
    best = timed("best_under, params budget", lambda: best_under(stages, budget))
    front = timed("pareto_front(params), no budget", lambda: pareto_front(stages, "params"))
    timed("pareto_front(macs), params budget", lambda: pareto_front(stages, "macs", budget))
    both_best = timed("best_under, params and macs budgets", lambda: best_under(stages, both))
    both_front = timed(
        "pareto_front(macs), params and macs budgets",
        lambda: pareto_front(stages, "macs", both),
    )
    print(f"best score {best.score:.4f}, params {best.costs['params']:.0f}", end=" ")
    print(f"<= budget {budget['params']:.0f}")
    print(f"front points: {len(front)} (params axis), {len(both_front)} (two budgets)")
    print(f"best score with two budgets {both_best.score:.4f}")


if __name__ == "__main__":
    main()
