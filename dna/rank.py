"""Does the rating rank networks? The ranking stage (`dna rank`): train a sample of networks from scratch with one
short recipe and compare the order of their ratings with the order of their test accuracies, beside two baselines
measured in the same run (a single-path one-shot supernet's ratings of the same networks, and random search at the
same budget).

The networks (rank/plan.csv): rank.networks drawn from a pool of random networks of the space, stratified over cost
bands (quantiles of rank.cost_axis over the pool) and over rating within each band; the searched network
(search/arch.yaml); rank.random_networks random networks that meet search.budgets (the searched network's own cost
on rank.cost_axis when no budget is set). A network in several roles is trained once.

Resumable per network: each keeps its checkpoint and, once trained, a result file keyed on everything that decides
it (outputs/rank/networks/<id>/); running the stage again redoes only what is missing. A network whose training
fails is named, and the others are kept.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dna import plots
from dna.arch import Arch
from dna.checkpoint import atomic_write_text, digest, file_digest
from dna.config import ConfigError
from dna.errors import StageFailure, needed
from dna.rank_metrics import kendall_tau, spearman, tau_in_bands, top_k_precision
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
    from dna.pipeline import latency_model, stage_tables
    from dna.spaces.base import Candidates

    ratings = [Candidates.from_frame(pd.read_csv(needed(run.paths.rating(b), "rate"), dtype={"path": str}))
               for b in range(run.space.num_blocks)]
    return NetworkTable(stage_tables(run.space, ratings, latency=latency_model(run)))


def random_budgets(run, searched: pd.DataFrame) -> dict[str, float]:
    """search.budgets, or the searched network's cost on rank.cost_axis when no budget is set."""
    axis = run.params.rank.cost_axis
    return dict(run.params.search.budgets) or {axis: float(searched[axis].iloc[0])}


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
    columns = ["id", *ROLES, "band", "rating", *table.axes, "rows", "arch"]
    plan = plan[columns]
    out = run.paths.rank_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "plan.csv", plan.to_csv(index=False))
    _write_json(out / "bands.json", {"axis": p.cost_axis, "edges": edges.tolist(), "random_budgets": budgets,
                                     "pool": len(pool)})
    return plan


def read_plan(run) -> pd.DataFrame:
    return pd.read_csv(run.paths.rank_dir / "plan.csv")


def arch_of(plan: pd.DataFrame, network: str) -> Arch:
    return Arch.from_dict(json.loads(plan.loc[plan["id"] == network, "arch"].iloc[0]))


# training ----------------------------------------------------------------------------------------------------------
def train_network(run, network: str, arch: Arch, on_epoch=None) -> dict:
    """Train one network from scratch with the rank recipe, rank.seeds times; returns its mean accuracies.

    A seed whose result file matches is not redone; one interrupted resumes from its last epoch."""
    from dna.pipeline import write_json
    from dna.train import train_classifier

    p = run.params
    folder = run.paths.rank_dir / "networks" / network
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
    """Train the one-shot supernet (resumable), then rate every planned network by its hold-out accuracy with
    inherited weights, BatchNorm re-estimated; writes rank/spos/ratings.csv and history.csv."""
    from dna.data import eval_view
    from dna.pipeline import write_csv
    from dna.spos import inherited_accuracy, train_spos

    p, out = run.params, run.paths.rank_dir / "spos"
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = digest(p.seed, p.data, file_digest(run.paths.splits), p.space, p.distill, p.rank.spos)
    supernet, result = train_spos(run.space, run.data, p, out / "supernet.pt", fingerprint=fingerprint,
                                  device=run.device, on_epoch=on_epoch)
    write_csv(out / "history.csv", pd.DataFrame(result.history))
    data = eval_view(run.data)
    calibration = data.images("train", positions=data.stratified("train", p.rating.calibration_size, p.seed))
    loader = run.data.loader("rate", EVAL_BATCH_SIZE)
    scores = [inherited_accuracy(supernet, run.space.parse(arch_of(plan, n)), calibration, loader, run.device)
              for n in plan["id"]]
    write_csv(out / "ratings.csv", pd.DataFrame({"id": plan["id"], "spos_accuracy": scores}))
    cells = sum(len(run.space.cells(b)) for b in range(run.space.num_blocks))
    steps_per_epoch = -(-len(run.data.train) // p.distill.batch_size)
    return {"epochs": result.epochs, "steps": result.steps, "block_paths": result.steps * run.space.num_blocks,
            "distill_block_paths": p.distill.epochs * steps_per_epoch * cells, "resumed_from": result.resumed_from}


# the report --------------------------------------------------------------------------------------------------------
def summarize(run, plan: pd.DataFrame, results: dict[str, dict], failed: dict[str, str],
              spos: dict | None) -> dict:
    """networks.csv, metrics.json and the plot, from the networks trained so far."""
    from dna.pipeline import write_csv, write_json

    p, out = run.params.rank, run.paths.rank_dir
    frame = plan.copy()
    frame["test_accuracy"] = [results.get(n, {}).get("test_accuracy") for n in frame["id"]]
    frame["rate_accuracy"] = [results.get(n, {}).get("rate_accuracy") for n in frame["id"]]
    frame["test_accuracies"] = [";".join(f"{a:.4f}" for a in results[n]["test_accuracies"]) if n in results else ""
                                for n in frame["id"]]
    ratings = out / "spos" / "ratings.csv"
    if spos is not None and ratings.is_file():
        frame = frame.merge(pd.read_csv(ratings), on="id", how="left")
    else:
        frame["spos_accuracy"] = np.nan
    frame["status"] = ["trained" if n in results else f"failed: {failed.get(n, 'not trained')}" for n in frame["id"]]
    frame = frame.astype({"test_accuracy": float, "rate_accuracy": float})
    trained = frame[frame["test_accuracy"].notna()]
    ranked = trained[trained["sampled"] | trained["searched"]]
    score, accuracy = -ranked["rating"].to_numpy(float), ranked["test_accuracy"].to_numpy(float)
    in_band, per_band = tau_in_bands(score, accuracy, ranked["band"])
    metrics = {"kendall_tau": kendall_tau(score, accuracy), "spearman": spearman(score, accuracy),
               "kendall_tau_in_band": in_band, "kendall_tau_per_band": {str(b): t for b, t in per_band.items()},
               "top_k": p.top_k, "top_k_precision": top_k_precision(score, accuracy, p.top_k),
               "networks": len(ranked), "cost_axis": p.cost_axis, "cost_bands": p.cost_bands, "seeds": p.seeds,
               "train_epochs": p.train.epochs, "failed": dict(failed)}
    if p.seeds > 1 and len(trained):
        runs = np.array([[float(a) for a in s.split(";")] for s in trained["test_accuracies"]])
        metrics["seed_kendall_tau"] = kendall_tau(runs[:, 0], runs[:, 1])  # how far seed noise alone lets tau go
        metrics["seed_accuracy_spread"] = float(np.mean(runs.max(axis=1) - runs.min(axis=1)))
    if spos is not None:
        spos_score = ranked["spos_accuracy"].to_numpy(float)
        metrics |= {"spos_kendall_tau": kendall_tau(spos_score, accuracy),
                    "spos_spearman": spearman(spos_score, accuracy),
                    "spos_kendall_tau_in_band": tau_in_bands(spos_score, accuracy, ranked["band"])[0],
                    "spos_top_k_precision": top_k_precision(spos_score, accuracy, p.top_k), "spos": spos}
    else:
        metrics["spos_kendall_tau"] = None
    searched = trained[trained["searched"]]
    randoms = trained[trained["random"]]
    metrics["searched_accuracy"] = float(searched["test_accuracy"].iloc[0]) if len(searched) else None
    metrics["random_median_accuracy"] = float(randoms["test_accuracy"].median()) if len(randoms) else None
    metrics["random_networks"] = len(randoms)
    if metrics["searched_accuracy"] is not None and metrics["random_median_accuracy"] is not None:
        metrics["searched_minus_random_median"] = metrics["searched_accuracy"] - metrics["random_median_accuracy"]
    write_csv(out / "networks.csv", frame)
    write_json(out / "metrics.json", metrics)
    plots.ranking(frame, metrics, out / "rank.png")
    return metrics


class RankFailure(StageFailure):
    """Some networks (or the one-shot baseline) failed; the others' results are kept and reported."""

    def __init__(self, failed: dict[str, str], kept: int):
        self.failed = failed
        causes = "; ".join(f"{name}: {why}" for name, why in failed.items())
        super().__init__(f"rank: {len(failed)} failed ({causes}); {kept} network(s) trained and kept: running the "
                         "stage again redoes only what failed")


def stage_rank(run) -> dict:
    """The whole stage in this process: plan, train every network, the one-shot baseline, then the report."""
    plan = plan_networks(run)
    results, failed = {}, {}
    for network in plan["id"]:
        try:
            results[network] = train_network(run, network, arch_of(plan, network))
        except Exception as exc:  # noqa: BLE001 - a network's failure is reported with the others below
            log.error("rank: network %s failed: %s: %s", network, type(exc).__name__, exc)
            failed[network] = f"{type(exc).__name__}: {exc}"
    try:
        spos = spos_ratings(run, plan)
    except Exception as exc:  # noqa: BLE001
        log.error("rank: the one-shot baseline failed: %s: %s", type(exc).__name__, exc)
        spos, failed["spos"] = None, f"{type(exc).__name__}: {exc}"
    metrics = summarize(run, plan, results, failed, spos)
    if failed:
        raise RankFailure(failed, len(results))
    log.info("rank: Kendall tau %s over %d networks (one-shot %s); searched %s, random median %s",
             metrics["kendall_tau"], metrics["networks"], metrics["spos_kendall_tau"], metrics["searched_accuracy"],
             metrics["random_median_accuracy"])
    return metrics
