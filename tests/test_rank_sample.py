"""The ranking stage's sampler: stratified over cost bands and rating, and the budget of the random networks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dna.rank_sample import band_edges, band_of, stratified, under_budget


@pytest.fixture
def pool():
    rng = np.random.default_rng(0)
    macs = rng.uniform(1e6, 5e6, 600)
    rating = -macs / 1e6 + rng.normal(0, 1, 600)  # bigger networks rate better, as in a real space
    return pd.DataFrame({"rows": [f"0-{i}-0" for i in range(600)], "rating": rating, "macs": macs,
                         "params": macs / 10})


def test_every_cost_band_gives_its_share_spread_over_its_ratings(pool):
    edges = band_edges(pool["macs"], 3)
    chosen = stratified(pool, 10, edges, "macs")
    assert len(chosen) == 10 and chosen["rows"].is_unique
    assert chosen["band"].value_counts().sort_index().tolist() == [4, 3, 3]
    assert (band_of(chosen["macs"], edges) == chosen["band"]).all()
    for band, group in chosen.groupby("band"):
        members = pool[band_of(pool["macs"], edges) == band]["rating"]
        low, high = members.quantile([0.25, 0.75])
        assert group["rating"].min() <= low and group["rating"].max() >= high, band  # spans its band's ratings
        assert group["macs"].between(edges[band], edges[band + 1]).all()


def test_bands_are_cost_quantiles_and_costs_beyond_the_pool_fall_in_the_end_bands(pool):
    edges = band_edges(pool["macs"], 4)
    counts = np.bincount(band_of(pool["macs"], edges), minlength=4)
    assert counts.min() >= 149 and counts.max() <= 151
    assert band_of([0.0, 1e9], edges).tolist() == [0, 3]


def test_a_band_too_small_for_its_share_is_an_error(pool):
    with pytest.raises(ValueError, match="rank.pool"):
        stratified(pool.head(6), 9, band_edges(pool.head(6)["macs"], 3), "macs")


def test_random_networks_meet_every_budget(pool):
    fits = under_budget(pool, {"macs": 2e6, "params": 1.5e5})
    assert len(fits) and (fits["macs"] <= 2e6).all() and (fits["params"] <= 1.5e5).all()
    assert len(fits) == int(((pool["macs"] <= 2e6) & (pool["params"] <= 1.5e5)).sum())
