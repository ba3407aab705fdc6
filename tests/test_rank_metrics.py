"""Kendall tau-b, Spearman, tau within cost bands and top-k precision against values worked out by hand on small
rankings: orders that agree, disagree or swap a pair, ties (tau-b and average ranks), and the undefined cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dna.rank_metrics import kendall_tau, spearman, tau_in_bands, top_k_precision


def test_orders_that_agree_disagree_or_swap_one_pair():
    accuracy = np.array([0.5, 0.6, 0.7, 0.8, 0.9])
    assert kendall_tau(accuracy * 10, accuracy) == pytest.approx(1.0)
    assert spearman(-accuracy, accuracy) == pytest.approx(-1.0)
    swapped = np.array([2, 1, 3, 4, 5])  # one discordant pair of ten: tau = (9 - 1) / 10
    assert kendall_tau(swapped, accuracy) == pytest.approx(0.8)
    assert spearman(swapped, accuracy) == pytest.approx(1 - 6 * 2 / (5 * 24))


def test_a_pair_out_of_three_the_wrong_way_round():
    # pairs (0, 1) and (0, 2) discordant, (1, 2) concordant: tau = (1 - 2) / 3; rank differences 2, -1, -1
    score, accuracy = [3.0, 1.0, 2.0], [0.1, 0.2, 0.3]
    assert kendall_tau(score, accuracy) == pytest.approx(-1 / 3)
    assert spearman(score, accuracy) == pytest.approx(1 - 6 * (4 + 1 + 1) / (3 * 8))


def test_ties_in_one_order_count_as_tau_b_and_average_ranks():
    # 6 pairs: 5 concordant, 1 tied in the score only: tau-b = 5 / sqrt((6 - 1) * (6 - 0))
    score, accuracy = [1.0, 1.0, 2.0, 3.0], [0.1, 0.2, 0.3, 0.4]
    assert kendall_tau(score, accuracy) == pytest.approx(5 / math.sqrt(30))
    # ranks 1.5, 1.5, 3, 4 against 1, 2, 3, 4: Pearson's r of the ranks, 4.5 / sqrt(4.5 * 5)
    assert spearman(score, accuracy) == pytest.approx(math.sqrt(0.9))


def test_ties_in_both_orders():
    # 3 concordant pairs, 2 tied in the score only, 1 tied in the accuracy only: 3 / sqrt((6 - 2) * (6 - 1)); tau-a
    # would give 3 / 6 and tau-c 0.75
    score, accuracy = [1.0, 1.0, 2.0, 2.0], [0.1, 0.2, 0.2, 0.3]
    assert kendall_tau(score, accuracy) == pytest.approx(3 / math.sqrt(20))
    # ranks 1.5, 1.5, 3.5, 3.5 against 1, 2.5, 2.5, 4: 3 / sqrt(4 * 4.5)
    assert spearman(score, accuracy) == pytest.approx(1 / math.sqrt(2))


@pytest.mark.parametrize("score, accuracy", [
    ([1.0], [0.5]),                        # one network: no pair
    ([], []),
    ([1.0, 1.0, 1.0], [0.1, 0.2, 0.3]),   # a constant score orders nothing
    ([1.0, 2.0, 3.0], [0.4, 0.4, 0.4]),   # nor does a constant accuracy
    ([1.0, 2.0, math.nan], [0.1, 0.2, 0.3]),
])
def test_undefined_orders_give_none(score, accuracy):
    assert kendall_tau(score, accuracy) is None
    assert spearman(score, accuracy) is None


def test_tau_in_bands_sees_what_the_overall_tau_hides():
    # the score prefers the bigger band (as cost would) but orders each band backwards
    score = np.array([1, 2, 3, 11, 12, 13], float)
    accuracy = np.array([0.3, 0.2, 0.1, 0.9, 0.8, 0.7])
    bands = np.array([0, 0, 0, 1, 1, 1])
    assert kendall_tau(score, accuracy) == pytest.approx(3 / 15)  # 9 concordant pairs across bands, 6 discordant
    mean, per_band = tau_in_bands(score, accuracy, bands)
    assert per_band == {0: pytest.approx(-1.0), 1: pytest.approx(-1.0)}
    assert mean == pytest.approx(-1.0)
    # bands weighted by their pairs: 3 pairs at +1, 1 pair at -1
    mean, _ = tau_in_bands([1, 2, 3, 2, 1], [0.1, 0.2, 0.3, 0.1, 0.2], [0, 0, 0, 1, 1])
    assert mean == pytest.approx((3 - 1) / 4)


def test_bands_where_tau_is_undefined_are_left_out_of_the_mean():
    # band 1 holds one network, band 2 a constant accuracy: only band 0 (tau 1/3 on 3 pairs) counts
    score = [1, 2, 3, 5, 7, 8]
    accuracy = [0.2, 0.1, 0.3, 0.5, 0.6, 0.6]
    mean, per_band = tau_in_bands(score, accuracy, [0, 0, 0, 1, 2, 2])
    assert per_band == {0: pytest.approx(1 / 3), 1: None, 2: None}
    assert mean == pytest.approx(1 / 3)
    assert tau_in_bands([1, 2], [0.3, 0.4], [0, 1]) == (None, {0: None, 1: None})


def test_top_k_precision():
    accuracy = [0.9, 0.8, 0.7, 0.6, 0.5]
    assert top_k_precision([5, 4, 3, 2, 1], accuracy, 2) == 1.0
    assert top_k_precision([5, 1, 4, 2, 3], accuracy, 2) == 0.5
    assert top_k_precision([1, 2, 3, 4, 5], accuracy, 2) == 0.0
    assert top_k_precision([1, 5, 2, 4, 3], accuracy, 5) == 1.0  # all of them: whatever the order
    assert top_k_precision([1, 2], [0.1, 0.2], 3) is None
    assert top_k_precision([1, 2], [0.1, 0.2], 0) is None


def test_top_k_ties_are_broken_by_position():
    # three networks share the best score: the first two of them are the top 2; networks 1 and 2 are the most accurate
    assert top_k_precision([1.0, 1.0, 1.0, 0.0], [0.1, 0.9, 0.8, 0.0], 2) == 0.5
    # and ties in accuracy likewise: networks 0 and 1 are the top 2 by accuracy
    assert top_k_precision([0.0, 0.5, 1.0], [0.7, 0.7, 0.7], 2) == 0.5
