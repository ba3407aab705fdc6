import itertools
import shutil

import pytest
import torch
from torch import nn

from dna.distill import load_block
from dna.rate import calibrate, rate_block, rate_candidate_naive, rate_cell
from dna.spaces.base import Cell
from dna.targets import RelativeL1Score


def _batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _naive(net, ops, calib, batches):
    return rate_candidate_naive(net, ops, calib, batches, scorer=RelativeL1Score())


def test_calibrate_sets_statistics_of_the_batch():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    layer[1].running_mean.fill_(7.0)
    x = torch.randn(32, 3, 5, 5) * 3 + 1
    calibrate(layer, x)
    pre = layer[0](x)
    assert torch.allclose(layer[1].running_mean, pre.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(layer[1].running_var, pre.var(dim=(0, 2, 3), unbiased=True), atol=1e-4)
    assert not layer.training


@pytest.mark.parametrize("block", [0, 1])
def test_prefix_reuse_equals_naive_rating(prepared_run, block):
    run = prepared_run
    targets = run.supervision.for_rating()
    supernet = load_block(run.space, block, targets.shapes(), run.data.in_chans, run.paths.supernet(block))
    calib, _ = targets.sample(block, "train", 64, 0)
    x, y = targets.sample(block, "rate", 1000, 0)
    for cell in run.space.cells(block):
        net = supernet[cell.name]
        fast = rate_cell(net, cell.depth, calib, _batches(x, y, 50), len(run.space.ops),
                         scorer=RelativeL1Score(), progress=False)
        expected = set(itertools.product(range(len(run.space.ops)), repeat=cell.depth))
        assert set(fast) == expected
        for ops in expected:
            naive = _naive(net, ops, calib, _batches(x, y, 50))
            assert fast[ops] == pytest.approx(naive, abs=1e-5)
    assert len({round(s, 6) for s in fast.values()}) > 1, "candidates should not all score the same"


def test_prefix_reuse_on_a_deeper_untrained_cell(prepared_run):
    """Depth 3 at random weights: prefixes shared by many candidates, several rating batches."""
    run = prepared_run
    torch.manual_seed(1)
    cell = Cell(1, 3, 24)
    shapes = run.supervision.for_rating().shapes()
    net = run.space.build_cell(cell, shapes[0][0], shapes[1][0])
    calib = torch.randn(40, shapes[0][0], 4, 4)
    x, y = torch.randn(90, shapes[0][0], 4, 4), torch.randn(90, shapes[1][0], 2, 2)
    only = [(0, 1, 1), (1, 1, 0), (0, 1, 0)]
    fast = rate_cell(net, 3, calib, _batches(x, y, 32), len(run.space.ops), only=only,
                     scorer=RelativeL1Score(), progress=False)
    assert set(fast) == set(only)
    for ops in only:
        assert fast[ops] == pytest.approx(_naive(net, ops, calib, _batches(x, y, 32)), abs=1e-5)


def test_rating_table_has_every_candidate_with_costs(prepared_run):
    run = prepared_run
    targets = run.supervision.for_rating()
    supernet = load_block(run.space, 1, targets.shapes(), run.data.in_chans, run.paths.supernet(1))
    table = rate_block(run.space, supernet, targets, 1, calibration_size=64, batch_size=128).to_frame()
    n_ops = len(run.space.ops)
    expected = sum(n_ops ** c.depth for c in run.space.cells(1)) * len(run.space.in_widths(1))
    assert len(table) == expected
    # the score is mean |Y - Y_hat| / std(Y): predicting the target's mean everywhere scores mean |Y - mean| / std;
    # trained candidates must do better than that, and the scores must differ between candidates
    _, y = targets.sample(1, "rate", 10**6, 0)
    constant = float((y - y.mean()).abs().mean() / y.std(unbiased=False))
    assert table["score"].min() < constant
    assert table["score"].nunique() > 1
    assert (table["params"] > 0).all() and (table["macs"] > 0).all()
    # the same candidate rated under each input width has one score: rating does not depend on the cost variant
    assert table.groupby(["cell", "path"])["score"].nunique().max() == 1


def _rating_clone(prepared_run, root, **distill):
    """A run on a copy of the prepared run's data, teacher and block 0 supernet, with distill settings changed."""
    from dna.pipeline import Run

    for name in ("data", "teacher"):
        shutil.copytree(prepared_run.paths.root / name, root / name)
    (root / "distill").mkdir()
    shutil.copy(prepared_run.paths.supernet(0), root / "distill" / "block_0.pt")
    p = prepared_run.params
    return Run(p.model_copy(update={"outputs": str(root), "distill": p.distill.model_copy(update=distill)}))


def test_a_half_trained_or_stale_supernet_is_refused_naming_the_block(prepared_run, tmp_path):
    from dna.checkpoint import load_checkpoint, save_checkpoint
    from dna.errors import ConfigError
    from dna.pipeline import stage_rate

    run = _rating_clone(prepared_run, tmp_path / "fresh")
    assert len(stage_rate(run, 0)) == len(run.space.candidate_table(0)), "a finished supernet of these settings"

    cut = _rating_clone(prepared_run, tmp_path / "cut")
    state = load_checkpoint(cut.paths.supernet(0))
    save_checkpoint(cut.paths.supernet(0), state | {"epoch": 1, "history": state["history"][:1]})
    with pytest.raises(ConfigError, match=r"^block 0: the supernet \S+block_0.pt finished 1 of 2 epochs: "
                                          r"run `dna distill --block 0`$"):
        stage_rate(cut, 0)
    assert not cut.paths.rating(0).exists()

    other = _rating_clone(prepared_run, tmp_path / "other", lr=0.01)
    with pytest.raises(ConfigError, match=rf"^block 0: the supernet \S+block_0.pt was trained with other settings "
                                          rf"\(fingerprint {prepared_run.block_fingerprint(0)}; these settings give "
                                          rf"{other.block_fingerprint(0)}\): run `dna distill --block 0`$"):
        stage_rate(other, 0)
    with pytest.raises(FileNotFoundError, match=r"^block 1: the supernet \S+block_1.pt is missing"):
        stage_rate(other, 1)


def test_dna_rate_of_a_half_trained_supernet_exits_2_with_one_line(prepared_run, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from dna.checkpoint import load_checkpoint, save_checkpoint
    from dna.cli import app
    from tests.conftest import tiny_raw

    run = _rating_clone(prepared_run, tmp_path / "outputs")
    state = load_checkpoint(run.paths.supernet(0))
    save_checkpoint(run.paths.supernet(0), state | {"epoch": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_raw(tmp_path / "outputs")))
    result = CliRunner().invoke(app, ["rate", "--block", "0", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: block 0: the supernet {run.paths.supernet(0)} finished 1 of 2 epochs: run `dna distill --block 0`"]
