"""The paper's ImageNet preset: its space, and one of its blocks at full width, trained and rated at low resolution."""
import pytest
import torch
import torch.nn.functional as F

from dna.config import load_params
from dna.distill import build_block
from dna.rate import rate_candidate_naive, rate_cell
from dna.space import build_space
from dna.targets import teacher_shapes
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def preset():
    return load_params(ROOT / "configs" / "imagenet.yaml", check_paths=False)


def test_space_size_is_the_papers(preset):
    space = build_space(preset.space, 3, 224, 1000)
    assert [space.block_size(b) for b in range(space.num_blocks)] == [288, 1548, 1548, 2808, 16848, 6]
    assert space.size() == 288 * 1548 * 1548 * 2808 * 16848 * 6


def test_teacher_boundaries_are_b7_stage_ends(preset):
    shapes = teacher_shapes(preset.teacher.model, 3, 224, preset.teacher.boundaries)
    assert [s[0] for s in shapes] == [48, 80, 160, 224, 384, 640]
    assert [s[1] for s in shapes] == [56, 28, 14, 14, 7, 7]


def test_full_width_block_learns_and_its_rating_prefers_the_trained_path(preset):
    """The largest block (160/192 channels, 4-5 layers, 16,848 candidates) at full width on 8x8 maps: training one
    path on a fixed target lowers its loss, and rating then scores that path better than an untrained one, with the
    prefix-reuse walk equal to rating each candidate on its own."""
    torch.manual_seed(0)
    space = build_space(preset.space, 3, 224, 1000)
    shapes = teacher_shapes(preset.teacher.model, 3, 224, preset.teacher.boundaries)
    block = 4
    supernet = build_block(space, block, shapes, 3)
    cell = supernet["d5_w192"]
    assert cell.layers[0][0].conv_pw.in_channels == 224 and cell.adapter[0].out_channels == 384
    x = torch.randn(16, 224, 8, 8)
    y = F.avg_pool2d(x[:, :1].repeat(1, 384, 1, 1), 2) + 0.1 * torch.randn(16, 384, 4, 4)  # learnable from x
    trained, untrained = (0, 1, 2, 3, 4), (5, 5, 5, 5, 5)
    opt = torch.optim.Adam(cell.parameters(), lr=3e-3)
    cell.train()
    losses = []
    for _ in range(30):
        loss = F.mse_loss(cell(x, trained), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    only = [trained, (0, 1, 2, 3, 5), untrained]
    calib = x[:8]
    scores = rate_cell(cell, 5, calib, [(x, y)], len(space.ops), only=only, progress=False)
    assert set(scores) == set(only)
    for ops in only:
        assert scores[ops] == pytest.approx(rate_candidate_naive(cell, ops, calib, [(x, y)]), abs=1e-5)
    assert scores[trained] < scores[untrained]
