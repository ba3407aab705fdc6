"""Does the rating rank networks? The ranking stage (`dna rank`): train a sample of networks from scratch with one
short recipe and compare the order of their ratings with the order of their test accuracies, beside two baselines
measured in the same run (a single-path one-shot supernet's ratings of the same networks, and random search at the
same budget).

The networks (rank/plan.csv): rank.networks drawn from a pool of random networks of the space, stratified over cost
bands (quantiles of rank.cost_axis over the pool) and over rating within each band; the searched network
(the first search target's); rank.random_networks random networks that meet its budgets (the searched network's own cost
on rank.cost_axis when no budget is set). A network in several roles is trained once.

Every tau is reported with its bootstrap 90% interval and beside the noise of both its sides: the ground truth's
(`seed_kendall_tau`: each network trained with rank.seeds seeds, over the same networks as `kendall_tau`) and the
rating's (`rating_seed_kendall_tau`: every block distilled and rated again from another seed, rank.rating_seeds).
Beside DNA's equal-weight sum of block ratings: each block alone, a sum of per-block z-scores and DONNA's linear
predictor judged leave-one-out (rank/predictor.json); the one-shot baseline is rated by inherited-weight hold-out loss.

Resumable per network: each keeps its checkpoint and, once trained, a result file keyed on everything that decides
it (outputs/rank/networks/<id>/); running the stage again redoes only what is missing. A network whose training
fails is named, and the others are kept.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dna import rank_plot
from dna.arch import Arch
from dna.checkpoint import atomic_write_text, digest, file_digest
from dna.errors import ConfigError, needed
from dna.rank_metrics import (
    bootstrap_interval,
    kendall_tau,
    shown,
    spearman,
    tau_in_bands,
    tau_interval,
    top_k_precision,
)
from dna.rank_sample import NetworkTable, band_edges, band_of, parse_rows, stratified, under_budget

log = logging.getLogger(__name__)
ROLES = ("sampled", "searched", "random")
EXTRA_POOLS = 20  # more pools drawn, at most, to find rank.random_networks networks under the budgets
EVAL_BATCH_SIZE = 256


def network_id(arch: Arch) -> str:
    return "n" + digest(arch.to_dict())[:10]


def _write_json(path: Path, value: dict) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


# the networks ------------------------------------------------------------------------------------------------------
def network_table(run) -> NetworkTable:
    from dna.cost_tables import latency_model, stage_tables
    from dna.spaces.base import Candidates

    ratings = [Candidates.from_frame(pd.read_csv(needed(run.paths.rating(b), "rate"), dtype={"path": str}))
               for b in range(run.space.num_blocks)]
    return NetworkTable(stage_tables(run.space, ratings, latency=latency_model(run)))


def random_budgets(run, searched: pd.DataFrame) -> dict[str, float]:
    """The first search target's budgets, or the searched network's cost on rank.cost_axis when it sets none."""
    axis = run.params.rank.cost_axis
    return run.params.search.named_targets()[run.paths.target].budgets() or {axis: float(searched[axis].iloc[0])}


def plan_networks(run) -> pd.DataFrame:
    """The networks to train, with their roles, cost band, rating, costs and architecture; writes rank/plan.csv."""
    p = run.params.rank
    table = network_table(run)
    if p.cost_axis not in table.axes:
        raise ConfigError(f"rank.cost_axis={p.cost_axis!r}: this run has no {p.cost_axis} (allowed: "
                          f"{', '.join(table.axes)}; latency_ms needs `dna profile`)")
    rng = np.random.default_rng([run.params.seed, 12])
    pool = table.frame(table.draw(p.pool, rng))
    edges = band_edges(pool[p.cost_axis], p.cost_bands)
    try:
        sampled = stratified(pool, p.networks, edges, p.cost_axis)
    except ValueError as exc:
        raise ConfigError(f"rank.networks={p.networks}, rank.cost_bands={p.cost_bands}: {exc}") from None
    searched = table.frame([table.rows_of(run.space.parse(Arch.load(needed(run.paths.arch, "search"))))])
    budgets = random_budgets(run, searched)
    fits = under_budget(pool, budgets)
    for _ in range(EXTRA_POOLS):
        if len(fits) >= p.random_networks:
            break
        fits = pd.concat([fits, under_budget(table.frame(table.draw(p.pool, rng)), budgets)]).drop_duplicates("rows")
    if len(fits) < p.random_networks:
        raise ConfigError(f"rank.random_networks={p.random_networks}: only {len(fits)} of "
                          f"{p.pool * (EXTRA_POOLS + 1)} random networks meet {budgets} (without search.budgets, "
                          "the searched network's own cost is the budget: set search.budgets, or fewer "
                          "rank.random_networks)")
    randoms = fits.iloc[np.sort(rng.choice(len(fits), p.random_networks, replace=False))]
    parts = [frame.assign(**{r: r == role for r in ROLES})
             for role, frame in (("sampled", sampled), ("searched", searched), ("random", randoms))]
    plan = pd.concat(parts, ignore_index=True)
    plan = plan.groupby("rows", sort=False).agg({**{c: "first" for c in plan.columns if c not in ROLES + ("rows",)},
                                                 **{r: "any" for r in ROLES}}).reset_index()
    plan["band"] = band_of(plan[p.cost_axis], edges)
    archs = [run.space.arch(table.choice(parse_rows(rows))) for rows in plan["rows"]]
    plan.insert(0, "id", [network_id(a) for a in archs])
    plan["arch"] = [a.tag() for a in archs]
    columns = ["id", *ROLES, "band", "rating", *(c for c in plan.columns if c.startswith("rating_block_")),
               *table.axes, "rows", "arch"]
    plan = plan[columns]
    atomic_write_text(run.paths.rank_plan, plan.to_csv(index=False))
    _write_json(run.paths.rank_bands, {"axis": p.cost_axis, "edges": edges.tolist(), "random_budgets": budgets,
                                       "pool": len(pool)})
    return plan


def read_plan(run) -> pd.DataFrame:
    return pd.read_csv(run.paths.rank_plan)


def arch_of(plan: pd.DataFrame, network: str) -> Arch:
    return Arch.from_dict(json.loads(plan.loc[plan["id"] == network, "arch"].iloc[0]))


# training ----------------------------------------------------------------------------------------------------------
def train_network(run, network: str, arch: Arch, on_epoch=None) -> dict:
    """Train one network from scratch with the rank recipe, rank.seeds times; returns its mean accuracies.

    A seed whose result file matches is not redone; one interrupted resumes from its last epoch."""
    from dna.checkpoint import write_json
    from dna.train import train_classifier

    p = run.params
    folder = run.paths.rank_networks / network
    folder.mkdir(parents=True, exist_ok=True)
    arch.save(folder / "arch.yaml")
    records = []
    for index in range(p.rank.seeds):
        seed = p.seed + 1_000 * index
        fingerprint = digest(seed, p.data, file_digest(run.paths.splits), p.rank.train, arch.to_dict())
        path = folder / f"result_{index}.json"
        if path.is_file() and json.loads(path.read_text()).get("fingerprint") == fingerprint:
            records.append(json.loads(path.read_text()))
            continue
        import torch

        start = time.perf_counter()
        torch.manual_seed(seed)
        model = run.space.build(arch, drop_rate=p.rank.train.drop_rate)
        result = train_classifier(model, run.data, p.rank.train, folder / f"train_state_{index}.pt", seed=seed,
                                  fingerprint=fingerprint, device=run.device, name=f"rank {network} seed {index}",
                                  on_epoch=on_epoch)
        record = {"network": network, "seed": seed, "fingerprint": fingerprint,
                  "test_accuracy": result.test_accuracy, "rate_accuracy": result.history[-1]["rate_accuracy"],
                  "epochs": len(result.history), "resumed_from": result.resumed_from,
                  "seconds": round(time.perf_counter() - start, 2)}
        write_json(path, record)
        records.append(record)
    accuracies = [r["test_accuracy"] for r in records]
    return {"network": network, "test_accuracy": float(np.mean(accuracies)), "test_accuracies": accuracies,
            "rate_accuracy": float(np.mean([r["rate_accuracy"] for r in records])),
            "resumed_from": max(r["resumed_from"] for r in records)}


def spos_ratings(run, plan: pd.DataFrame, on_epoch=None) -> dict:
    """Train the one-shot supernet (resumable), then rate every planned network by its hold-out loss with inherited
    weights, BatchNorm re-estimated; writes rank/spos/ratings.csv (loss and accuracy) and history.csv."""
    from dna.checkpoint import write_csv
    from dna.data import eval_view
    from dna.spos import inherited_scores, train_spos

    p, out = run.params, run.paths.rank_spos
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = digest(p.seed, p.data, file_digest(run.paths.splits), p.space, p.distill, p.rank.spos)
    supernet, result = train_spos(run.space, run.data, p, out / "supernet.pt", fingerprint=fingerprint,
                                  device=run.device, on_epoch=on_epoch)
    write_csv(out / "history.csv", pd.DataFrame(result.history))
    data = eval_view(run.data)
    calibration = data.images("train", positions=data.stratified("train", p.rating.calibration_size, p.seed))
    loader = run.data.loader("rate", EVAL_BATCH_SIZE)
    scores = [inherited_scores(supernet, run.space.parse(arch_of(plan, n)), calibration, loader, run.device)
              for n in plan["id"]]
    write_csv(run.paths.spos_ratings, pd.DataFrame({"id": plan["id"], "spos_loss": [s[0] for s in scores],
                                                 "spos_accuracy": [s[1] for s in scores]}))
    cells = sum(len(run.space.cells(b)) for b in range(run.space.num_blocks))
    steps_per_epoch = -(-len(run.data.train) // p.distill.batch_size)
    return {"epochs": result.epochs, "steps": result.steps, "block_paths": result.steps * run.space.num_blocks,
            "distill_block_paths": p.distill.epochs * steps_per_epoch * cells, "resumed_from": result.resumed_from}


# the rating's own noise --------------------------------------------------------------------------------------------
def replicate_ratings(run, on_epoch=None) -> dict:
    """Distill and rate every block again from each of rank.rating_seeds - 1 other seeds, on the run's data, teacher
    and feature cache, into rank/replicates/<r>/ (resumable: a block's checkpoint of the same fingerprint resumes).
    How far these ratings agree with the run's own is the rating's reliability."""
    from dna.run import Run
    from dna.stages.distill import stage_distill, stage_features
    from dna.stages.rate import stage_rate

    start, replicates = time.perf_counter(), []
    for replicate in range(1, run.params.rank.rating_seeds):
        again = Run(run.params, replicate=replicate)
        stage_features(again)
        for block in range(run.space.num_blocks):
            stage_distill(again, block, on_epoch=on_epoch)
            stage_rate(again, block)
        replicates.append(replicate)
    return {"replicates": replicates, "seconds": round(time.perf_counter() - start, 1)}


def _ratings(run) -> list[pd.DataFrame] | None:
    paths = [run.paths.rating(b) for b in range(run.space.num_blocks)]
    if not all(path.is_file() for path in paths):
        return None
    return [pd.read_csv(path, dtype={"path": str}) for path in paths]


def rating_reliability(run, plan: pd.DataFrame) -> tuple[dict[int, pd.DataFrame], dict]:
    """Each replicate's ratings of the planned networks (whole networks and per block), and per block the Kendall
    tau between the replicate's and the run's ratings of every candidate."""
    from dna.run import Run

    own = _ratings(run)
    networks, per_block = {}, {}
    for replicate in range(1, run.params.rank.rating_seeds):
        again = Run(run.params, replicate=replicate)
        theirs = _ratings(again)
        if theirs is None:
            continue
        for block, (a, b) in enumerate(zip(own, theirs)):
            a, b = a.drop_duplicates(["cell", "path"]), b.drop_duplicates(["cell", "path"])
            if a[["cell", "path"]].values.tolist() != b[["cell", "path"]].values.tolist():
                raise ValueError(f"{again.paths.rating(block)} rates other candidates than {run.paths.rating(block)}")
            per_block.setdefault(replicate, {})[str(block)] = kendall_tau(a["score"], b["score"])
        frame = network_table(again).frame([parse_rows(r) for r in plan["rows"]])
        networks[replicate] = frame.assign(rows=plan["rows"].to_numpy())
    return networks, per_block


# the report --------------------------------------------------------------------------------------------------------
class Taus:
    """Kendall taus against trained accuracy, each with its bootstrap interval (`<name>_ci`)."""

    def __init__(self, resamples: int, seed: int):
        self.values: dict = {}
        self.options = {"resamples": resamples, "seed": seed}

    def add(self, name: str, score, accuracy, bands=None) -> float | None:
        score, accuracy = np.asarray(score, float), np.asarray(accuracy, float)
        tau = tau_in_bands(score, accuracy, bands)[0] if bands is not None else kendall_tau(score, accuracy)
        self.values[name] = tau
        self.values[f"{name}_ci"] = tau_interval(score, accuracy, bands, **self.options)
        return tau


def summarize(run, plan: pd.DataFrame, results: dict[str, dict], failed: dict[str, str],
              spos: dict | None) -> dict:
    """networks.csv, metrics.json, predictor.json and the plot, from the networks trained so far. Every tau comes
    with its bootstrap 90% interval and beside the noise of both its sides: the ground truth's (two trainings of
    each network) and the rating's (two distillations)."""
    from dna.block_combination import block_columns, fit_predictor, loo_predictions, zscore_rating
    from dna.checkpoint import write_csv, write_json

    p = run.params.rank
    frame = plan.copy()
    frame["test_accuracy"] = [results.get(n, {}).get("test_accuracy") for n in frame["id"]]
    frame["rate_accuracy"] = [results.get(n, {}).get("rate_accuracy") for n in frame["id"]]
    frame["test_accuracies"] = [";".join(f"{a:.4f}" for a in results[n]["test_accuracies"]) if n in results else ""
                                for n in frame["id"]]
    ratings = run.paths.spos_ratings
    if spos is not None and ratings.is_file():
        frame = frame.merge(pd.read_csv(ratings), on="id", how="left")
    else:
        frame["spos_loss"] = frame["spos_accuracy"] = np.nan
    replicates, per_block = rating_reliability(run, plan)
    for replicate, again in replicates.items():
        frame[f"rating_replicate_{replicate}"] = again["rating"].to_numpy(float)
    frame["status"] = ["trained" if n in results else f"failed: {failed.get(n, 'not trained')}" for n in frame["id"]]
    frame = frame.astype({"test_accuracy": float, "rate_accuracy": float})
    trained = frame[frame["test_accuracy"].notna()]
    ranked = trained[trained["sampled"] | trained["searched"]]
    score, accuracy, bands = -ranked["rating"].to_numpy(float), ranked["test_accuracy"].to_numpy(float), ranked["band"]
    taus = Taus(p.bootstrap, run.params.seed)
    taus.add("kendall_tau", score, accuracy)
    taus.add("kendall_tau_in_band", score, accuracy, bands)
    metrics = {"spearman": spearman(score, accuracy),
               "kendall_tau_per_band": {str(b): t for b, t in tau_in_bands(score, accuracy, bands)[1].items()},
               "top_k": p.top_k, "top_k_precision": top_k_precision(score, accuracy, p.top_k),
               "networks": len(ranked), "cost_axis": p.cost_axis, "cost_bands": p.cost_bands, "seeds": p.seeds,
               "rating_seeds": p.rating_seeds, "train_epochs": p.train.epochs, "failed": dict(failed),
               "interval": "bootstrap 90% (percentile, networks resampled; within bands for in-band taus)"}

    # the ground truth's noise: two trainings of the same networks as kendall_tau
    runs = np.array([[float(a) for a in s.split(";")] for s in ranked["test_accuracies"]]) if len(ranked) else None
    if p.seeds > 1 and runs is not None:
        taus.add("seed_kendall_tau", runs[:, 0], runs[:, 1])
        metrics["seed_accuracy_spread"] = float(np.mean(runs.max(axis=1) - runs.min(axis=1)))
    else:
        taus.values |= {"seed_kendall_tau": None, "seed_kendall_tau_ci": None}

    # the rating's noise: the same networks rated by blocks distilled from another seed
    if 1 in replicates:
        again = frame.loc[ranked.index, "rating_replicate_1"].to_numpy(float)
        taus.add("rating_seed_kendall_tau", -again, score)
        metrics["rating_seed_kendall_tau_per_block"] = per_block[1]
        metrics["rating_seed_noise"] = float(np.median(np.abs(again + score)))  # |rating 2 - rating 1|
    else:
        taus.values |= {"rating_seed_kendall_tau": None, "rating_seed_kendall_tau_ci": None}

    # how the blocks combine: each alone, z-scores, and the linear predictor judged leave-one-out
    columns = block_columns(ranked)
    metrics["block_kendall_tau"] = {c.rsplit("_", 1)[1]: kendall_tau(-ranked[c], accuracy) for c in columns}
    own = _ratings(run)
    if own is not None and len(ranked):
        taus.add("zscore_kendall_tau", -zscore_rating(ranked, own), accuracy)
    features = ranked[columns].to_numpy(float)
    predicted = loo_predictions(features, accuracy) if len(ranked) else None
    predictor = {"networks": len(ranked), "kendall_tau_loo": None, "fitted": predicted is not None}
    if predicted is not None:
        taus.add("predictor_kendall_tau_loo", predicted, accuracy)
        predictor |= fit_predictor(features, accuracy, columns) | {
            "kendall_tau_loo": taus.values["predictor_kendall_tau_loo"]}
    write_json(run.paths.predictor, predictor)

    # cost alone: does a bigger network train better?
    for axis in ("params", "macs"):
        taus.add(f"{axis}_kendall_tau", ranked[axis], accuracy)

    if spos is not None:
        spos_score = -ranked["spos_loss"].to_numpy(float)
        taus.add("spos_kendall_tau", spos_score, accuracy)
        taus.add("spos_kendall_tau_in_band", spos_score, accuracy, bands)
        metrics |= {"spos_spearman": spearman(spos_score, accuracy),
                    "spos_top_k_precision": top_k_precision(spos_score, accuracy, p.top_k), "spos": spos}
    else:
        taus.values |= {"spos_kendall_tau": None, "spos_kendall_tau_ci": None}
    metrics |= taus.values

    searched = trained[trained["searched"]]
    randoms = trained[trained["random"]]
    metrics["searched_accuracy"] = float(searched["test_accuracy"].iloc[0]) if len(searched) else None
    metrics["random_median_accuracy"] = float(randoms["test_accuracy"].median()) if len(randoms) else None
    metrics["random_networks"] = len(randoms)
    if metrics["searched_accuracy"] is not None and metrics["random_median_accuracy"] is not None:
        metrics["searched_minus_random_median"] = metrics["searched_accuracy"] - metrics["random_median_accuracy"]
        metrics["searched_minus_random_median_ci"] = bootstrap_interval(
            lambda r: metrics["searched_accuracy"] - float(np.median(r)), randoms["test_accuracy"],
            resamples=p.bootstrap, seed=run.params.seed)
    if p.seeds > 1 and len(trained):
        every = np.array([[float(a) for a in s.split(";")] for s in trained["test_accuracies"]])
        metrics["seed_accuracy_noise"] = float(np.mean(np.abs(every[:, 0] - every[:, 1])))
        if "searched_minus_random_median" in metrics:
            metrics["searched_beats_random_beyond_noise"] = bool(
                metrics["searched_minus_random_median"] > metrics["seed_accuracy_noise"])
    write_csv(run.paths.rank_table, frame)
    write_json(run.paths.rank_metrics, metrics)
    shown_taus = {name: shown(metrics, name) for name in metrics if f"{name}_ci" in metrics}
    rank_plot.ranking(frame, shown_taus, run.paths.rank_plot)
    return metrics


def headline(metrics: dict) -> str:
    """The ranking figures in one line, each with its interval and beside both noises."""
    names = ("kendall_tau", "kendall_tau_in_band", "spos_kendall_tau", "seed_kendall_tau", "rating_seed_kendall_tau")
    return "; ".join(f"{n} {shown(metrics, n)}" for n in names) + f" over {metrics['networks']} networks"


def stage_rank(run) -> dict:
    """The whole stage in this process: plan, train every network, the one-shot baseline, then the report."""
    from dna.fan_out import Unfinished, each
    from dna.spaces.base import require

    for capability in ("networks", "supernets"):
        require(run.space, capability, "the rank stage")
    plan = plan_networks(run)
    jobs = {network: functools.partial(train_network, run, network, arch_of(plan, network)) for network in plan["id"]}
    jobs |= {"spos": functools.partial(spos_ratings, run, plan), "replicate": functools.partial(replicate_ratings, run)}
    results, errors = each(jobs, "rank: job")
    spos = results.pop("spos", None)
    results.pop("replicate", None)
    failed = {key: f"{type(exc).__name__}: {exc}" for key, exc in errors.items()}
    metrics = summarize(run, plan, results, failed, spos)
    if failed:
        raise Unfinished("rank", "job", errors, results)
    log.info("rank: %s; searched %s, random median %s", headline(metrics), metrics["searched_accuracy"],
             metrics["random_median_accuracy"])
    return metrics
