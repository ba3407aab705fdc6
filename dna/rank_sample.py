"""Which networks the ranking stage trains: a pool of random networks of the space with their ratings and costs,
a sample stratified over cost bands and, within each band, over rating; random networks under the search budgets.

A network is one row per stage of the search's stage tables (stem, a candidate per block at the width the block
before gives it, head), so its rating and costs are the sums the search uses.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from dna.spaces.base import Candidates, Choice

Rows = tuple[int, ...]


class NetworkTable:
    """Draws networks from the stage tables (stem, blocks, head) and sums their ratings and costs."""

    def __init__(self, stages: list[Candidates]):
        self.stages = stages
        self.blocks = stages[1:-1]
        self.distinct = [list(dict.fromkeys(zip(t.cells, t.ops))) for t in self.blocks]
        self.rows = [{(c, o, int(w)): r for r, (c, o, w) in enumerate(zip(t.cells, t.ops, t.in_width))}
                     for t in self.blocks]
        self.head_rows = {int(w): r for r, w in enumerate(stages[-1].in_width)}
        self.frames = [s.costs() for s in stages]
        self.axes = [c for c in self.frames[0].columns if c not in ("in_width", "out_width", "score")]

    def rows_of(self, choice: Choice) -> Rows:
        """The stage rows of a network given as (cell, ops) per block."""
        width, rows = int(self.stages[0].out_width[0]), [0]
        for index, (cell, ops) in zip(self.rows, choice):
            rows.append(index[(cell, tuple(ops), width)])
            width = cell.width
        return tuple(rows + [self.head_rows[width]])

    def draw(self, count: int, rng: np.random.Generator) -> list[Rows]:
        """`count` networks, each block's candidate uniformly at random among the block's candidates."""
        picks = [rng.integers(len(d), size=count) for d in self.distinct]
        return [self.rows_of([d[p[i]] for d, p in zip(self.distinct, picks)]) for i in range(count)]

    def choice(self, rows: Rows) -> Choice:
        return [t.choice(r) for t, r in zip(self.blocks, rows[1:-1])]

    def frame(self, networks: list[Rows]) -> pd.DataFrame:
        """One row per distinct network: `rows` (stage rows joined with -), rating, each block's rating
        (`rating_block_<b>`) and every cost axis."""
        unique = list(dict.fromkeys(networks))
        blocks = [f"rating_block_{b}" for b in range(len(self.blocks))]
        if not unique:
            return pd.DataFrame(columns=["rows", "rating", *blocks, *self.axes])
        table = np.array(unique, dtype=np.int64)
        out = {"rows": ["-".join(map(str, r)) for r in unique],
               "rating": sum(f["score"].to_numpy(float)[table[:, i]] for i, f in enumerate(self.frames))}
        out |= {name: self.frames[b + 1]["score"].to_numpy(float)[table[:, b + 1]] for b, name in enumerate(blocks)}
        for axis in self.axes:
            out[axis] = sum(f[axis].to_numpy(float)[table[:, i]] for i, f in enumerate(self.frames))
        return pd.DataFrame(out)


def parse_rows(text: str) -> Rows:
    return tuple(int(r) for r in text.split("-"))


def band_edges(costs, bands: int) -> np.ndarray:
    """Cost quantiles cutting the pool into `bands` bands of about equal size."""
    return np.quantile(np.asarray(costs, float), np.linspace(0, 1, bands + 1))


def band_of(costs, edges: np.ndarray) -> np.ndarray:
    """The band of each cost (costs beyond the pool's range fall in the first or last band)."""
    return np.searchsorted(edges[1:-1], np.asarray(costs, float), side="right")


def stratified(pool: pd.DataFrame, count: int, edges: np.ndarray, axis: str) -> pd.DataFrame:
    """`count` networks of the pool: an equal share per cost band (the first bands take the remainder), and within a
    band the networks at evenly spaced quantiles of rating, so every band spans its range of ratings."""
    bands = len(edges) - 1
    pool = pool.assign(band=band_of(pool[axis], edges))
    chosen = []
    for band in range(bands):
        members = pool[pool["band"] == band].sort_values(["rating", "rows"], kind="stable")
        share = count // bands + (1 if band < count % bands else 0)
        if len(members) < share:
            raise ValueError(f"cost band {band} holds {len(members)} networks of the pool, fewer than the {share} "
                             "it should give: draw a larger pool (rank.pool)")
        positions = np.round((np.arange(share) + 0.5) * len(members) / share - 0.5).astype(int)
        chosen.append(members.iloc[np.unique(positions.clip(0, len(members) - 1))])
    return pd.concat(chosen, ignore_index=True)


def under_budget(pool: pd.DataFrame, budgets: dict[str, float]) -> pd.DataFrame:
    """The networks of the pool that meet every budget (cost <= budget)."""
    fits = np.ones(len(pool), dtype=bool)
    for axis, budget in budgets.items():
        fits &= pool[axis].to_numpy(float) <= budget
    return pool[fits]
