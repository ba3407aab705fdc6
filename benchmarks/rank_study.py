"""The ranking study: do the DNA family's ratings order networks by their trained accuracy better than a one-shot
supernet, than cost alone, and than chance? One set of networks trained from scratch (each with two seeds) is the
ground truth for every member, so the members' taus are comparable:

- DNA: `configs/rank_study.yaml` as it is, then its rank stage (the networks, the single-path one-shot baseline,
  parameters and multiply-adds alone, and every block distilled again from another seed).
- DNA++: the same with `supervision` and `teacher.source: none` taken from `configs/dna_plusplus.yaml`.
- DNA+ (round 2): the same with round 1's network, scaled as `configs/dna_plus.yaml` scales it, as the teacher.

Every tau comes with its bootstrap 90% interval and beside both noises (the ground truth's `seed_kendall_tau`, each
member's `rating_seed_kendall_tau`). Each member's searched network is trained with the same recipe, against the
median of random networks under the same budget.

    apt-get install dataset-fashion-mnist
    python -m benchmarks.rank_study --outputs outputs/rank-study

Resumable: every stage and every network's training keeps its checkpoint and result; run the command again.
<outputs>/study.json holds every figure, <outputs>/study.md the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "rank_study.yaml"
log = logging.getLogger("rank_study")


def member_params(params, member: str):
    """The params of one member of the study, its outputs under the DNA member's."""
    from dna.config import parse_params
    from dna.rounds import round_params

    raw = params.model_dump(mode="json")
    out = Path(params.outputs)
    if member == "DNA++":
        plusplus = yaml.safe_load((ROOT / "configs" / "dna_plusplus.yaml").read_text())
        return parse_params(raw | {"supervision": plusplus["supervision"], "outputs": str(out / "dna-plusplus"),
                                   "teacher": raw["teacher"] | plusplus["teacher"]})
    if member == "DNA+ (round 2)":
        plus = yaml.safe_load((ROOT / "configs" / "dna_plus.yaml").read_text())["rounds"]
        return round_params(parse_params(raw | {"rounds": plus}, check_paths=False), 2, check_paths=False)
    return params


def searched_and_rated(run) -> None:
    """The stages of the table up to the search, each resuming from what it finds; no latency budget, so no
    latency profile."""
    from dna.stages import run_stage, search_stages

    for stage in search_stages():
        if not stage.makes_profile:
            run_stage(stage, run)


def member_taus(run, plan: pd.DataFrame, ranked: pd.DataFrame) -> dict:
    """A member's ratings of the ranked networks against their trained accuracy, and against its own ratings from
    blocks distilled from another seed; each tau with its interval."""
    from dna.rank import Taus, network_table, rating_reliability
    from dna.rank_sample import parse_rows

    table = network_table(run).frame([parse_rows(r) for r in ranked["rows"]])
    if table["rows"].tolist() != ranked["rows"].tolist():
        raise ValueError(f"{run.paths.root}: its space is not the DNA member's")
    score, accuracy = -table["rating"].to_numpy(float), ranked["test_accuracy"].to_numpy(float)
    taus = Taus(run.params.rank.bootstrap, run.params.seed)
    taus.add("kendall_tau", score, accuracy)
    taus.add("kendall_tau_in_band", score, accuracy, ranked["band"])
    replicates, per_block = rating_reliability(run, plan)
    if 1 in replicates:
        again = replicates[1].set_index("rows").loc[ranked["rows"], "rating"].to_numpy(float)
        taus.add("rating_seed_kendall_tau", -again, score)
        taus.values["rating_seed_kendall_tau_per_block"] = per_block[1]
    return taus.values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=PRESET)
    ap.add_argument("--outputs", type=Path, default=None, help="default: the preset's outputs")
    ap.add_argument("--members", nargs="+", default=["DNA", "DNA++", "DNA+ (round 2)"])
    ap.add_argument("-S", "--set", dest="sets", action="append", default=[], help="KEY=VALUE over the preset")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from benchmarks._common import load_average
    from dna.arch import Arch
    from dna.config import load_params, parse_overrides
    from dna.rank import network_id, replicate_ratings, stage_rank, train_network
    from dna.rank_metrics import shown
    from dna.run import Run

    overrides = parse_overrides(args.sets) | ({"outputs": str(args.outputs)} if args.outputs else {})
    params = load_params(args.params, overrides, check_paths=False)
    members = {m: member_params(params, m) for m in args.members}  # every member checked before any work
    root = Path(params.outputs)
    prepare_data(params)
    start, seconds, study = time.perf_counter(), {}, {"load_at_start": load_average()}

    dna = Run(params)  # first: DNA+ is taught by the network it finds
    runs = {"DNA": dna} | {name: Run(config) for name, config in members.items() if name != "DNA"}
    for name, run in runs.items():  # the members' searches first, the networks' training after them
        begin = time.perf_counter()
        searched_and_rated(run)
        if name != "DNA":
            replicate_ratings(run)
        seconds[name] = round(time.perf_counter() - begin, 1)
    begin = time.perf_counter()
    stage_rank(dna)
    seconds["rank"] = round(time.perf_counter() - begin, 1)
    frame = pd.read_csv(dna.paths.rank_table)
    plan = frame.drop(columns=[c for c in frame.columns if c not in pd.read_csv(
        dna.paths.rank_plan).columns])
    ranked = frame[(frame["sampled"] | frame["searched"]) & frame["test_accuracy"].notna()]
    metrics = json.loads(dna.paths.rank_metrics.read_text())
    study["ground_truth"] = {k: metrics.get(k) for k in (
        "seed_kendall_tau", "seed_kendall_tau_ci", "seed_accuracy_noise", "seed_accuracy_spread", "networks")}
    study["ground_truth"]["accuracy_range"] = [float(ranked["test_accuracy"].min()),
                                               float(ranked["test_accuracy"].max())]
    study["baselines"] = {name: {"kendall_tau": metrics.get(f"{key}kendall_tau"),
                                 "kendall_tau_ci": metrics.get(f"{key}kendall_tau_ci"),
                                 "kendall_tau_in_band": metrics.get(f"{key}kendall_tau_in_band"),
                                 "kendall_tau_in_band_ci": metrics.get(f"{key}kendall_tau_in_band_ci")}
                          for name, key in (("SPOS (one-shot supernet)", "spos_"), ("parameters alone", "params_"),
                                            ("multiply-adds alone", "macs_"))}
    study["random"] = {"median": metrics["random_median_accuracy"], "networks": metrics["random_networks"]}
    randoms = frame[frame["random"] & frame["test_accuracy"].notna()]["test_accuracy"]

    study["members"] = {}
    for name, run in runs.items():
        begin = time.perf_counter()
        arch = Arch.load(run.paths.arch)
        network = network_id(arch)
        trained = train_network(dna, network, arch)  # the DNA member's networks/, the same recipe and seeds
        values = member_taus(run, plan, ranked)
        teacher = json.loads(run.paths.teacher_metrics.read_text())
        values |= {"searched": arch.tag(), "searched_accuracy": trained["test_accuracy"],
                   "searched_minus_random_median": trained["test_accuracy"] - float(randoms.median()),
                   "searched_beats_random_beyond_noise": bool(trained["test_accuracy"] - float(randoms.median())
                                                              > metrics.get("seed_accuracy_noise", 0.0)),
                   "teacher_test_accuracy": teacher.get("test_accuracy"),
                   "teacher_above_every_ranked_network": None if teacher.get("test_accuracy") is None else bool(
                       teacher["test_accuracy"] > ranked["test_accuracy"].max()),
                   "macs": json.loads(run.paths.search_metrics.read_text()).get("macs")}
        if name == "DNA":
            values |= {k: metrics.get(k) for k in ("predictor_kendall_tau_loo", "predictor_kendall_tau_loo_ci",
                                                    "zscore_kendall_tau", "zscore_kendall_tau_ci")}
        seconds[f"{name} searched network"] = round(time.perf_counter() - begin, 1)
        study["members"][name] = values
        log.info("%s: kendall_tau %s, in band %s, rating_seed_kendall_tau %s", name, shown(values, "kendall_tau"),
                 shown(values, "kendall_tau_in_band"), shown(values, "rating_seed_kendall_tau"))
    study["seconds"] = seconds | {"total": round(time.perf_counter() - start, 1)}
    study["load_at_end"] = load_average()
    (root / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    (root / "study.md").write_text(table(study) + "\n")
    print(table(study))
    return 0


def table(study: dict) -> str:
    from dna.rank_metrics import shown

    truth = study["ground_truth"]
    lines = [f"Ground truth: {truth['networks']} networks, test accuracy {truth['accuracy_range'][0]:.4f} - "
             f"{truth['accuracy_range'][1]:.4f}; seed_kendall_tau {shown(truth, 'seed_kendall_tau')}, "
             f"mean |seed 0 - seed 1| {truth['seed_accuracy_noise']:.4f}; random median "
             f"{study['random']['median']:.4f} ({study['random']['networks']} networks under the budget)", "",
             "| rated by | kendall_tau [90% CI] | in-band tau [90% CI] | rating_seed_kendall_tau [90% CI] | "
             "searched network | its accuracy (minus random median) | teacher |",
             "|---|---|---|---|---|---|---|"]
    for name, v in study["members"].items():
        teacher = "none" if v["teacher_test_accuracy"] is None else (
            f"{v['teacher_test_accuracy']:.4f} ({'above' if v['teacher_above_every_ranked_network'] else 'not above'}"
            " every ranked network)")
        lines.append(f"| {name} | {shown(v, 'kendall_tau')} | {shown(v, 'kendall_tau_in_band')} | "
                     f"{shown(v, 'rating_seed_kendall_tau')} | {v['macs']:,.0f} multiply-adds | "
                     f"{v['searched_accuracy']:.4f} ({v['searched_minus_random_median']:+.4f}) | {teacher} |")
    for name, v in study["baselines"].items():
        lines.append(f"| {name} | {shown(v, 'kendall_tau')} | {shown(v, 'kendall_tau_in_band')} | - | - | - | - |")
    dna = study["members"].get("DNA", {})
    if dna.get("predictor_kendall_tau_loo") is not None:
        lines.append(f"| DNA, DONNA's linear predictor (leave-one-out) | {shown(dna, 'predictor_kendall_tau_loo')} "
                     "| - | - | - | - | - |")
    return "\n".join(lines)


def prepare_data(params) -> None:
    """The preset's image folder from Debian's package, written once."""
    from benchmarks.fashion_mnist import PACKAGE, write_folder

    root = Path(params.data.root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return
    if not PACKAGE.is_dir():
        raise SystemExit(f"{PACKAGE}: not there; apt-get install dataset-fashion-mnist")
    write_folder(root, TRAIN_PER_CLASS, TEST_PER_CLASS)


TRAIN_PER_CLASS, TEST_PER_CLASS = 500, 1000

if __name__ == "__main__":
    raise SystemExit(main())
