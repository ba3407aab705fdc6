import itertools

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dna.search import (
    BudgetError,
    Selection,
    _nondominated,
    best_under,
    front_table,
    min_cost,
    pareto_front,
)

WIDTHS = [8, 16]
SETTINGS = settings(max_examples=150, deadline=None)


def table(rows, axes):
    """rows: (in_width, out_width, score, *costs) tuples."""
    return pd.DataFrame(rows, columns=["in_width", "out_width", "score", *axes])


@st.composite
def spaces(draw):
    """Stem, 2-4 searched blocks with 1-6 rows and 1-2 output widths, head per width.

    Scores are multiples of 1/8 and costs small integers, so sums are exact and ties common.
    """
    axes = ["params", "macs"][: draw(st.integers(1, 2))]
    cost = st.integers(0, 40)
    stem_out = draw(st.sampled_from(WIDTHS))
    stages = [table([(0, stem_out, 0.0, *draw(st.tuples(*[cost] * len(axes))))], axes)]
    prev_out = stem_out
    for _ in range(draw(st.integers(2, 4))):
        outs = draw(st.lists(st.sampled_from(WIDTHS), min_size=1, max_size=2, unique=True))
        rows = []
        for k in range(draw(st.integers(1, 6))):
            # the first row continues the first rows before it, so a valid chain always exists
            in_w = prev_out if k == 0 else draw(st.sampled_from(WIDTHS))
            out_w = draw(st.sampled_from(outs))
            score = draw(st.integers(0, 16)) / 8
            rows.append((in_w, out_w, score, *draw(st.tuples(*[cost] * len(axes)))))
        stages.append(table(rows, axes))
        prev_out = rows[0][1]
    head = [(w, 0, 0.0, *draw(st.tuples(*[cost] * len(axes)))) for w in WIDTHS]
    stages.append(table(head, axes))
    return stages, axes


def brute(stages, axes):
    """Every valid chain as (rows, score, {axis: cost}), summed in stage order."""
    recs = [df.to_dict("records") for df in stages]
    out = []
    for rows in itertools.product(*(range(len(r)) for r in recs)):
        chosen = [recs[i][r] for i, r in enumerate(rows)]
        if any(chosen[i]["in_width"] != chosen[i - 1]["out_width"] for i in range(1, len(chosen))):
            continue
        score = sum(c["score"] for c in chosen)
        out.append((rows, score, {a: sum(c[a] for c in chosen) for a in axes}))
    return out


def brute_front(chains, axis):
    front = []
    for cost, score in sorted((c[axis], s) for _, s, c in chains):
        if not front or score < front[-1][1]:
            front.append((cost, score))
    return front


def check_selection(stages, sel: Selection):
    """The selection is a valid chain whose score and costs match its rows."""
    rows = [df.iloc[r] for df, r in zip(stages, sel.rows)]
    assert len(sel.rows) == len(stages)
    for a, b in zip(rows, rows[1:]):
        assert b["in_width"] == a["out_width"]
    assert sel.score == pytest.approx(sum(r["score"] for r in rows))
    for axis, value in sel.costs.items():
        assert value == pytest.approx(sum(r[axis] for r in rows))


def fits(costs, budgets):
    return all(costs[a] <= b for a, b in budgets.items())


def draw_budgets(data, chains, axes):
    """Budgets on a random subset of axes, drawn around the achievable costs so they bind."""
    budget_axes = data.draw(st.lists(st.sampled_from(axes), max_size=2, unique=True))
    budgets = {}
    for a in budget_axes:
        costs = [c[a] for _, _, c in chains]
        budgets[a] = data.draw(st.integers(min(costs) - 3, max(costs)))
    return budgets


@SETTINGS
@given(spaces(), st.data())
def test_best_under_matches_brute_force(space, data):
    stages, axes = space
    chains = brute(stages, axes)
    budgets = draw_budgets(data, chains, axes)
    feasible = [c for c in chains if fits(c[2], budgets)]
    if not feasible:
        with pytest.raises(BudgetError):
            best_under(stages, budgets)
        return
    best = best_under(stages, budgets)
    check_selection(stages, best)
    assert fits(best.costs, budgets)
    optimum = min(s for _, s, _ in feasible)
    assert best.score == pytest.approx(optimum)
    if budgets:
        first = next(iter(budgets))
        tied = [c[first] for _, s, c in feasible if s == optimum]
        assert best.costs[first] == min(tied)


@SETTINGS
@given(spaces(), st.data())
def test_pareto_front_matches_brute_force(space, data):
    stages, axes = space
    axis = data.draw(st.sampled_from(axes))
    chains = brute(stages, axes)
    budgets = draw_budgets(data, chains, axes)
    feasible = [c for c in chains if fits(c[2], budgets)]
    if not feasible:
        with pytest.raises(BudgetError):
            pareto_front(stages, axis, budgets)
        return
    front = pareto_front(stages, axis, budgets)
    expected = brute_front(feasible, axis)
    got = [(s.costs[axis], s.score) for s in front]
    assert len(got) == len(expected)
    for (gc, gs), (ec, es) in zip(got, expected):
        assert gc == pytest.approx(ec) and gs == pytest.approx(es)
    for sel in front:
        check_selection(stages, sel)
        assert fits(sel.costs, budgets)
    for a, b in zip(front, front[1:]):
        assert a.costs[axis] < b.costs[axis] and a.score > b.score


@SETTINGS
@given(spaces())
def test_min_cost_matches_brute_force(space):
    stages, axes = space
    chains = brute(stages, axes)
    for axis in axes:
        assert min_cost(stages, axis) == pytest.approx(min(c[axis] for _, _, c in chains))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda k: st.lists(st.tuples(*[st.integers(0, 4)] * k), min_size=1, max_size=40)
    ),
    st.integers(1, 8),
)
def test_nondominated_matches_pairwise_check(points, block):
    pts = np.array(points, dtype=float)
    got = sorted(map(tuple, pts[_nondominated(pts, block=block)]))
    distinct = set(map(tuple, pts))
    expected = sorted(
        p
        for p in distinct
        if not any(q != p and all(a <= b for a, b in zip(q, p)) for q in distinct)
    )
    assert got == expected


def small_space():
    axes = ["params", "macs"]
    return [
        table([(0, 8, 0.0, 100, 1000)], axes),
        table([(8, 8, 1.0, 50, 500), (8, 8, 0.5, 80, 900)], axes),
        table([(8, 8, 1.0, 30, 300), (8, 8, 0.25, 60, 700)], axes),
        table([(8, 0, 0.0, 10, 100)], axes),
    ]


def test_budget_below_min_cost_names_axis_and_minimum():
    stages = small_space()
    assert min_cost(stages, "params") == 190
    with pytest.raises(BudgetError) as err:
        best_under(stages, {"params": 189, "macs": 1e9})
    message = str(err.value)
    expected = "search.budgets.params=189 is below the smallest network in the space (params=190)"
    assert expected in message
    assert "macs" not in message
    assert err.value.minimum == {"params": 190.0, "macs": 1900.0}
    with pytest.raises(BudgetError, match=r"macs=1899 is below .*\(macs=1900\)"):
        pareto_front(stages, "params", {"macs": 1899})


def test_budgets_jointly_infeasible():
    axes = ["params", "macs"]
    stages = [
        table([(0, 8, 0.0, 0, 0)], axes),
        table([(8, 8, 0.0, 10, 100), (8, 8, 0.0, 100, 10)], axes),
        table([(8, 0, 0.0, 0, 0)], axes),
    ]
    # each budget alone is reachable, both together are not
    with pytest.raises(BudgetError, match="together") as err:
        best_under(stages, {"params": 50, "macs": 50})
    assert err.value.minimum == {"params": 10.0, "macs": 10.0}


def test_two_budget_axes_keep_chains_dominated_on_one_axis():
    axes = ["params", "macs"]
    stages = [
        table([(0, 8, 0.0, 0, 0)], axes),
        # row 0 beats row 1 on score and params, but only row 1 leaves room for macs
        table([(8, 8, 0.0, 10, 100), (8, 8, 0.5, 20, 10)], axes),
        table([(8, 8, 0.0, 10, 100), (8, 8, 0.0, 100, 10)], axes),
        table([(8, 0, 0.0, 0, 0)], axes),
    ]
    budgets = {"params": 60, "macs": 120}
    best = best_under(stages, budgets)
    assert best.rows == (0, 1, 0, 0)
    assert best.costs == {"params": 30.0, "macs": 110.0}
    front = pareto_front(stages, "params", {"macs": 120})
    assert [(s.costs["params"], s.score) for s in front] == [(30.0, 0.5), (110.0, 0.0)]


def test_space_without_valid_chain():
    axes = ["params"]
    stages = [
        table([(0, 8, 0.0, 1)], axes),
        table([(16, 16, 0.5, 1)], axes),
        table([(16, 0, 0.0, 1)], axes),
    ]
    with pytest.raises(ValueError, match="no valid chain"):
        min_cost(stages, "params")
    with pytest.raises(ValueError, match="no valid chain"):
        best_under(stages, {})


def test_greedy_per_block_choice_is_wrong():
    axes = ["params"]
    stages = [
        table([(0, 8, 0.0, 5)], axes),
        # block 1: row 1 is better and cheaper, but only row 0 leads to the good block-2 row
        table([(8, 16, 1.0, 100), (8, 8, 0.9, 10)], axes),
        table([(16, 16, 0.1, 10), (8, 8, 1.0, 200)], axes),
        table([(8, 0, 0.0, 1), (16, 0, 0.0, 1)], axes),
    ]
    best = best_under(stages, {"params": 150})
    assert best.rows == (0, 0, 0, 1)
    assert best.score == pytest.approx(1.1)
    assert best.costs == {"params": 116.0}
    assert best_under(stages, {}).rows == (0, 0, 0, 1)
    assert min_cost(stages, "params") == 116
    front = pareto_front(stages, "params")
    assert [(s.costs["params"], s.score) for s in front] == [(116.0, pytest.approx(1.1))]


def test_front_table_round_trips():
    rng = np.random.default_rng(0)
    axes = ["params", "macs"]

    def block(n, ins, outs):
        return pd.DataFrame(
            {
                "op": [f"op{i}" for i in range(n)],
                "in_width": rng.choice(ins, n),
                "out_width": rng.choice(outs, n),
                "score": rng.uniform(0.2, 1.5, n),
                "params": rng.integers(10, 1000, n),
                "macs": rng.integers(1000, 100000, n),
            }
        )

    stages = [table([(0, 16, 0.0, 500, 9000)], axes).assign(op="stem")]
    stages += [block(30, [16, 24], [16, 24]) for _ in range(3)]
    head = [(16, 0, 0.0, 100, 1000), (24, 0, 0.0, 150, 1500)]
    stages.append(table(head, axes).assign(op="head"))
    front = pareto_front(stages, "macs", {"params": 2000})
    assert len(front) > 3
    tab = front_table(stages, front)
    stage_cols = [f"stage_{i}" for i in range(len(stages))]
    assert list(tab.columns) == ["score", "params", "macs", *stage_cols]
    assert len(tab) == len(front)
    for _, rec in tab.iterrows():
        rows = [df.iloc[int(rec[f"stage_{i}"])] for i, df in enumerate(stages)]
        for a, b in zip(rows, rows[1:]):
            assert b["in_width"] == a["out_width"]
        assert rec["score"] == pytest.approx(sum(r["score"] for r in rows))
        for axis in axes:
            assert rec[axis] == pytest.approx(sum(r[axis] for r in rows))
        assert rec["params"] <= 2000
    assert tab["macs"].is_monotonic_increasing
    assert (tab["score"].diff().dropna() < 0).all()


# search.combine: predictor -----------------------------------------------------------------------------------
def test_the_search_maximises_the_rank_stages_predictor_when_asked(prepared_run, tmp_path):
    """With a predictor that rewards block 0's rating (weight +1) and ignores block 1's, the search takes block 0's
    worst-rated candidate, which the equal-weight sum never would; no predictor, or one of other blocks, is refused."""
    import json
    import shutil

    import pandas as pd

    from dna.arch import Arch
    from dna.errors import ConfigError
    from dna.pipeline import Run, stage_rate, stage_search, stage_tables
    from dna.rank_sample import NetworkTable
    from dna.spaces.base import Candidates

    shutil.copytree(prepared_run.paths.root, tmp_path / "outputs")
    params = prepared_run.params.model_copy(update={"outputs": str(tmp_path / "outputs")})
    run = Run(params)
    for block in range(run.space.num_blocks):
        stage_rate(run, block)
    ratings = [pd.read_csv(run.paths.rating(b), dtype={"path": str}) for b in range(run.space.num_blocks)]
    table = NetworkTable(stage_tables(run.space, [Candidates.from_frame(r) for r in ratings]))

    def block_ratings() -> pd.Series:
        rows = table.rows_of(run.space.parse(Arch.load(run.paths.arch)))
        return table.frame([rows]).iloc[0]

    summed = stage_search(run)
    assert block_ratings()["rating_block_0"] == ratings[0]["score"].min() and summed["combine"] == "sum"

    search = params.search.model_copy(update={"combine": "predictor"})
    run = Run(params.model_copy(update={"search": search}))
    with pytest.raises(ConfigError, match=r"search\.combine='predictor': .*predictor\.json does not exist"):
        stage_search(run)
    run.paths.rank_dir.mkdir(parents=True)
    predictor = {"fitted": True, "intercept": 0.5, "weights": {"rating_block_0": 1.0}, "kendall_tau_loo": 0.4}
    (run.paths.rank_dir / "predictor.json").write_text(json.dumps(predictor))
    with pytest.raises(ConfigError, match="no predictor fitted on this run's 2 blocks"):
        stage_search(run)
    predictor["weights"]["rating_block_1"] = 0.0
    (run.paths.rank_dir / "predictor.json").write_text(json.dumps(predictor))
    metrics = stage_search(run)
    chosen = block_ratings()
    assert chosen["rating_block_0"] == ratings[0]["score"].max()
    assert metrics["predicted_accuracy"] == pytest.approx(0.5 + chosen["rating_block_0"])
    assert metrics["combine"] == "predictor" and metrics["predictor_kendall_tau_loo"] == 0.4
