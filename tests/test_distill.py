import pytest
import torch

from dna.checkpoint import load_checkpoint
from dna.distill import distill_block
from dna.train import NonFiniteLoss


class Crash(RuntimeError):
    pass


def _distill(run, path, epochs, on_epoch=None, targets=None, **changes):
    cfg = run.params.distill.model_copy(update={"epochs": epochs, **changes})
    return distill_block(run.space, targets or run.supervision, 1, cfg, path, in_chans=run.data.in_chans,
                         seed=0, fingerprint="test", device=torch.device("cpu"), on_epoch=on_epoch)


def test_loss_goes_down(prepared_run, tmp_path):
    history = _distill(prepared_run, tmp_path / "b.pt", 3).history
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[1]["lr"] == pytest.approx(history[0]["lr"] * prepared_run.params.distill.lr_decay)


def test_lr_per_reference_batch_is_scaled_to_the_global_batch(prepared_run, tmp_path):
    cfg = prepared_run.params.distill
    history = _distill(prepared_run, tmp_path / "b.pt", 1, lr=0.004, lr_batch=4 * cfg.batch_size).history
    state = load_checkpoint(tmp_path / "b.pt")
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(0.001), "0.004 per 4 batches"
    assert history[0]["lr"] == pytest.approx(0.001 * cfg.lr_decay)


def test_bf16_autocast_trains_a_block_on_the_cpu(prepared_run, tmp_path):
    history = _distill(prepared_run, tmp_path / "bf16.pt", 2, precision="bf16").history
    fp32 = _distill(prepared_run, tmp_path / "fp32.pt", 2).history
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["loss"] != fp32[-1]["loss"] == pytest.approx(history[-1]["loss"], rel=0.2)


def test_interrupted_block_resumes_to_the_same_weights(prepared_run, tmp_path):
    _distill(prepared_run, tmp_path / "whole.pt", 3)

    def crash_after_first(row):
        if row["epoch"] == 1:
            raise Crash
    with pytest.raises(Crash):
        _distill(prepared_run, tmp_path / "cut.pt", 3, on_epoch=crash_after_first)
    assert load_checkpoint(tmp_path / "cut.pt")["epoch"] == 1
    seen = []
    resumed = _distill(prepared_run, tmp_path / "cut.pt", 3, on_epoch=seen.append)
    assert resumed.resumed_from == 1
    assert [row["epoch"] for row in seen] == [2, 3], "no completed epoch is redone"
    whole, cut = load_checkpoint(tmp_path / "whole.pt")["model"], load_checkpoint(tmp_path / "cut.pt")["model"]
    assert whole.keys() == cut.keys()
    assert all(torch.equal(whole[k], cut[k]) for k in whole), "bit-for-bit equal to the uninterrupted run"


def test_finished_block_is_not_retrained(prepared_run, tmp_path):
    _distill(prepared_run, tmp_path / "b.pt", 2)
    seen = []
    again = _distill(prepared_run, tmp_path / "b.pt", 2, on_epoch=seen.append)
    assert again.resumed_from == 2 and seen == []


class PoisonedTargets:
    """Real targets, with NaN targets from the second epoch on."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def shapes(self):
        return self.inner.shapes()

    def criterion(self, block, cells):
        return self.inner.criterion(block, cells)

    def pairs(self, block, split, batch_size, shuffle=False, generator=None, sharded=False):
        self.calls += 1
        for i, (x, y) in enumerate(self.inner.pairs(block, split, batch_size, shuffle, generator, sharded)):
            yield x, (y * float("nan") if self.calls >= 2 and i == 3 else y)


def test_nan_loss_stops_with_block_epoch_and_step_and_keeps_last_checkpoint(prepared_run, tmp_path):
    path = tmp_path / "b.pt"
    with pytest.raises(NonFiniteLoss, match=r"block 1: loss is nan at epoch 2 step 3"):
        _distill(prepared_run, path, 3, targets=PoisonedTargets(prepared_run.supervision))
    state = load_checkpoint(path)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_custom_loss_and_path_sampler_are_the_ones_used(prepared_run, tmp_path):
    """A sampler that always picks op 0 leaves every other op as built; the given loss is what the rows report."""
    from dna.distill import build_block

    run, cells = prepared_run, prepared_run.space.cells(1)
    sampled, losses = [], []

    def first_op(generator, cell, num_ops):
        sampled.append((cell.name, num_ops))
        return (0,) * cell.depth

    def l1(output, target):
        losses.append(torch.nn.functional.l1_loss(output, target))
        return losses[-1]
    cfg = run.params.distill.model_copy(update={"epochs": 1})
    result = distill_block(run.space, run.supervision, 1, cfg, tmp_path / "b.pt", in_chans=run.data.in_chans,
                           seed=0, fingerprint="test", device=torch.device("cpu"), loss=l1, sample_path=first_op)
    num_ops = len(run.params.space.ops)
    assert sampled[:len(cells)] == [(c.name, num_ops) for c in cells] and len(losses) == len(sampled)
    row = result.history[0]
    assert row["loss"] == pytest.approx(sum(x.item() for x in losses) / len(losses), rel=0.05), "L1, not MSE"

    trained, shapes = load_checkpoint(tmp_path / "b.pt")["model"], run.supervision.shapes()
    torch.manual_seed(0 * 1009 + 1)  # distill_block's seeding of the initial weights
    built = build_block(run.space, 1, shapes, run.data.in_chans).state_dict()
    untouched = [k for k in built if ".layers." in k and k.split(".layers.")[1].split(".")[1] != "0"]
    first = [k for k in built if ".layers." in k and k.split(".layers.")[1].split(".")[1] == "0"]
    assert untouched and all(torch.equal(trained[k], built[k]) for k in untouched)
    assert any(not torch.equal(trained[k], built[k]) for k in first), "op 0 did train"
