"""How well one ranking of networks agrees with another: Kendall tau and Spearman (scipy.stats), tau within cost
bands, precision of the top-k, and bootstrap intervals of any of them over the networks.

Ratings are lower-is-better and accuracies higher-is-better; every function here takes a `score` where higher is
better (the negated rating, or a hold-out accuracy), so +1 means the two orders agree.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def kendall_tau(score, accuracy) -> float | None:
    """Kendall's tau-b between the two orders; None when it is undefined (fewer than 2 networks, or a constant)."""
    score, accuracy = np.asarray(score, float), np.asarray(accuracy, float)
    if len(score) < 2 or np.ptp(score) == 0 or np.ptp(accuracy) == 0:
        return None
    return _finite(stats.kendalltau(score, accuracy).statistic)


def spearman(score, accuracy) -> float | None:
    score, accuracy = np.asarray(score, float), np.asarray(accuracy, float)
    if len(score) < 2 or np.ptp(score) == 0 or np.ptp(accuracy) == 0:
        return None
    return _finite(stats.spearmanr(score, accuracy).statistic)


def tau_in_bands(score, accuracy, bands) -> tuple[float | None, dict[int, float | None]]:
    """Kendall tau within each band (networks of similar cost), and their mean weighted by each band's number of
    pairs (bands where tau is undefined left out): how well the rating orders networks of one cost, where
    preferring bigger networks does not help."""
    score, accuracy, bands = np.asarray(score, float), np.asarray(accuracy, float), np.asarray(bands)
    per_band, total, weight = {}, 0.0, 0
    for band in sorted(set(bands.tolist())):
        members = bands == band
        tau = kendall_tau(score[members], accuracy[members])
        per_band[int(band)] = tau
        if tau is not None:
            pairs = int(members.sum()) * (int(members.sum()) - 1) // 2
            total, weight = total + tau * pairs, weight + pairs
    return (total / weight if weight else None), per_band


def top_k_precision(score, accuracy, k: int) -> float | None:
    """The share of the k best by score that are among the k most accurate (ties broken by position)."""
    score, accuracy = np.asarray(score, float), np.asarray(accuracy, float)
    if not 0 < k <= len(score):
        return None
    best_score = set(np.argsort(-score, kind="stable")[:k].tolist())
    best_accuracy = set(np.argsort(-accuracy, kind="stable")[:k].tolist())
    return len(best_score & best_accuracy) / k


def bootstrap_interval(statistic, *columns, groups=None, resamples: int = 1000, level: float = 0.9,
                       seed: int = 0) -> list[float] | None:
    """The percentile bootstrap interval (`level`, e.g. 0.9 for 5%-95%) of `statistic(*columns)` over networks drawn
    with replacement (within each of `groups`, when given: a stratified bootstrap, as bands are). Resamples where
    the statistic is undefined (None) are left out; None when fewer than half of them are defined."""
    columns = [np.asarray(c, float) for c in columns]
    n = len(columns[0])
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(np.asarray(groups) == g) for g in dict.fromkeys(np.asarray(groups).tolist())] \
        if groups is not None else [np.arange(n)]
    values = []
    for _ in range(resamples):
        take = np.concatenate([rng.choice(m, len(m)) for m in members])
        arguments = [c[take] for c in columns] + ([np.asarray(groups)[take]] if groups is not None else [])
        value = statistic(*arguments)
        if value is not None:
            values.append(value)
    if len(values) < resamples / 2:
        return None
    tail = (1 - level) / 2 * 100
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


def tau_interval(score, accuracy, bands=None, **kwargs) -> list[float] | None:
    """The bootstrap interval of Kendall tau (of the in-band tau when `bands` are given, resampled within bands)."""
    if bands is None:
        return bootstrap_interval(kendall_tau, score, accuracy, **kwargs)
    return bootstrap_interval(lambda s, a, b: tau_in_bands(s, a, b)[0], score, accuracy, groups=bands, **kwargs)


def shown(metrics: dict, name: str) -> str:
    """A metric as a report shows it: its value and its interval (`<name>_ci`), or `undefined`."""
    value, ci = metrics.get(name), metrics.get(f"{name}_ci")
    if value is None:
        return "undefined"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
