"""What a ranking figure is reported with: bootstrap intervals, the combination of block ratings (z-scores, DONNA's
leave-one-out predictor), a choice that respects the rating's noise, and fair path sampling."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dna.block_combination import fit_predictor, loo_predictions, zscore_rating
from dna.distill import FairPaths
from dna.rank_metrics import bootstrap_interval, kendall_tau, tau_interval
from dna.search import best_under, near_best
from dna.spaces.base import Cell


def test_the_interval_is_narrow_for_many_networks_wide_for_few_and_covers_the_true_tau():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=2000)
    noisy = latent + rng.normal(size=2000)  # bivariate normal, correlation 1/sqrt(2): tau = 2/pi asin(rho) = 0.5
    true = 2 / np.pi * np.arcsin(1 / np.sqrt(2))
    wide = tau_interval(latent[:12], noisy[:12], seed=1)
    narrow = tau_interval(latent[:400], noisy[:400], seed=1, resamples=300)
    assert narrow[0] < true < narrow[1]
    assert narrow[1] - narrow[0] < 0.15 < wide[1] - wide[0]
    assert tau_interval([1, 2, 3, 4, 5], [0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx([1.0, 1.0])


def test_a_stratified_bootstrap_keeps_every_group_at_its_size():
    groups = np.array([0, 0, 0, 1, 1, 2])
    sizes = bootstrap_interval(lambda x, g: float(np.sum(g == 0)) + 10 * float(np.sum(g == 2)),
                               np.arange(6), groups=groups, resamples=200)
    assert sizes == [13.0, 13.0]
    unstratified = bootstrap_interval(lambda x: float(np.sum(x < 3)), np.arange(6), resamples=200)
    assert unstratified[0] < 3 < unstratified[1]


def test_an_undefined_statistic_gives_no_interval():
    assert tau_interval([1.0, 1.0, 1.0], [0.1, 0.2, 0.3]) is None
    assert tau_interval([1.0], [0.1]) is None


def _frame(blocks):
    return pd.DataFrame({f"rating_block_{b}": v for b, v in enumerate(blocks)})


def test_z_scores_weigh_a_block_by_its_spread_not_its_scale():
    # block 0's candidates spread 100 times wider than block 1's; after z-scoring, one standard deviation of
    # either moves the rating alike, where the plain sum follows block 0 alone
    ratings = [pd.DataFrame({"cell": "c", "path": list("abcd"), "score": [0.0, 100.0, 200.0, 300.0]}),
               pd.DataFrame({"cell": "c", "path": list("abcd"), "score": [0.0, 1.0, 2.0, 3.0]})]
    networks = _frame([[0.0, 300.0], [3.0, 0.0]])  # block 0 best and block 1 worst, and the other way round
    z = zscore_rating(networks, ratings)
    assert z[0] == pytest.approx(z[1])
    assert networks.sum(axis=1).iloc[0] < networks.sum(axis=1).iloc[1]


def test_the_predictor_is_judged_on_networks_it_was_not_fitted_on():
    rng = np.random.default_rng(0)
    blocks = rng.normal(size=(30, 3))
    signal = 0.9 - 0.05 * blocks[:, 1]  # only block 1's rating says anything of accuracy
    predicted = loo_predictions(blocks, signal + rng.normal(scale=0.005, size=30))
    assert kendall_tau(predicted, signal) > 0.8
    fitted = fit_predictor(blocks, signal, ["rating_block_0", "rating_block_1", "rating_block_2"])
    assert fitted["weights"]["rating_block_1"] == pytest.approx(-0.05)
    assert abs(fitted["weights"]["rating_block_0"]) < 1e-9
    # noise alone: fitted in-sample it orders the networks it saw, left out it does not
    noise = rng.normal(size=30)
    loo = kendall_tau(loo_predictions(blocks, noise), noise)
    assert loo < 0.3
    assert loo_predictions(blocks[:5], noise[:5]) is None  # too few networks for 3 weights and an intercept


def _stage(rows, out_width=None):
    frame = pd.DataFrame(rows, columns=["score", "macs"])
    return frame.assign(in_width=1, out_width=1 if out_width is None else out_width)


def test_the_cheapest_network_within_the_tolerance_is_chosen_and_the_best_without_it():
    stages = [_stage([(0.0, 10)]), _stage([(1.00, 300), (1.01, 100), (1.30, 50)]), _stage([(0.0, 10)])]
    assert best_under(stages, {"macs": 1000}).costs["macs"] == 320
    near = near_best(stages, {"macs": 1000}, "macs", 0.05)
    assert [s.costs["macs"] for s in near] == [120, 320]
    assert near_best(stages, {"macs": 1000}, "macs", 0.0)[0].costs["macs"] == 320
    assert [s.costs["macs"] for s in near_best(stages, {"macs": 200}, "macs", 0.5)] == [70, 120]


def test_fair_sampling_trains_every_op_of_every_layer_once_per_run_of_steps():
    cell, generator, fair = Cell(0, 3, 8), torch.Generator().manual_seed(0), FairPaths()
    paths = [fair(generator, cell, 6) for _ in range(12)]
    for run in (paths[:6], paths[6:]):
        for layer in range(3):
            assert sorted(p[layer] for p in run) == list(range(6))
    assert paths[:6] != paths[6:]
    fair.reset()
    again = FairPaths()
    assert [again(torch.Generator().manual_seed(0), cell, 6) for _ in range(1)] == [paths[0]]
