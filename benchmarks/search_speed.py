"""Search speed: exact budgeted search and Pareto front (dna.search) on spaces the size of the paper's, and the
original code's traversal (candidates sorted by score, nested loops pruned by the budget, a shrink rule).

    python -m benchmarks.search_speed                  # everything below
    python -m benchmarks.search_speed --baseline-limit 120 --instances 300

1. Paper space: configs/imagenet.yaml's space (blocks of 288, 1548, 1548, 2808, 18144 and 6 candidates, two input
   widths where the block before has two widths, ~2e17 networks) with its real per-candidate parameters and
   multiply-adds from MBConvSpace.candidate_table, and scores drawn to fall with cost (plus noise).
2. The same with a single width per block (synthetic random costs), as the earlier version of this script timed.
3. The original traversal against dna.search.best_under: on the paper-size space with one input width per block
   (what the original handled), and on many small random instances, counting how often it misses the optimum.

The candidate tables of the paper space take a minute or two to count (torch's FLOP counter at 224 px); they are
cached under outputs/benchmarks/.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._common import interleaved, load_average
from dna.search import best_under, min_cost, pareto_front

ROWS = [288, 1548, 1548, 2808, 18144, 6]
CACHE = Path("outputs/benchmarks")


# spaces ---------------------------------------------------------------------------------------------------------------
def paper_tables() -> list[pd.DataFrame]:
    """Stem, the six searched blocks and the head of configs/imagenet.yaml, unscored, with real costs (cached)."""
    from dna.config import load_params
    from dna.spaces import build_space

    params = load_params("configs/imagenet.yaml", check_paths=False)
    key = hashlib.sha256(params.space.model_dump_json().encode()).hexdigest()[:12]
    path = CACHE / f"imagenet_tables_{key}.pkl"
    if path.is_file():
        return pd.read_pickle(path)
    start = time.perf_counter()
    space = build_space(params.space, params.data.channels, params.data.image_size, 1000)
    stages = [space.stem_table(), *(space.candidate_table(b) for b in range(space.num_blocks)), space.head_table()]
    tables = [s.to_frame() for s in stages]
    print(f"(counted the paper space's costs in {time.perf_counter() - start:.0f} s; cached at {path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.to_pickle(tables, path)
    return tables


def scored(tables: list[pd.DataFrame], seed: int = 0, noise: float = 0.05) -> list[pd.DataFrame]:
    """Scores that fall with a candidate's multiply-adds (z-scored log within its block) plus Gaussian noise.

    A candidate has one score whatever its input width, as a real rating table has.
    """
    rng = np.random.default_rng(seed)
    out = [tables[0]]
    for t in tables[1:-1]:
        t = t.copy()
        first = t.groupby(["cell", "path"], sort=False)["macs"].transform("min")
        z = np.log(first.to_numpy(float))
        z = (z - z.mean()) / (z.std() or 1.0)
        keys = pd.factorize(t["cell"] + "/" + t["path"])[0]
        jitter = rng.normal(0.0, noise, keys.max() + 1)[keys]
        t["score"] = np.clip(0.6 - 0.12 * z + jitter, 0.01, None)
        out.append(t)
    return out + [tables[-1]]


def with_latency(stages: list[pd.DataFrame], seed: int = 0) -> list[pd.DataFrame]:
    """A made-up latency_ms column (multiply-adds at 50 GMAC/s plus 20 us a layer, times lognormal noise), to time
    the search on a non-integer axis the size of the paper's space (a real profile at 224 px is `dna profile`)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in stages:
        layers = t["depth"].to_numpy(float) if "depth" in t.columns else np.ones(len(t))
        noise = rng.lognormal(0.0, 0.1, len(t))
        out.append(t.assign(latency_ms=(t["macs"].to_numpy(float) / 5e7 + 0.02 * layers) * noise))
    return out


def single_width(tables: list[pd.DataFrame]) -> list[pd.DataFrame]:
    """One input width per block (its smallest) and one width per boundary: what the original code handled."""
    out = []
    for i, t in enumerate(tables):
        t = t[t["in_width"] == t["in_width"].min()].reset_index(drop=True).copy()
        t["in_width"], t["out_width"] = (0 if i == 0 else i), (i + 1 if i < len(tables) - 1 else 0)
        out.append(t)
    return out


def synthetic(seed: int = 0) -> list[pd.DataFrame]:
    """Single-width chain with uniform random scores and costs (the earlier version of this benchmark)."""
    rng = np.random.default_rng(seed)

    def stage(n: int, in_w: int, out_w: int, with_score: bool) -> pd.DataFrame:
        return pd.DataFrame({
            "in_width": np.full(n, in_w), "out_width": np.full(n, out_w),
            "score": rng.uniform(0.2, 1.5, n) if with_score else np.zeros(n),
            "params": rng.integers(10_000, 1_000_000, n), "macs": rng.integers(1_000_000, 100_000_000, n)})

    widths = [16, 24, 40, 80, 112, 192, 320]
    stages = [stage(1, 0, widths[0], False)]
    stages += [stage(n, widths[i], widths[i + 1], True) for i, n in enumerate(ROWS)]
    return stages + [stage(1, widths[-1], 0, False)]


def random_instance(rng: np.random.Generator, sizes: list[int]) -> tuple[list[pd.DataFrame], float]:
    """A small single-width chain with costs spread over a decade and scores falling with cost, and a budget."""
    stages = [pd.DataFrame({"in_width": [0], "out_width": [1], "score": [0.0], "macs": [1000.0]})]
    for i, n in enumerate(sizes):
        macs = rng.lognormal(np.log(1e5), 0.6, n).round()
        z = (np.log(macs) - np.log(macs).mean()) / np.log(macs).std()
        score = np.clip(0.6 - rng.uniform(0.05, 0.2) * z + rng.normal(0, 0.05, n), 0.01, None)
        stages.append(pd.DataFrame({"in_width": i + 1, "out_width": i + 2, "score": score, "macs": macs}))
    stages.append(pd.DataFrame({"in_width": [len(sizes) + 1], "out_width": [0], "score": [0.0], "macs": [500.0]}))
    lo, hi = min_cost(stages, "macs"), sum(float(s["macs"].max()) for s in stages)
    return stages, lo + rng.uniform(0.1, 0.6) * (hi - lo)


# the original traversal -------------------------------------------------------------------------------------------
class Timeout(Exception):
    pass


def traversal(stages: list[pd.DataFrame], axis: str, budget: float, limit_s: float = float("inf")):
    """The original search, for a single-width chain: returns (score, cost, rows) or None, and loop iterations.

    Each searched block's candidates are sorted by score. Nested loops run over the blocks in order; a partial
    network is skipped when its cost plus the smallest cost of the blocks after it exceeds the budget. In the
    innermost block the first (best-scoring) candidate that fits ends the loop, and the loop's range shrinks to
    that position for every later prefix; when it shrinks to nothing, the enclosing loop's range shrinks to its
    current position, and so on outwards. That shrink rule assumes later prefixes cannot do better, which is not
    true in general: it is a heuristic.
    """
    fixed = stages[0][axis].min() + stages[-1][axis].min()
    blocks = stages[1:-1]
    orders = [np.argsort(b["score"].to_numpy(), kind="stable") for b in blocks]
    score = [b["score"].to_numpy(float)[o].tolist() for b, o in zip(blocks, orders)]
    cost = [b[axis].to_numpy(float)[o].tolist() for b, o in zip(blocks, orders)]
    k = len(blocks)
    after = [sum(min(c) for c in cost[j + 1:]) for j in range(k)]
    limits = [budget - fixed - after[j] for j in range(k)]
    sizes = [len(c) for c in cost]
    maxes = list(sizes)
    index = [0] * k
    best = {"score": float("inf"), "cost": None, "rows": None}
    count = [0]
    deadline = time.perf_counter() + limit_s

    def level(j: int, spent: float, total: float) -> None:
        last = j == k - 1
        for i in range(maxes[j]):  # the range is fixed when the loop starts; maxes[j] may shrink inside it
            count[0] += 1
            if count[0] % 65536 == 0 and time.perf_counter() > deadline:
                raise Timeout(f"{count[0]:,} loop iterations, outermost block at candidate {index[0] + 1} of "
                              f"{sizes[0]}")
            if j > 0 and i >= maxes[j]:  # (the outermost loop never checks its range again)
                if not last and maxes[j] == 0:
                    maxes[j - 1], maxes[j] = index[j - 1], sizes[j]
                break
            c = spent + cost[j][i]
            if c > limits[j]:
                continue
            s = total + score[j][i]
            index[j] = i
            if not last:
                level(j + 1, c, s)
                continue
            if s < best["score"]:
                best.update(score=s, cost=c + fixed, rows=tuple(index))
            maxes[j] = i
            if maxes[j] == 0 and j > 0:
                maxes[j - 1], maxes[j] = index[j - 1], sizes[j]
            break

    level(0, 0.0, 0.0)
    if best["rows"] is None:
        return None, count[0]
    rows = tuple(int(o[i]) for o, i in zip(orders, best["rows"]))
    return (best["score"], best["cost"], (0, *rows, 0)), count[0]


# benchmark --------------------------------------------------------------------------------------------------------
def show(label: str, times, unit: str = "ms") -> None:
    print(f"  {label:<52} {times.show(unit)}")


def exact_timings(stages: list[pd.DataFrame], repeats: int, label: str) -> None:
    axes = [a for a in ("params", "macs") if a in stages[1].columns]
    lo = {a: min_cost(stages, a) for a in axes}
    hi = {a: sum(float(s[a].max()) for s in stages) for a in axes}
    one = {"macs": lo["macs"] + 0.3 * (hi["macs"] - lo["macs"])}
    both = {a: lo[a] + 0.3 * (hi[a] - lo[a]) for a in axes}
    sizes = [len(s) for s in stages[1:-1]]
    networks = 1
    for s in stages[1:-1]:
        networks *= len(s.drop_duplicates(["cell", "path"])) if "path" in s.columns else len(s)
    print(f"{label}: rows per searched block {sizes}, {float(networks):.2e} networks")
    got = {}
    cases = {
        f"best_under, macs <= {one['macs']:.4g}": lambda: got.__setitem__("best", best_under(stages, one)),
        "pareto_front(macs), no budget": lambda: got.__setitem__("front", pareto_front(stages, "macs")),
        "pareto_front(params), no budget": lambda: got.__setitem__("front_p", pareto_front(stages, "params")),
        "best_under, params and macs budgets": lambda: got.__setitem__("both", best_under(stages, both)),
        "pareto_front(macs), params and macs budgets": lambda: got.__setitem__("front_both",
                                                                               pareto_front(stages, "macs", both)),
    }
    if "latency_ms" in stages[1].columns:
        lo_lat = min_cost(stages, "latency_ms")
        lat = lo_lat + 0.3 * (sum(float(s["latency_ms"].max()) for s in stages) - lo_lat)
        cases[f"best_under, latency_ms <= {lat:.4g}"] = lambda: best_under(stages, {"latency_ms": lat})
        cases["best_under, latency_ms and macs budgets"] = lambda: best_under(
            stages, {"latency_ms": lat, "macs": one["macs"]})
        cases["pareto_front(latency_ms), no budget"] = lambda: got.__setitem__(
            "front_l", pareto_front(stages, "latency_ms"))
    for name, times in interleaved(cases, repeats).items():
        show(name, times)
    print(f"  chosen: score {got['best'].score:.4f}, macs {got['best'].costs['macs']:.4g}; front sizes: "
          f"{len(got['front'])} (macs), {len(got['front_p'])} (params), {len(got['front_both'])} (two budgets)"
          + (f", {len(got['front_l'])} (latency_ms)" if "front_l" in got else ""))


def baseline_paper(tables: list[pd.DataFrame], limit_s: float) -> None:
    stages = single_width(scored(tables))
    lo, hi = min_cost(stages, "macs"), sum(float(s["macs"].max()) for s in stages)
    budget = lo + 0.3 * (hi - lo)
    start = time.perf_counter()
    exact = best_under(stages, {"macs": budget})
    exact_s = time.perf_counter() - start
    print(f"paper space, one input width per block, macs <= {budget:.4g}:")
    print(f"  best_under: {exact_s * 1e3:.0f} ms, score {exact.score:.4f}")
    start = time.perf_counter()
    try:
        found, loops = traversal(stages, "macs", budget, limit_s)
    except Timeout as stop:
        print(f"  original traversal: did not finish within {limit_s:.0f} s ({stop}); "
              f">{limit_s / exact_s:.0f}x the exact search's time")
        return
    took = time.perf_counter() - start
    if found is None:
        verdict = "none found"
    elif found[0] <= exact.score + 1e-9:
        verdict = f"score {found[0]:.4f} (the optimum)"
    else:
        verdict = f"score {found[0]:.4f} (misses the optimum by {found[0] - exact.score:.4f})"
    print(f"  original traversal: {took:.1f} s, {loops:,} loop iterations, {verdict}; "
          f"{took / exact_s:.0f}x the exact search's time")


def baseline_random(instances: int, sizes: list[int], seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    misses, none, gaps, t_exact, t_trav = 0, 0, [], [], []
    for _ in range(instances):
        stages, budget = random_instance(rng, sizes)
        start = time.perf_counter()
        exact = best_under(stages, {"macs": budget})
        t_exact.append(time.perf_counter() - start)
        start = time.perf_counter()
        found, _ = traversal(stages, "macs", budget)
        t_trav.append(time.perf_counter() - start)
        if found is None:
            none += 1
            misses += 1
        elif found[0] > exact.score + 1e-9:
            misses += 1
            gaps.append((found[0] - exact.score) / exact.score)
        assert found is None or found[0] >= exact.score - 1e-9, "the traversal beat the exact search"
    print(f"random instances ({instances}, blocks of {sizes}, scores falling with cost plus noise, budgets between "
          f"10% and 60% of the cost range):")
    print(f"  original traversal misses the optimum in {misses}/{instances} ({misses / instances:.0%})"
          f"{f', finds nothing in {none}' if none else ''}; score worse by median "
          f"{np.median(gaps) if gaps else 0:.2%}, max {max(gaps) if gaps else 0:.2%} where it misses")
    print(f"  median time: traversal {np.median(t_trav) * 1e3:.1f} ms, best_under {np.median(t_exact) * 1e3:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--instances", type=int, default=200, help="random instances for the miss rate")
    ap.add_argument("--baseline-limit", type=float, default=600.0,
                    help="seconds the original traversal may run on the paper-size space")
    ap.add_argument("--skip", nargs="*", default=[], choices=["paper", "synthetic", "baseline", "random"])
    args = ap.parse_args()
    print(load_average())
    tables = paper_tables() if {"paper", "baseline"} - set(args.skip) else None
    if "paper" not in args.skip:
        exact_timings(with_latency(scored(tables)), args.repeats,
                      "paper space (configs/imagenet.yaml), real params and macs, made-up latency_ms")
    if "synthetic" not in args.skip:
        exact_timings(synthetic(), args.repeats, "synthetic single-width space, uniform random scores and costs")
    if "random" not in args.skip:
        baseline_random(args.instances, [12, 36, 36, 36, 6])
    if "baseline" not in args.skip:
        baseline_paper(tables, args.baseline_limit)


if __name__ == "__main__":
    main()
