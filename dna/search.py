"""Exact architecture search over a chain of scored stage tables.

A space is a list of stages (stem, searched blocks, head), each a DataFrame with
``in_width``, ``out_width``, ``score`` (lower is better) and one numeric column per
cost axis. A row chosen for stage ``i`` must have ``in_width`` equal to the
``out_width`` of the row chosen for stage ``i - 1``; scores and costs add up.

Search is dynamic programming over stages with state = width: each state keeps the
partial chains that are non-dominated in (score, tracked cost axes), with
back-pointers, and chains that cannot finish within the budgets are dropped early.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pandas.api.types import is_numeric_dtype

_RESERVED = ("in_width", "out_width", "score")


@dataclass(frozen=True)
class Selection:
    """One network: the row (iloc) chosen in each stage, its score and summed costs."""

    rows: tuple[int, ...]
    score: float
    costs: dict[str, float]


class BudgetError(ValueError):
    """No network meets the budgets; ``minimum`` is the smallest cost per budget axis."""

    def __init__(self, message: str, minimum: dict[str, float]):
        super().__init__(message)
        self.minimum = minimum


def min_cost(stages: list[pd.DataFrame], axis: str) -> float:
    """Smallest achievable total cost on one axis over all valid chains."""
    _check(stages, [axis])
    rem = _remaining(stages, [axis])
    if not rem[0]:
        raise ValueError("no valid chain: stage widths never connect from stem to head")
    return float(min(v[0] for v in rem[0].values()))


def best_under(stages: list[pd.DataFrame], budgets: dict[str, float]) -> Selection:
    """Exact minimum-score network meeting every budget (cost <= budget).

    Ties go to the lower cost on the first budget axis. Empty budgets give the
    best score in the space. Raises BudgetError when no network meets the budgets.
    """
    objs, ends, back = _search(stages, list(budgets), dict(budgets))
    best = np.lexsort(objs[:, :2].T[::-1])[0]
    return _selection(stages, _backtrack(stages, back, *ends[best]))


def pareto_front(
    stages: list[pd.DataFrame], axis: str, budgets: dict[str, float] | None = None
) -> list[Selection]:
    """Exact Pareto front of (score, cost on ``axis``) over valid chains meeting ``budgets``.

    Sorted by increasing cost with strictly decreasing score, one Selection per point.
    """
    budgets = dict(budgets or {})
    axes = [axis] + [a for a in budgets if a != axis]
    objs, ends, back = _search(stages, axes, budgets)
    keep = _nondominated(objs[:, :2])
    keep = keep[np.argsort(objs[keep, 1], kind="stable")]
    return [_selection(stages, _backtrack(stages, back, *ends[k])) for k in keep]


def near_best(
    stages: list[pd.DataFrame], budgets: dict[str, float], axis: str, tolerance: float
) -> list[Selection]:
    """The networks meeting ``budgets`` whose score is within ``tolerance`` of the best such score, cheapest on
    ``axis`` first: the budgeted Pareto front of (score, ``axis``) cut at best + tolerance. Any network within the
    tolerance is dominated by one of these, so the first is the cheapest network rated within it."""
    front = pareto_front(stages, axis, budgets)
    best = min(s.score for s in front)
    return [s for s in front if s.score <= best + tolerance]


def front_table(stages: list[pd.DataFrame], front: list[Selection]) -> pd.DataFrame:
    """The front as a table: score, every cost axis, and the chosen row per stage (``stage_i``)."""
    axes = _cost_axes(stages)
    columns = ["score", *axes, *(f"stage_{i}" for i in range(len(stages)))]
    records = [
        {"score": s.score, **s.costs, **{f"stage_{i}": r for i, r in enumerate(s.rows)}}
        for s in front
    ]
    return pd.DataFrame.from_records(records, columns=columns)


def _cost_axes(stages: list[pd.DataFrame]) -> list[str]:
    """Numeric columns shared by every stage, other than widths and score."""
    return [
        c
        for c in stages[0].columns
        if c not in _RESERVED and all(c in s.columns and is_numeric_dtype(s[c]) for s in stages)
    ]


def _check(stages: list[pd.DataFrame], axes: list[str]) -> None:
    if not stages:
        raise ValueError("the space has no stages")
    known = _cost_axes(stages)
    for i, df in enumerate(stages):
        missing = [c for c in _RESERVED if c not in df.columns]
        if missing:
            raise ValueError(f"stage {i} lacks columns {missing}")
    unknown = [a for a in axes if a not in known]
    if unknown:
        raise ValueError(f"unknown cost axes {unknown}; the space has {known}")


def _nondominated(points: np.ndarray, block: int = 256) -> np.ndarray:
    """Indices of the points (n, k; every column minimised) that no other point dominates.

    Equal points count once. Points are taken in lexicographic order, where a point can
    only be dominated by points before it: with k == 2 this is a sweep; with more columns,
    blocks of points are compared with each other and with the points kept so far (with
    k == 3 through the 2-D staircase of the kept points' last two columns).
    """
    n, k = points.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort(points.T[::-1])
    q = points[order]
    distinct = np.r_[True, (q[1:] != q[:-1]).any(axis=1)]
    order, q = order[distinct], q[distinct]
    if k == 1:
        return order[:1]
    if k == 2:
        best_before = np.minimum.accumulate(q[:, 1])[:-1]
        return order[np.r_[True, q[1:, 1] < best_before]]
    kept, out = np.empty((0, k - 1)), []
    for start in range(0, len(q), block):
        b = q[start : start + block]
        if k == 3 and len(kept):
            # kept is a staircase: first column increasing, second strictly decreasing
            i = np.searchsorted(kept[:, 0], b[:, 1], side="right") - 1
            dominated = (i >= 0) & (kept[i.clip(min=0), 1] <= b[:, 2])
        else:
            dominated = (kept[None, :, :] <= b[:, None, 1:]).all(axis=2).any(axis=1)
        within = (b[None, :, :] <= b[:, None, :]).all(axis=2)
        np.fill_diagonal(within, False)
        dominated |= within.any(axis=1)
        kept = np.concatenate([kept, b[~dominated, 1:]])
        if k == 3:
            kept = kept[_nondominated(kept)]
        out.append(order[start : start + block][~dominated])
    return np.concatenate(out)


def _remaining(stages: list[pd.DataFrame], axes: list[str]) -> list[dict[int, np.ndarray] | None]:
    """rem[i][w]: per-axis smallest cost of stages i.. when stage i is entered at width w.

    A width missing from rem[i] cannot reach the head; rem[len(stages)] is None (chain done).
    """
    rem: list[dict[int, np.ndarray] | None] = [None] * (len(stages) + 1)
    for i in range(len(stages) - 1, -1, -1):
        df = stages[i]
        in_w, out_w = df["in_width"].to_numpy(np.int64), df["out_width"].to_numpy(np.int64)
        total = df[axes].to_numpy(float).reshape(len(df), len(axes))
        after = rem[i + 1]
        if after is not None:
            widths = np.array(sorted(after), dtype=np.int64)
            pos = np.searchsorted(widths, out_w).clip(max=max(len(widths) - 1, 0))
            ok = widths[pos] == out_w if len(widths) else np.zeros(len(df), bool)
            nxt = np.array([after[w] for w in widths]).reshape(len(widths), len(axes))
            in_w, total = in_w[ok], total[ok] + nxt[pos[ok]]
        rem[i] = {int(v): total[in_w == v].min(axis=0) for v in np.unique(in_w)}
    return rem


def _search(
    stages: list[pd.DataFrame], axes: list[str], budgets: dict[str, float]
) -> tuple[np.ndarray, list[tuple[int, int]], list[dict[int, tuple[np.ndarray, np.ndarray]]]]:
    """Forward DP tracking (score, *axes) under the budgets.

    Returns the non-dominated complete chains as objective rows, their (final width,
    index) ends, and per stage and width the (row, parent index) back-pointers.
    """
    _check(stages, axes)
    rem = _remaining(stages, list(budgets))
    if not rem[0]:
        raise ValueError("no valid chain: stage widths never connect from stem to head")
    minimum = {a: float(min(v[j] for v in rem[0].values())) for j, a in enumerate(budgets)}
    too_low = [a for a in budgets if budgets[a] < minimum[a]]
    if too_low:
        message = "; ".join(
            f"search.budgets.{a}={_fmt(budgets[a])} is below the smallest network "
            f"in the space ({a}={_fmt(minimum[a])})"
            for a in too_low
        )
        raise BudgetError(message, minimum)

    cols = [1 + axes.index(a) for a in budgets]
    limit = np.array(list(budgets.values()), dtype=float)
    front = {int(v): np.zeros((1, 1 + len(axes))) for v in rem[0]}
    back = []
    for i, df in enumerate(stages):
        in_w, out_w = df["in_width"].to_numpy(np.int64), df["out_width"].to_numpy(np.int64)
        obj = df[["score", *axes]].to_numpy(float)
        after = rem[i + 1]
        new_front, links = {}, {}
        pairs = np.unique(np.stack([in_w, out_w], axis=1), axis=0)
        for w in np.unique(pairs[:, 1]):
            if after is not None and w not in after:
                continue
            parts = []
            for v in pairs[pairs[:, 1] == w, 0]:
                if v not in front:
                    continue
                rows = np.flatnonzero((in_w == v) & (out_w == w))
                # a row dominated by another with the same widths never helps a chain
                rows = rows[_nondominated(obj[rows])]
                prev = front[v]
                sums = (prev[:, None, :] + obj[rows][None, :, :]).reshape(-1, obj.shape[1])
                parent = np.repeat(np.arange(len(prev)), len(rows))
                parts.append((sums, np.tile(rows, len(prev)), parent))
            if not parts:
                continue
            sums, row, parent = (np.concatenate(p) for p in zip(*parts))
            if budgets:
                lower = sums[:, cols] + (after[w] if after is not None else 0.0)
                fits = (lower <= limit).all(axis=1)
                sums, row, parent = sums[fits], row[fits], parent[fits]
            keep = _nondominated(sums)
            if keep.size:
                new_front[int(w)] = sums[keep]
                links[int(w)] = (row[keep], parent[keep])
        front = new_front
        back.append(links)

    if not front:
        shown = ", ".join(f"{a}={_fmt(b)}" for a, b in budgets.items())
        smallest = ", ".join(f"{a}={_fmt(m)}" for a, m in minimum.items())
        raise BudgetError(
            f"no network in the space meets search.budgets ({shown}) together; "
            f"smallest per axis: {smallest}",
            minimum,
        )
    ends = [(w, j) for w, pts in front.items() for j in range(len(pts))]
    return np.concatenate(list(front.values())), ends, back


def _backtrack(stages, back, w: int, j: int) -> tuple[int, ...]:
    rows = []
    for i in range(len(stages) - 1, -1, -1):
        row, parent = back[i][w]
        r = int(row[j])
        rows.append(r)
        w, j = int(stages[i]["in_width"].iloc[r]), int(parent[j])
    return tuple(reversed(rows))


def _selection(stages: list[pd.DataFrame], rows: tuple[int, ...]) -> Selection:
    score, costs = 0.0, {a: 0.0 for a in _cost_axes(stages)}
    for df, r in zip(stages, rows):
        score += float(df["score"].iloc[r])
        for a in costs:
            costs[a] += float(df[a].iloc[r])
    return Selection(rows=rows, score=score, costs=costs)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.10g}"
