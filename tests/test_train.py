import math

import pytest
import torch

from dna.checkpoint import load_checkpoint
from dna.config import TrainConfig
from dna.train import NonFiniteLoss, lr_lambda, train_classifier


def _model(run):
    from dna.arch import Arch

    torch.manual_seed(0)
    arch = Arch(stem=8, stages=(("ds_r1_k3_s1_c8_se0.25",), ("ir_r1_k3_s2_e3_c16_se0.25",)), head=32)
    return arch.build(run.data.num_classes, run.data.in_chans, drop_rate=0.1)


def _train(run, path, epochs, lr=0.03, on_epoch=None, model=None, precision="fp32"):
    cfg = TrainConfig(epochs=epochs, lr=lr, warmup_epochs=1, batch_size=128, precision=precision)
    return train_classifier(model or _model(run), run.data, cfg, path, seed=0, fingerprint=f"t{lr}",
                            device=torch.device("cpu"), name="student", on_epoch=on_epoch)


def test_schedule_warms_up_then_decays():
    f = lr_lambda(TrainConfig(epochs=10, warmup_epochs=2, schedule="cosine"))
    assert f(0) < f(1) < f(2) == pytest.approx(1.0)
    assert f(9) < f(5) < f(2)
    g = lr_lambda(TrainConfig(epochs=10, warmup_epochs=0, schedule="exponential", lr_decay=0.5))
    assert g(3) == pytest.approx(0.125)


def test_training_learns_and_resumes_bit_for_bit(prepared_run, tmp_path):
    whole = _train(prepared_run, tmp_path / "whole.pt", 3)
    assert whole.test_accuracy > 0.5, "three epochs on digits beat chance (0.1) by far"

    def crash(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _train(prepared_run, tmp_path / "cut.pt", 3, on_epoch=crash)
    resumed = _train(prepared_run, tmp_path / "cut.pt", 3)
    assert resumed.resumed_from == 2
    assert resumed.history == whole.history
    a, b = load_checkpoint(tmp_path / "whole.pt")["model"], load_checkpoint(tmp_path / "cut.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.test_accuracy == whole.test_accuracy


def test_nan_loss_names_epoch_and_step_and_keeps_the_last_checkpoint(prepared_run, tmp_path):
    model, calls = _model(prepared_run), []
    steps_per_epoch = math.ceil(len(prepared_run.data.train) / 128)

    def poison(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) == steps_per_epoch + 1 + 4 else output  # +1: the hold-out pass
    model.register_forward_hook(poison)
    with pytest.raises(NonFiniteLoss, match=r"^student: loss is nan at epoch 2 step 3"):
        _train(prepared_run, tmp_path / "x.pt", 3, model=model)
    state = load_checkpoint(tmp_path / "x.pt")
    assert state["epoch"] == 1 and math.isfinite(state["history"][-1]["loss"])


def test_kd_loss_is_zero_only_for_matching_logits():
    from dna.train import kd_loss

    logits = torch.randn(8, 10)
    assert kd_loss(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, torch.randn(8, 10), 4.0).item() > 0.01


def test_bf16_autocast_trains_a_classifier_on_the_cpu(prepared_run, tmp_path):
    """The teacher and the retrained network train through train_classifier: under bf16 its convolutions run in
    bfloat16 while the weights stay float32."""
    model, dtypes = _model(prepared_run), set()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    result = _train(prepared_run, tmp_path / "bf16.pt", 2, model=model, precision="bf16")
    assert torch.bfloat16 in dtypes
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.history[-1]["loss"] < result.history[0]["loss"] and result.test_accuracy > 0.3
