"""Kendall tau, Spearman, tau within cost bands and top-k precision against scipy on known rankings."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dna.rank_metrics import kendall_tau, spearman, tau_in_bands, top_k_precision


def test_orders_that_agree_disagree_or_swap_one_pair():
    accuracy = np.array([0.5, 0.6, 0.7, 0.8, 0.9])
    assert kendall_tau(accuracy * 10, accuracy) == pytest.approx(1.0)
    assert spearman(-accuracy, accuracy) == pytest.approx(-1.0)
    swapped = np.array([2, 1, 3, 4, 5])  # one discordant pair of ten: tau = (9 - 1) / 10
    assert kendall_tau(swapped, accuracy) == pytest.approx(0.8)
    assert spearman(swapped, accuracy) == pytest.approx(1 - 6 * 2 / (5 * 24))


def test_random_orders_with_ties_match_scipy():
    rng = np.random.default_rng(3)
    for _ in range(5):
        score, accuracy = rng.integers(0, 6, 30).astype(float), rng.normal(size=30)
        assert kendall_tau(score, accuracy) == pytest.approx(stats.kendalltau(score, accuracy).statistic)
        assert spearman(score, accuracy) == pytest.approx(stats.spearmanr(score, accuracy).statistic)


def test_undefined_orders_give_none():
    assert kendall_tau([1.0], [0.5]) is None
    assert kendall_tau([1.0, 1.0, 1.0], [0.1, 0.2, 0.3]) is None
    assert spearman([1.0, 2.0], [0.4, 0.4]) is None


def test_tau_in_bands_sees_what_the_overall_tau_hides():
    # the score prefers the bigger band (as cost would) but orders each band backwards
    score = np.array([1, 2, 3, 11, 12, 13], float)
    accuracy = np.array([0.3, 0.2, 0.1, 0.9, 0.8, 0.7])
    bands = np.array([0, 0, 0, 1, 1, 1])
    assert kendall_tau(score, accuracy) > 0
    mean, per_band = tau_in_bands(score, accuracy, bands)
    assert per_band == {0: pytest.approx(-1.0), 1: pytest.approx(-1.0)}
    assert mean == pytest.approx(-1.0)
    # bands weighted by their pairs: 3 pairs at +1, 1 pair at -1
    mean, _ = tau_in_bands([1, 2, 3, 2, 1], [0.1, 0.2, 0.3, 0.1, 0.2], [0, 0, 0, 1, 1])
    assert mean == pytest.approx((3 - 1) / 4)


def test_top_k_precision():
    accuracy = [0.9, 0.8, 0.7, 0.6, 0.5]
    assert top_k_precision([5, 4, 3, 2, 1], accuracy, 2) == 1.0
    assert top_k_precision([5, 1, 4, 2, 3], accuracy, 2) == 0.5
    assert top_k_precision([1, 2, 3, 4, 5], accuracy, 2) == 0.0
    assert top_k_precision([1, 2], [0.1, 0.2], 3) is None
