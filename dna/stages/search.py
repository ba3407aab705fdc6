"""The search stage: the best network under the budgets and the Pareto front, from the block ratings."""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from dna.checkpoint import file_digest, write_csv, write_json
from dna.errors import ConfigError, needed
from dna.locks import locked
from dna.run import latency_model, stage_tables
from dna.spaces.base import require

if TYPE_CHECKING:
    import pandas as pd

    from dna.arch import Arch
    from dna.run import Run
    from dna.spaces.base import Candidates, SearchSpace


log = logging.getLogger(__name__)


def rating_summary(tables: list[pd.DataFrame]) -> dict:
    return {f"block_{i}": {"candidates": int(len(t.drop_duplicates(["cell", "path"]))), "best": float(t["score"].min()),
                           "median": float(t["score"].median()), "worst": float(t["score"].max())}
            for i, t in enumerate(tables)}




def choice_of(space: SearchSpace, stages: list[Candidates], rows: tuple[int, ...]) -> Arch:
    """The network of one row per stage (stem and head rows included)."""
    return space.arch([stage.choice(row) for stage, row in zip(stages[1:-1], rows[1:-1])])


@locked("search")
def stage_search(run: Run) -> dict:
    import pandas as pd

    from dna.search import BudgetError, best_under, front_table, near_best, pareto_front
    from dna.spaces.base import Candidates

    require(run.space, "networks", "the search (it writes the chosen network)")
    p, out = run.params.search, run.paths.search_dir
    ratings = [pd.read_csv(needed(run.paths.rating(b), "rate"), dtype={"path": str})
               for b in range(run.space.num_blocks)]
    predictor = predictor_of(run) if p.combine == "predictor" else None
    scored = ratings if predictor is None else predicted_scores(ratings, predictor)
    stages = stage_tables(run.space, [Candidates.from_frame(r) for r in scored], latency=latency_model(run))
    costs = [s.costs() for s in stages]
    try:
        best = best_under(costs, dict(p.budgets))
        near = near_best(costs, dict(p.budgets), p.front_axis, p.tie_tolerance)
    except BudgetError as exc:
        raise ConfigError(str(exc)) from None
    if p.tie_tolerance > 0:
        best = near[0]
        log.info("search: %d networks under the budgets are rated within search.tie_tolerance=%g of the best; "
                 "chose the cheapest on %s", len(near), p.tie_tolerance, p.front_axis)
    arch = choice_of(run.space, stages, best.rows)
    front = pareto_front(costs, p.front_axis)
    table = front_table(costs, front)
    table["arch"] = [choice_of(run.space, stages, sel.rows).tag() for sel in front]
    table["chosen"] = [sel.rows == best.rows for sel in front]
    out.mkdir(parents=True, exist_ok=True)
    arch.save(run.paths.arch)
    write_csv(out / "front.csv", table)
    costs_shown = [c for c in ("params", "macs", "latency_ms") if c in table.columns]
    write_csv(out / "chosen.csv", table.loc[table["chosen"], ["score", *costs_shown]])  # for DVC's front plot
    metrics = {"score": best.score, **{k: float(v) for k, v in best.costs.items()}, "front_size": len(front),
               "tie_tolerance": p.tie_tolerance, "within_tolerance": len(near),
               "space_size": str(run.space.size()), "budgets": dict(p.budgets), "ratings": rating_summary(ratings),
               "combine": p.combine, "front_axis": p.front_axis}
    if predictor is not None:
        metrics |= {"predicted_accuracy": predictor["intercept"] - best.score,
                    "predictor_kendall_tau_loo": predictor["kendall_tau_loo"], "predictor_digest": predictor["digest"]}
    write_json(out / "metrics.json", metrics)
    log.info("search: chose score %.4f, %s", best.score, {k: float(f"{v:.4g}") for k, v in best.costs.items()})
    return metrics


def predictor_of(run: Run) -> dict:
    """The rank stage's fitted predictor (search.combine: predictor), checked against this run's blocks."""

    path = run.paths.rank_dir / "predictor.json"
    if not path.is_file():
        raise ConfigError(f"search.combine='predictor': {path} does not exist; the rank stage fits it (`dna rank`, "
                          "or `dvc repro rank/dvc.yaml`) once the search with search.combine: sum has run")
    predictor = json.loads(path.read_text())
    weights = predictor.get("weights") or {}
    expected = [f"rating_block_{b}" for b in range(run.space.num_blocks)]
    if not predictor.get("fitted") or sorted(weights) != sorted(expected):
        raise ConfigError(f"search.combine='predictor': {path} holds no predictor fitted on this run's "
                          f"{run.space.num_blocks} blocks (too few networks trained: rank.networks)")
    return predictor | {"digest": file_digest(path)}


def predicted_scores(ratings: list, predictor: dict) -> list:
    """Each block's scores as its term of the predictor, negated so that lower is better as for ratings: the sum over
    blocks is then the intercept minus the predicted accuracy, and the exact search over sums maximises it."""
    return [r.assign(score=-predictor["weights"][f"rating_block_{b}"] * r["score"]) for b, r in enumerate(ratings)]
