"""The single-path one-shot baseline on a tiny space: one supernet whose paths are the space's networks, trained by
uniform path sampling, and networks rated with inherited weights (BatchNorm re-estimated)."""
from __future__ import annotations

import math

import pytest
import torch

from dna.config import parse_params
from dna.pipeline import Run, stage_data
from dna.spos import SposSupernet, inherited_accuracy, train_spos, training_epochs, uniform_choice


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.conftest import tiny_raw

    raw = tiny_raw(tmp_path_factory.mktemp("spos") / "outputs")
    raw["rank"] = {"networks": 4, "cost_bands": 2, "top_k": 2, "spos": {"epochs": 1}}
    run = Run(parse_params(raw))
    stage_data(run)
    return run


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_a_path_is_the_network_the_space_builds_and_paths_share_weights(run):
    supernet = SposSupernet(run.space)
    generator = torch.Generator().manual_seed(0)
    choices = [uniform_choice(run.space, generator) for _ in range(6)]
    for choice in choices:
        network = run.space.build(run.space.arch(choice))
        assert _numel(supernet.path(choice)) == _numel(network), run.space.arch(choice).tag()
        assert supernet(torch.randn(2, 1, 16, 16), choice).shape == (2, run.num_classes)
    first, second = choices[0], [(choices[0][0][0], choices[0][0][1])] + list(choices[1][1:])
    shared = {id(p) for p in supernet.path(first)[1].parameters()} & {id(p) for p in supernet.path(second).parameters()}
    assert shared, "two networks with the same first layer inherit the same weights for it"
    assert _numel(supernet) < sum(_numel(supernet.path(c)) for c in choices)


def test_the_compute_rule_and_training_change_only_sampled_weights(run):
    p = run.params
    cells = sum(len(run.space.cells(b)) for b in range(run.space.num_blocks))
    assert training_epochs(p.model_copy(update={"rank": p.rank.model_copy(
        update={"spos": p.rank.spos.model_copy(update={"epochs": None})})}), run.space) == \
        math.ceil(p.distill.epochs * cells / run.space.num_blocks)
    assert training_epochs(p, run.space) == 1
    torch.manual_seed(p.seed * 7919 + 17)
    untrained = {k: v.clone() for k, v in SposSupernet(run.space).state_dict().items()}
    supernet, result = train_spos(run.space, run.data, p, run.paths.root / "spos.pt", fingerprint="f",
                                  device=torch.device("cpu"))
    assert result.epochs == 1 and result.steps == math.ceil(len(run.data.train) / p.distill.batch_size)
    assert result.history[0]["loss"] > 0
    changed = {k for k, v in supernet.state_dict().items() if not torch.equal(v, untrained[k])}
    assert any(k.startswith("layers.") for k in changed) and any(k.startswith("heads.") for k in changed)
    again, resumed = train_spos(run.space, run.data, p, run.paths.root / "spos.pt", fingerprint="f",
                                device=torch.device("cpu"))
    assert resumed.resumed_from == 1  # the finished run is loaded, not retrained
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in supernet.state_dict().items())

    choice = uniform_choice(run.space, torch.Generator().manual_seed(1))
    calibration = run.data.images("train", count=64)
    loader = run.data.loader("rate", 128)
    path_norms = [m for m in supernet.path(choice).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in path_norms]
    score = inherited_accuracy(supernet, choice, calibration, loader, torch.device("cpu"))
    assert 0.0 <= score <= 1.0
    assert any(not torch.equal(b, m.running_mean) for b, m in zip(before, path_norms)), "BatchNorm re-estimated"
    assert inherited_accuracy(supernet, choice, calibration, loader, torch.device("cpu")) == score
