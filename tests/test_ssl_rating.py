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


# BYOL's recipe: projector, symmetric loss, augmentations ------------------------------------------------------------
def _roughness(x: torch.Tensor) -> torch.Tensor:
    """Per image: mean |horizontal and vertical neighbour difference| over the image's std (jitter-invariant)."""
    tv = (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)) + (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3))
    return tv / x.std(dim=(1, 2, 3))


def test_byol_augmentations_are_seeded_and_blur_view_one_more_than_view_two():
    from dna.self_supervision import byol_augment

    images = torch.randn(256, 1, 16, 16)
    first = byol_augment(images, 0, torch.Generator().manual_seed(3))
    assert torch.equal(first, byol_augment(images, 0, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, byol_augment(images, 0, torch.Generator().manual_seed(4)))
    second = byol_augment(images, 1, torch.Generator().manual_seed(3))
    rough, one, two = _roughness(images), _roughness(first), _roughness(second)
    # view 1 is always blurred (sigma 0.1..2 px: most images visibly), view 2 one time in ten
    assert (one < 0.9 * rough).float().mean() > 0.6
    assert (two < 0.9 * rough).float().mean() < 0.3
    # solarisation (view 2, one image in five) mirrors the part above the image's mean: its mean drops
    assert first.shape == images.shape and torch.isfinite(second).all()


def test_the_projector_sits_before_the_predictor_and_its_ema_copy_follows_it():
    criterion = _criterion(projector=16, projection=8, predictor=12, momentum=0.9)
    assert criterion.predict(torch.randn(4, 2, 3, 3)).shape == (4, 8)
    online = criterion.projector[0].weight
    with torch.no_grad():
        criterion.target_projector[0].weight.zero_()
        online.fill_(1.0)
    criterion.after_step(1)
    assert torch.allclose(criterion.target_projector[0].weight, torch.full_like(online, 0.1))
    assert not criterion.target_projector[0].weight.requires_grad
    # the target of the EMA cells goes through the EMA projector, to the projection's width
    assert criterion.target_vector(torch.randn(4, 2, 3, 3)).shape == (4, 8)
    assert not hasattr(_criterion(), "projector")


def test_symmetric_training_pairs_each_view_with_the_other_and_rating_stays_one_way(tmp_path):
    from dna.config import parse_params
    from dna.pipeline import Run, stage_data
    from dna.self_supervision import SelfSupervised
    from tests.test_self_supervision import ssl_raw

    run = Run(parse_params(ssl_raw(tmp_path / "outputs", symmetric=True)))
    stage_data(run)
    torch.manual_seed(0)
    x, y = next(SelfSupervised(run).pairs(0, "train", 8))
    assert x.shape[0] == y.shape[0] == 16
    assert torch.equal(x[:8], y[8:]) and torch.equal(x[8:], y[:8]) and not torch.equal(x[:8], x[8:])
    plain = Run(parse_params(ssl_raw(tmp_path / "outputs", symmetric=False)))
    torch.manual_seed(0)
    assert next(SelfSupervised(plain).pairs(0, "train", 8))[0].shape[0] == 8


def test_the_recipe_options_change_the_fingerprint_and_at_their_defaults_leave_it(tmp_path):
    from dna.checkpoint import digest
    from dna.config import parse_params
    from dna.pipeline import Run, stage_data
    from dna.self_supervision import SelfSupervised
    from tests.test_self_supervision import ssl_raw

    def fingerprint(**options) -> str:
        return SelfSupervised(Run(parse_params(ssl_raw(tmp_path / "outputs", **options)))).fingerprint()

    stage_data(Run(parse_params(ssl_raw(tmp_path / "outputs"))))
    plain = SelfSupervised(Run(parse_params(ssl_raw(tmp_path / "outputs"))))
    added = ("projector", "projection", "symmetric", "augment")  # options added since: left out at their defaults
    before = {k: v for k, v in plain.options.model_dump(mode="json").items() if k not in added}
    assert plain.fingerprint() == digest("ssl", before, plain.run.params.space, plain.run.params.rating)
    changed = {fingerprint(projector=64), fingerprint(symmetric=True), fingerprint(augment="byol")}
    assert len(changed) == 3 and plain.fingerprint() not in changed


@pytest.mark.slow
def test_a_block_trains_and_rates_with_the_whole_byol_recipe(tmp_path):
    """Projector, symmetric loss and BYOL's augmentations together: the block trains (its loss falls), its EMA
    projector is checkpointed with it, and every candidate gets its own rating."""
    import pandas as pd

    from dna.checkpoint import load_checkpoint
    from dna.config import parse_params
    from dna.pipeline import Run, stage_data, stage_distill, stage_rate
    from tests.test_self_supervision import ssl_raw

    raw = ssl_raw(tmp_path / "outputs", projector=32, projection=16, symmetric=True, augment="byol",
                  momentum_schedule="cosine", rating_target="all")
    raw["distill"]["epochs"] = 3
    run = Run(parse_params(raw))
    stage_data(run)
    stage_distill(run, 0)
    history = pd.read_csv(run.paths.distill_history(0))
    state = load_checkpoint(run.paths.supernet(0))["states"]["criterion"]
    assert any(k.startswith("target_projector.") for k in state) and any(k.startswith("projector.") for k in state)
    ratings = stage_rate(run, 0)
    assert ratings["score"].nunique() == len(ratings.drop_duplicates(["cell", "path"]))
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
