"""The search stage: the best network under the budgets and the Pareto front, from the block ratings."""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from dna.checkpoint import file_digest, write_csv, write_json
from dna.cost_tables import latency_model, stage_tables, target_latency
from dna.errors import ConfigError, needed
from dna.locks import locked
from dna.search import front_table, pareto_front
from dna.spaces.base import require

if TYPE_CHECKING:
    import pandas as pd

    from dna.arch import Arch
    from dna.search import Selection
    from dna.spaces.base import Candidates, SearchSpace
    from dna.spaces.context import SpaceContext


log = logging.getLogger(__name__)


def rating_summary(tables: list[pd.DataFrame]) -> dict:
    return {f"block_{i}": {"candidates": int(len(t.drop_duplicates(["cell", "path"]))), "best": float(t["score"].min()),
                           "median": float(t["score"].median()), "worst": float(t["score"].max())}
            for i, t in enumerate(tables)}




def choice_of(space: SearchSpace, stages: list[Candidates], rows: tuple[int, ...]) -> Arch:
    """The network of one row per stage (stem and head rows included)."""
    return space.arch([stage.choice(row) for stage, row in zip(stages[1:-1], rows[1:-1])])


@locked("search")
def stage_search(run: SpaceContext) -> dict:
    """One network per target (search.targets, or search.budgets as the one target "default") from the one rating,
    each into search/targets/<name>/arch.yaml; the Pareto front on search.front_axis, and the family table
    (search/targets.csv). The metrics' own rating and costs are the first (primary) target's."""
    import pandas as pd

    from dna.spaces.base import Candidates

    require(run.space, "networks", "the search (it writes the chosen network)")
    p = run.params.search
    ratings = [pd.read_csv(needed(run.paths.rating(b), "rate"), dtype={"path": str})
               for b in range(run.space.num_blocks)]
    predictor = predictor_of(run) if p.combine == "predictor" else None
    scores = ratings if predictor is None else predicted_scores(ratings, predictor)
    scored = [Candidates.from_frame(r) for r in scores]
    local = latency_model(run)
    stages = stage_tables(run.space, scored, latency=local)
    chosen = {name: choose(run, stages if t.latency_profile is None else
                           stage_tables(run.space, scored, latency=target_latency(run, t, local)), name)
              for name, t in p.named_targets().items()}
    costs = [s.costs() for s in stages]
    front = pareto_front(costs, p.front_axis)
    table = front_table(costs, front)
    table["arch"] = [choice_of(run.space, stages, sel.rows).tag() for sel in front]
    primary = next(iter(chosen.values()))
    table["chosen"] = [sel.rows == primary.rows for sel in front]
    table["targets"] = [" ".join(n for n, c in chosen.items() if c.rows == sel.rows) for sel in front]
    family = targets_table(run, chosen, stages)
    for name, selection in chosen.items():  # every write below makes its folders
        choice_of(run.space, stages, selection.rows).save(run.paths.at(name).arch)
    write_csv(run.paths.front, table)
    write_csv(run.paths.targets_table, family)
    costs_shown = [c for c in ("params", "macs", "latency_ms") if c in family.columns]
    write_csv(run.paths.chosen, family[["target", "score", *costs_shown]])  # for DVC's front plot
    metrics = {"score": primary.score, **{k: float(v) for k, v in primary.costs.items()}, "front_size": len(front),
               "tie_tolerance": p.tie_tolerance, "space_size": str(run.space.size()),
               "budgets": next(iter(p.named_targets().values())).budgets(), "ratings": rating_summary(ratings),
               "combine": p.combine, "front_axis": p.front_axis,
               "targets": {n: {"score": c.score, **{k: float(v) for k, v in c.costs.items()}}
                           for n, c in chosen.items()}}
    if predictor is not None:
        metrics |= {"predicted_accuracy": predictor["intercept"] - primary.score,
                    "predictor_kendall_tau_loo": predictor["kendall_tau_loo"], "predictor_digest": predictor["digest"]}
    write_json(run.paths.search_metrics, metrics)
    for name, c in chosen.items():
        log.info("search: target %s: score %.4f, %s", name, c.score, {k: float(f"{v:.4g}") for k, v in c.costs.items()})
    return metrics


def choose(run: SpaceContext, stages: list[Candidates], name: str) -> Selection:
    """The best network under one target's budgets: with search.tie_tolerance, the cheapest on search.front_axis of
    those rated within it of the best."""
    from dna.search import BudgetError, best_under, near_best

    p = run.params.search
    budgets = p.named_targets()[name].budgets()
    costs = [s.costs() for s in stages]
    try:
        if p.tie_tolerance <= 0:
            return best_under(costs, budgets)
        near = near_best(costs, budgets, p.front_axis, p.tie_tolerance)
    except BudgetError as exc:
        raise ConfigError(f"{p.target_key(name)}: {exc}") from None
    log.info("search: target %s: %d networks under its budgets are rated within search.tie_tolerance=%g of the best; "
             "chose the cheapest on %s", name, len(near), p.tie_tolerance, p.front_axis)
    return near[0]


def targets_table(run: SpaceContext, chosen: dict[str, Selection], stages: list[Candidates]) -> pd.DataFrame:
    """One row per target: its budgets, the chosen network's rating and costs, and the first target that chose the
    same network (`same_as`: one retraining serves both)."""
    import pandas as pd

    targets, rows, first = run.params.search.named_targets(), [], {}
    for name, c in chosen.items():
        first.setdefault(c.rows, name)
        rows.append({"target": name, "score": c.score, **{k: float(v) for k, v in c.costs.items()},
                     **{f"budget_{axis}": v for axis, v in targets[name].budgets().items()},
                     "latency_profile": targets[name].latency_profile or "",
                     "arch": choice_of(run.space, stages, c.rows).tag(), "same_as": first[c.rows]})
    return pd.DataFrame(rows)


def predictor_of(run: SpaceContext) -> dict:
    """The rank stage's fitted predictor (search.combine: predictor), checked against this run's blocks."""

    path = run.paths.predictor
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
