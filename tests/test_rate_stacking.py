"""Rating with stacked batches, several chunks and each kind of adapter equals rating each candidate on its own."""
import itertools

import pytest
import torch
from torch import nn

from dna.config import parse_params
from dna.rate import rate_candidate_naive, rate_cell
from dna.spaces import build_space
from dna.spaces.base import Cell
from dna.targets import RelativeL1Score
from tests.conftest import tiny_raw


def _space(tmp_path):
    params = parse_params(tiny_raw(tmp_path / "outputs"))
    return build_space(params.space, 1, 16, 10)


def _batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _naive(net, ops, calib, batches):
    return rate_candidate_naive(net, ops, calib, batches, scorer=RelativeL1Score())


@pytest.mark.parametrize("adapter", ["conv_bn", "identity", "other"])
@pytest.mark.parametrize("stack_bytes", [1, 2**26])
def test_stacked_rating_equals_naive(tmp_path, adapter, stack_bytes):
    torch.manual_seed(0)
    space = _space(tmp_path)
    target = {"conv_bn": 20, "identity": 24, "other": 24}[adapter]
    net = space.build_cell(Cell(1, 2, 24), 16, target)
    if adapter == "identity":
        net.adapter = nn.Identity()
    if adapter == "other":
        net.adapter = nn.Sequential(nn.Conv2d(24, 20, 1), nn.BatchNorm2d(20), nn.ReLU())
        target = 20
    for p in net.parameters():  # away from initial values, so BatchNorm affine terms matter
        p.data.add_(torch.randn_like(p) * 0.1)
    calib = torch.randn(24, 16, 4, 4) * 2 + 0.5
    x, y = torch.randn(70, 16, 4, 4) * 2 + 0.5, torch.randn(70, target, 2, 2)
    fast = rate_cell(net, 2, calib, _batches(x, y, 16), len(space.ops),
                     scorer=RelativeL1Score(), progress=False, stack_bytes=stack_bytes)
    assert set(fast) == set(itertools.product(range(len(space.ops)), repeat=2))
    for ops, score in fast.items():
        assert score == pytest.approx(_naive(net, ops, calib, _batches(x, y, 16)), abs=1e-5)


def test_stacked_rating_of_the_first_block_with_its_stem(tmp_path):
    torch.manual_seed(1)
    space = _space(tmp_path)
    net = space.build_cell(Cell(0, 2, 16), 1, 12)
    calib, x, y = torch.randn(20, 1, 16, 16), torch.randn(40, 1, 16, 16), torch.randn(40, 12, 4, 4)
    only = [(0, 1), (1, 1)]
    fast = rate_cell(net, 2, calib, _batches(x, y, 15), len(space.ops), only=only,
                     scorer=RelativeL1Score(), progress=False, stack_bytes=1)
    assert set(fast) == set(only)
    for ops in only:
        assert fast[ops] == pytest.approx(_naive(net, ops, calib, _batches(x, y, 15)), abs=1e-5)
