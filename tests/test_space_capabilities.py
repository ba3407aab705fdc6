"""A space kind offers small capabilities (dna.spaces.base: cells, pieces, networks, supernets), not one wide
protocol: a minimal kind with cells, pieces and networks but no block supernets is costed, searched and built, and a
stage that needs supernets refuses it before any work, naming what it lacks."""
from __future__ import annotations

import numpy as np
import pytest

from dna.arch import count_cost
from dna.config import SpaceConfig, parse_params
from dna.cost_tables import stage_tables
from dna.errors import ConfigError
from dna.run import Run
from dna.search import best_under
from dna.spaces import SPACES, build_space
from dna.spaces.base import SpaceBase, offers, require
from dna.stages.search import choice_of
from tests.conftest import tiny_raw
from tests.tiny_space import EXAMPLE, TinySpace


class PlainSpace(SpaceBase):
    """Conv-BatchNorm-ReLU layers (the tiny space's), offered without block supernets: what each capability asks of
    a kind is the tiny space's own functions, taken one capability at a time."""

    Options = TinySpace.Options
    __init__ = TinySpace.__init__
    # cells
    cells, candidates, in_widths, block_resolutions = (TinySpace.cells, TinySpace.candidates, TinySpace.in_widths,
                                                       TinySpace.block_resolutions)
    # pieces
    stem_piece, layer_pieces, head_piece, piece_module = (TinySpace.stem_piece, TinySpace.layer_pieces,
                                                          TinySpace.head_piece, TinySpace.piece_module)
    _stride, _stem, _layer, _head = TinySpace._stride, TinySpace._stem, TinySpace._layer, TinySpace._head
    # networks
    arch, parse, membership, build = TinySpace.arch, TinySpace.parse, TinySpace.membership, TinySpace.build


@pytest.fixture
def plain():
    with SPACES.scoped():
        SPACES.register("plain", PlainSpace)
        yield build_space(SpaceConfig.model_validate({**EXAMPLE, "kind": "plain"}), 3, 32, 5)


def test_a_kind_without_supernets_is_costed_searched_and_built(plain):
    assert offers(plain) == ["cells", "pieces", "networks"]
    assert offers(build_space(SpaceConfig.model_validate(EXAMPLE), 3, 32, 5)) == [
        "cells", "pieces", "networks", "supernets"]  # the tiny space offers everything
    rng = np.random.default_rng(0)
    stages = [t.with_scores(rng.normal(size=len(t))) for t in stage_tables(plain, scored=False)]
    costs = [s.costs() for s in stages]
    budget = (sum(float(c["macs"].min()) for c in costs) + sum(float(c["macs"].max()) for c in costs)) / 2
    best = best_under(costs, {"macs": budget})
    assert best.costs["macs"] <= budget
    arch = choice_of(plain, stages, best.rows)
    params, macs, _ = count_cost(plain.build(arch), (1, 3, 32, 32))
    assert (params, macs) == (best.costs["params"], best.costs["macs"])  # the tables add up to the built network
    assert plain.outside(arch) == [] and plain.parse(arch)


def test_a_stage_that_needs_supernets_refuses_the_kind_naming_what_it_lacks(plain, tmp_path):
    require(plain, "networks", "the search")  # offered: nothing raised
    with pytest.raises(ConfigError, match=r"space.kind='plain' has no supernets \((build_cell, extract|extract, "
                                          r"build_cell)\), which distillation needs; it offers cells, pieces, "
                                          r"networks"):
        require(plain, "supernets", "distillation")
    raw = tiny_raw(tmp_path / "outputs")
    raw["space"] = {**EXAMPLE, "kind": "plain"}
    raw["data"]["num_classes"] = 10
    from dna.stages.distill import stage_features

    with pytest.raises(ConfigError, match="which distillation needs"):
        stage_features(Run(parse_params(raw, check_paths=False, deep=False)))
    assert not (tmp_path / "outputs" / "distill").exists()  # refused before any work
