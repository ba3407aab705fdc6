"""Latency profile, the latency axis of the search, and the errors when latency is asked for without a profile."""
import itertools
import json
import re

import numpy as np
import pandas as pd
import pytest

from dna.checkpoint import digest
from dna.config import parse_params
from dna.errors import ConfigError
from dna.latency import COLUMN, LatencyTable, fingerprint, pieces, write_profile
from dna.pipeline import Run, latency_model, stage_profile, stage_tables, validate
from dna.search import best_under, pareto_front
from tests.conftest import tiny_raw


def _params(tmp_path, **search):
    raw = tiny_raw(tmp_path / "outputs")
    raw["profile"] = {"runs": 3, "warmup": 1}
    raw["search"].update(search)
    return parse_params(raw)


def _expected_pieces(space) -> set[tuple]:
    keys = {("stem", space.in_chans, space.first_width)}
    for block in range(space.num_blocks):
        for cell in space.cells(block):
            for op in range(len(space.ops)):
                keys |= {("layer", block, 0, op, w, cell.width) for w in space.in_widths(block)}
                if cell.depth > 1:
                    keys.add(("layer", block, 1, op, cell.width, cell.width))
    keys |= {("head", c.width, space.num_classes) for c in space.cells(space.num_blocks - 1)}
    return keys


def _keys(table: pd.DataFrame) -> list[tuple]:
    keys = []
    for r in table.itertuples():
        if r.kind == "layer":
            keys.append(("layer", r.block, r.position, r.op, r.in_width, r.width))
        elif r.kind in ("stem", "head"):
            keys.append((r.kind, r.in_width, r.width))
    return keys


def _synthetic_profile(run: Run, seed: int = 0) -> LatencyTable:
    """A profile with made-up latencies (no timing), written where the run looks for it."""
    rng = np.random.default_rng(seed)
    rows = [{"kind": "overhead", "block": -1, "position": 0, "op": -1, "op_name": "overhead", "in_width": 1,
             "width": 1, "stride": 1, "resolution": 16, COLUMN: 0.01}]
    rows += [{**row, COLUMN: float(rng.uniform(0.02, 0.2))} for row in pieces(run.space)]
    table = pd.DataFrame(rows)
    write_profile(table, {"fingerprint": digest(fingerprint(run.space, run.params.profile))}, run.paths.profile_dir)
    return LatencyTable(table)


def test_profile_has_one_positive_row_per_piece(tmp_path):
    run = Run(_params(tmp_path))
    summary = stage_profile(run)
    table = pd.read_csv(run.paths.latency)
    keys = _keys(table)
    assert len(keys) == len(set(keys)), "a piece is timed twice"
    assert set(keys) == _expected_pieces(run.space)
    assert (table[COLUMN] > 0).all() and table[COLUMN].notna().all()
    assert (table["kind"] == "overhead").sum() == 1
    assert summary["rows"] == len(table)
    meta = json.loads((run.paths.profile_dir / "profile.json").read_text())
    assert meta["fingerprint"] == digest(fingerprint(run.space, run.params.profile))
    assert latency_model(run) is not None


def test_candidate_latency_is_the_sum_of_its_layers(tmp_path):
    run = Run(_params(tmp_path))
    model = _synthetic_profile(run)
    stages = [s.to_frame() for s in stage_tables(run.space, scored=False, latency=model)]
    assert all(COLUMN in s.columns for s in stages)
    t = model.table.set_index(["kind", "block", "position", "op", "in_width", "width"])[COLUMN]
    cut = model.overhead
    block = stages[2]
    for row in block.sample(10, random_state=0).itertuples():
        ops = [int(o) for o in row.path.split("-")]
        expected = t[("layer", 1, 0, ops[0], row.in_width, row.width)] - cut
        expected += sum(t[("layer", 1, 1, o, row.width, row.width)] - cut for o in ops[1:])
        assert getattr(row, COLUMN) == pytest.approx(expected)
    # stem carries the one session overhead a whole network pays
    assert stages[0][COLUMN].iloc[0] == pytest.approx(t[("stem", -1, 0, -1, 1, 16)])


def _chains(stages):
    """Every valid chain of rows (brute force)."""
    for rows in itertools.product(*(range(len(s)) for s in stages)):
        if all(stages[i]["out_width"].iloc[rows[i]] == stages[i + 1]["in_width"].iloc[rows[i + 1]]
               for i in range(len(stages) - 1)):
            yield rows


def test_latency_budget_is_exact_against_brute_force(tmp_path):
    run = Run(_params(tmp_path))
    model = _synthetic_profile(run, seed=3)
    rng = np.random.default_rng(0)
    stages = [s.to_frame() for s in stage_tables(run.space, scored=False, latency=model)]
    for s in stages[1:-1]:
        s["score"] = rng.uniform(0.1, 1.0, len(s))
    chains = list(_chains(stages))
    total = {a: np.array([sum(float(stages[i][a].iloc[r]) for i, r in enumerate(c)) for c in chains])
             for a in ("score", COLUMN, "macs")}
    for q in (0.05, 0.3, 0.7, 1.0):
        budget = float(np.quantile(total[COLUMN], q))
        best = best_under(stages, {COLUMN: budget})
        assert best.costs[COLUMN] <= budget + 1e-9
        assert best.score == pytest.approx(total["score"][total[COLUMN] <= budget + 1e-9].min())
        macs = float(np.quantile(total["macs"], 0.5))
        ok = (total[COLUMN] <= budget + 1e-9) & (total["macs"] <= macs)
        if ok.any():
            both = best_under(stages, {COLUMN: budget, "macs": macs})
            assert both.costs[COLUMN] <= budget + 1e-9 and both.costs["macs"] <= macs
            assert both.score == pytest.approx(total["score"][ok].min())
    front = pareto_front(stages, COLUMN)
    points = sorted(zip(total[COLUMN], total["score"]))
    expected, best_score = [], np.inf
    for cost, score in points:
        if score < best_score - 1e-12:
            expected.append((cost, score))
            best_score = score
    got = [(s.costs[COLUMN], s.score) for s in front]
    assert len(got) == len(expected)
    for (c1, s1), (c2, s2) in zip(got, expected):
        assert c1 == pytest.approx(c2) and s1 == pytest.approx(s2)


@pytest.mark.parametrize("search, key", [({"budgets": {"latency_ms": 1.0}}, "search.budgets.latency_ms"),
                                         ({"front_axis": "latency_ms"}, "search.front_axis")])
def test_latency_without_a_profile_is_a_config_error(tmp_path, search, key):
    params = _params(tmp_path, **search)
    with pytest.raises(ConfigError, match=re.escape(key) + r" asks for latency_ms.*dna profile"):
        validate(params)
    validate(params, check_profile=False)  # what `dna profile` checks before making the profile


def test_stale_profile_is_a_config_error_and_a_fresh_one_validates(tmp_path):
    params = _params(tmp_path, budgets={"latency_ms": 1.0}, front_axis="latency_ms")
    run = Run(params)
    model = _synthetic_profile(run)
    validate(params)
    smallest = min(float(model.table.loc[model.table["kind"] == "stem", COLUMN].iloc[0]), 1.0)
    low = _params(tmp_path, budgets={"latency_ms": smallest / 10})
    with pytest.raises(ConfigError, match=r"search\.budgets\.latency_ms=.* is below the smallest network"):
        validate(low)
    other = parse_params({**tiny_raw(tmp_path / "outputs"), "search": {"budgets": {"latency_ms": 1.0}},
                          "profile": {"runs": 4}})
    with pytest.raises(ConfigError, match=r"search\.budgets\.latency_ms asks for latency_ms.*another space"):
        validate(other)
