"""DNA++'s rating target and EMA schedule options: every path in the target, BYOL's cosine momentum."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dna.self_supervision import BootstrapCriterion, SslOptions


def _criterion(**options):
    cells = nn.ModuleDict({"c": nn.Linear(2, 2)})
    return BootstrapCriterion(cells, 2, SslOptions(**options), total_updates=100)


def _cell(depth: int, ops: int):
    return SimpleNamespace(layers=[[None]] + [[None] * ops] * depth, num_fixed=1)


def test_the_cosine_schedule_moves_the_momentum_from_its_start_to_one():
    constant, cosine = _criterion(momentum=0.99), _criterion(momentum=0.99, momentum_schedule="cosine")
    assert [constant.momentum_at(u) for u in (0, 50, 100)] == [0.99, 0.99, 0.99]
    assert cosine.momentum_at(0) == pytest.approx(0.99)
    assert cosine.momentum_at(50) == pytest.approx(0.995)
    assert cosine.momentum_at(25) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine.momentum_at(100) == pytest.approx(1.0) and cosine.momentum_at(150) == pytest.approx(1.0)


def test_the_ema_copy_follows_the_scheduled_momentum():
    criterion = _criterion(momentum=0.9, momentum_schedule="cosine")
    online = criterion._online[0]
    with torch.no_grad():
        criterion.target["c"].weight.zero_()
        online["c"].weight.fill_(1.0)
    criterion.after_step(50)  # momentum 0.95: the copy moves 5% of the way
    assert torch.allclose(criterion.target["c"].weight, torch.full((2, 2), 0.05))


def test_the_full_rating_target_takes_every_path_of_a_cell_and_sampled_takes_ensemble():
    generator = torch.Generator().manual_seed(0)
    full = _criterion(rating_target="all").target_paths(_cell(2, 3), generator)
    assert sorted(full) == [(a, b) for a in range(3) for b in range(3)]
    sampled = _criterion(ensemble=4).target_paths(_cell(2, 3), generator)
    assert len(sampled) == 4 and all(len(p) == 2 for p in sampled)
    # in training (no rating generator) a full-target criterion still samples `ensemble` paths
    assert len(_criterion(rating_target="all", ensemble=2).target_paths(_cell(2, 3), None)) == 2
