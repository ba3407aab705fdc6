"""The single-path one-shot baseline on a tiny space: one supernet whose paths are the space's networks, trained by
uniform path sampling, and networks rated with inherited weights (BatchNorm re-estimated)."""
from __future__ import annotations

import math

import pytest
import torch

from dna.config import parse_params
from dna.pipeline import Run, stage_data
from dna.spos import SposSupernet, inherited_scores, train_spos, training_epochs, uniform_choice


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


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every weight and BatchNorm statistic drawn at random, so that no layer computes what another does by chance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in module.state_dict().items():
            if name.endswith("running_var"):
                value.uniform_(0.5, 1.5, generator=generator)
            elif value.is_floating_point():
                value.normal_(0.0, 0.2, generator=generator)


def test_a_path_is_the_network_the_space_builds_and_paths_share_weights(run):
    """A path's weights, loaded in order into the network the space builds for the same architecture, give that
    network the path's logits (eval mode)."""
    supernet = SposSupernet(run.space)
    _randomise(supernet, 0)
    supernet.eval()
    generator = torch.Generator().manual_seed(0)
    choices = [uniform_choice(run.space, generator) for _ in range(6)]
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    for choice in choices:
        network = run.space.build(run.space.arch(choice)).eval()
        theirs, ours = network.state_dict(), supernet.path(choice).state_dict()
        assert [v.shape for v in theirs.values()] == [v.shape for v in ours.values()], run.space.arch(choice).tag()
        network.load_state_dict(dict(zip(theirs, ours.values())))
        with torch.no_grad():
            logits = supernet(x, choice)
            assert logits.shape == (4, run.num_classes)
            assert torch.allclose(logits, network(x), rtol=1e-4, atol=1e-5), run.space.arch(choice).tag()
    first, second = choices[0], [(choices[0][0][0], choices[0][0][1])] + list(choices[1][1:])
    shared = {id(p) for p in supernet.path(first)[1].parameters()} & {id(p) for p in supernet.path(second).parameters()}
    assert shared, "two networks with the same first layer inherit the same weights for it"
    assert _numel(supernet) < sum(_numel(supernet.path(c)) for c in choices)


def test_a_training_step_changes_the_sampled_path_and_nothing_else(run, monkeypatch):
    """One optimizer step (a batch as large as the training split): every weight and BatchNorm statistic of the
    sampled network changes, every other one of the supernet stays bit for bit."""
    import dna.spos

    sampled = []

    def recorded(space, generator):
        sampled.append(uniform_choice(space, generator))
        return sampled[-1]

    monkeypatch.setattr(dna.spos, "uniform_choice", recorded)
    p = run.params
    p = p.model_copy(update={"distill": p.distill.model_copy(update={"batch_size": len(run.data.train)})})
    torch.manual_seed(p.seed * 7919 + 17)  # as train_spos builds its supernet
    untrained = {k: v.clone() for k, v in SposSupernet(run.space).state_dict().items()}
    supernet, result = train_spos(run.space, run.data, p, run.paths.root / "one_step.pt", fingerprint="one step",
                                  device=torch.device("cpu"))
    assert result.steps == 1 and len(sampled) == 1
    on_path = {id(v) for v in supernet.path(sampled[0]).state_dict(keep_vars=True).values()}
    changed, kept = set(), set()
    for name, value in supernet.state_dict(keep_vars=True).items():
        (kept if torch.equal(value, untrained[name]) else changed).add(name)
        assert (name in changed) == (id(value) in on_path), name
    assert any(k.startswith("layers.") for k in kept) and any(k.startswith("heads.") for k in kept)


def test_the_compute_rule_resuming_and_inherited_scores(run):
    p = run.params
    cells = sum(len(run.space.cells(b)) for b in range(run.space.num_blocks))
    assert training_epochs(p.model_copy(update={"rank": p.rank.model_copy(
        update={"spos": p.rank.spos.model_copy(update={"epochs": None})})}), run.space) == \
        math.ceil(p.distill.epochs * cells / run.space.num_blocks)
    assert training_epochs(p, run.space) == 1
    supernet, result = train_spos(run.space, run.data, p, run.paths.root / "spos.pt", fingerprint="f",
                                  device=torch.device("cpu"))
    assert result.epochs == 1 and result.steps == math.ceil(len(run.data.train) / p.distill.batch_size)
    assert result.history[0]["loss"] > 0
    again, resumed = train_spos(run.space, run.data, p, run.paths.root / "spos.pt", fingerprint="f",
                                device=torch.device("cpu"))
    assert resumed.resumed_from == 1  # the finished run is loaded, not retrained
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in supernet.state_dict().items())

    choice = uniform_choice(run.space, torch.Generator().manual_seed(1))
    calibration = run.data.images("train", count=64)
    loader = run.data.loader("rate", 128)
    path_norms = [m for m in supernet.path(choice).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in path_norms]
    loss, accuracy = inherited_scores(supernet, choice, calibration, loader, torch.device("cpu"))
    assert any(not torch.equal(b, m.running_mean) for b, m in zip(before, path_norms)), "BatchNorm re-estimated"
    # the rating is the calibrated path's mean cross-entropy on the rating split (and its accuracy beside it)
    images, labels = zip(*loader)
    with torch.no_grad():
        logits, labels = supernet.path(choice).eval()(torch.cat(images)), torch.cat(labels)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert accuracy == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert inherited_scores(supernet, choice, calibration, loader, torch.device("cpu")) == (loss, accuracy)
