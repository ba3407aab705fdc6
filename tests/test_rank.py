"""The ranking stage end to end on a tiny run: plan, train, one-shot baseline, report; a failed network is named and
the others kept, running again redoes only it, and a network killed mid-training resumes from its last epoch."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import dna.train
from dna.config import parse_params
from dna.fan_out import Unfinished
from dna.pipeline import Run, stage_data, stage_distill, stage_features, stage_rate, stage_search, stage_teacher
from dna.rank import arch_of, plan_networks, stage_rank, train_network


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.conftest import tiny_raw

    raw = tiny_raw(tmp_path_factory.mktemp("rank") / "outputs")
    raw["data"] |= {"rate_fraction": 0.2, "test_fraction": 0.6}  # a small training split: the stage trains 7 networks
    raw["teacher"]["train"] = raw["teacher"]["train"] | {"epochs": 1}
    raw["distill"]["epochs"] = 1
    raw["search"]["budgets"] = {"macs": 260_000}  # about the median network of the tiny space
    raw["rank"] = {"networks": 4, "cost_bands": 2, "top_k": 2, "random_networks": 2, "pool": 200, "seeds": 2,
                   "train": {"epochs": 1, "batch_size": 256, "warmup_epochs": 0}, "spos": {"epochs": 1}}
    run = Run(parse_params(raw))
    stage_data(run)
    stage_teacher(run)
    stage_features(run)
    for block in range(run.space.num_blocks):
        stage_distill(run, block)
        stage_rate(run, block)
    stage_search(run)
    return run


def test_a_failed_network_is_named_the_others_kept_and_a_rerun_trains_only_it(run, monkeypatch):
    real, trained = dna.train.train_classifier, []

    def failing(model, *args, name, **kwargs):
        if name.startswith(f"rank {victim} "):
            raise RuntimeError("out of memory")
        trained.append(name)
        return real(model, *args, name=name, **kwargs)

    plan = plan_networks(run)
    victim = plan["id"].iloc[0]
    assert plan["sampled"].sum() == 4 and plan["searched"].sum() == 1 and plan["random"].sum() == 2
    assert plan["id"].is_unique
    monkeypatch.setattr(dna.train, "train_classifier", failing)
    with pytest.raises(Unfinished, match=f"{victim}: RuntimeError: out of memory"):
        stage_rank(run)
    assert len(trained) == 2 * (len(plan) - 1)  # two seeds each
    networks = pd.read_csv(run.paths.rank_dir / "networks.csv")
    assert networks.set_index("id").loc[victim, "status"].startswith("failed: RuntimeError")
    assert (networks["status"] == "trained").sum() == len(plan) - 1
    assert victim in json.loads((run.paths.rank_dir / "metrics.json").read_text())["failed"]

    trained.clear()
    monkeypatch.setattr(dna.train, "train_classifier", lambda *a, name, **k: trained.append(name) or real(
        *a, name=name, **k))
    metrics = stage_rank(run)
    assert trained == [f"rank {victim} seed 0", f"rank {victim} seed 1"]
    written = json.loads((run.paths.rank_dir / "metrics.json").read_text())
    for key in ("kendall_tau", "spearman", "kendall_tau_in_band", "spos_kendall_tau", "searched_accuracy",
                "random_median_accuracy"):
        assert key in written, key
    assert written["failed"] == {} and written["spos"]["epochs"] == 1
    networks = pd.read_csv(run.paths.rank_dir / "networks.csv")
    assert (networks["status"] == "trained").all() and networks["spos_accuracy"].between(0, 1).all()
    ranked = networks[networks["sampled"] | networks["searched"]]
    assert metrics["networks"] == len(ranked)
    expected = stats.kendalltau(-ranked["rating"], ranked["test_accuracy"]).statistic
    assert metrics["kendall_tau"] == pytest.approx(expected)
    assert written["random_median_accuracy"] == pytest.approx(networks[networks["random"]]["test_accuracy"].median())
    assert (run.paths.rank_dir / "rank.png").stat().st_size > 0


def test_every_tau_comes_with_its_interval_and_the_noise_of_both_sides(run):
    """The ground truth's noise over the same networks as kendall_tau, the rating's from blocks distilled again
    from another seed, and a bootstrap interval for every tau."""
    metrics = stage_rank(run)
    written = json.loads((run.paths.rank_dir / "metrics.json").read_text())
    networks = pd.read_csv(run.paths.rank_dir / "networks.csv")
    ranked = networks[networks["sampled"] | networks["searched"]]
    seeds = ranked["test_accuracies"].str.split(";", expand=True).astype(float)
    assert written["seed_kendall_tau"] == pytest.approx(stats.kendalltau(seeds[0], seeds[1]).statistic)
    assert written["rating_seed_kendall_tau"] == pytest.approx(
        stats.kendalltau(ranked["rating"], ranked["rating_replicate_1"]).statistic)
    # the replicate distilled its own supernets from another seed: other weights, other ratings of the same rows
    for block in range(run.space.num_blocks):
        own = pd.read_csv(run.paths.rating(block))
        again = pd.read_csv(run.paths.rank_dir / "replicates" / "1" / "ratings" / f"block_{block}.csv")
        assert own[["cell", "path", "in_width"]].equals(again[["cell", "path", "in_width"]])
        assert not np.allclose(own["score"], again["score"])
        assert str(block) in written["rating_seed_kendall_tau_per_block"]
    for name in ("kendall_tau", "kendall_tau_in_band", "spos_kendall_tau", "seed_kendall_tau",
                 "rating_seed_kendall_tau", "params_kendall_tau", "zscore_kendall_tau"):
        interval = written[f"{name}_ci"]
        assert interval is None or -1 <= interval[0] <= interval[1] <= 1, name
    assert written["kendall_tau_ci"] is not None and written["spos_kendall_tau_ci"] is not None
    # the one-shot baseline is rated by hold-out loss: its tau is against the negated loss
    assert written["spos_kendall_tau"] == pytest.approx(
        stats.kendalltau(-ranked["spos_loss"], ranked["test_accuracy"]).statistic)
    assert written["searched_beats_random_beyond_noise"] == (
        written["searched_minus_random_median"] > written["seed_accuracy_noise"])
    assert metrics == written


def test_a_network_killed_mid_training_resumes_from_its_last_epoch(run):
    params = run.params.model_copy(update={"rank": run.params.rank.model_copy(update={
        "train": run.params.rank.train.model_copy(update={"epochs": 2})})})
    longer = Run(params)
    plan = plan_networks(run)
    arch = arch_of(plan, plan["id"].iloc[0])

    def kill(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_network(longer, "killed", arch, on_epoch=kill)
    folder = run.paths.rank_dir / "networks" / "killed"
    assert (folder / "train_state_0.pt").is_file() and not (folder / "result_0.json").is_file()
    result = train_network(longer, "killed", arch)
    assert result["resumed_from"] == 1
    assert json.loads((folder / "result_0.json").read_text())["epochs"] == 2
