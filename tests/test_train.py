import math

import pytest
import torch

from dna.checkpoint import load_checkpoint
from dna.config import TrainConfig
from dna.train import NonFiniteLoss, train_classifier


def _model(run):
    from dna.arch import Arch

    torch.manual_seed(0)
    arch = Arch(stem=8, stages=(("ds_r1_k3_s1_c8_se0.25",), ("ir_r1_k3_s2_e3_c16_se0.25",)), head=32)
    return arch.build(run.data.num_classes, run.data.in_chans, drop_rate=0.1)


def _train(run, path, epochs, lr=0.03, on_epoch=None, model=None, precision="fp32"):
    cfg = TrainConfig(epochs=epochs, lr=lr, warmup_epochs=1, batch_size=128, precision=precision)
    return train_classifier(model or _model(run), run.data, cfg, path, seed=0, fingerprint=f"t{lr}",
                            device=torch.device("cpu"), name="student", on_epoch=on_epoch)


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


def _recipe_cfg(**changes) -> TrainConfig:
    """The paper's kind of recipe at digits scale: lr per 256 images, timm's step schedule updated every step with
    a warmup, weight EMA."""
    base = dict(epochs=3, lr=0.06, lr_batch=256, batch_size=128, schedule="step", decay_epochs=0.5, lr_decay=0.85,
                warmup_epochs=1, warmup_lr=1e-3, lr_updates="step", ema_decay=0.5)
    return TrainConfig(**{**base, **changes})


def _train_recipe(run, path, cfg, on_epoch=None):
    model = _model(run)
    result = train_classifier(model, run.data, cfg, path, seed=0, fingerprint="recipe", device=torch.device("cpu"),
                              name="student", on_epoch=on_epoch)
    return model, result


def test_ema_weights_are_evaluated_kept_and_resumed_exactly(prepared_run, tmp_path):
    from dna.train import accuracy

    cfg = _recipe_cfg()
    model, whole = _train_recipe(prepared_run, tmp_path / "whole.pt", cfg)
    state = load_checkpoint(tmp_path / "whole.pt")
    ema = {k.removeprefix("module."): v for k, v in state["states"]["ema"].items()}
    raw = state["model"]
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point()), "EMA differs from raw"
    final = model.state_dict()
    assert all(torch.equal(final[k], ema[k]) for k in final), "the trained model holds the EMA weights"
    rate = prepared_run.data.loader("rate", batch_size=256)
    assert whole.history[-1]["rate_accuracy"] == accuracy(model, rate, torch.device("cpu")), "EMA is evaluated"
    assert whole.test_accuracy > 0.3

    def crash(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _train_recipe(prepared_run, tmp_path / "cut.pt", cfg, on_epoch=crash)
    resumed_model, resumed = _train_recipe(prepared_run, tmp_path / "cut.pt", cfg)
    assert resumed.resumed_from == 2 and resumed.history == whole.history
    again = load_checkpoint(tmp_path / "cut.pt")
    assert all(torch.equal(again["model"][k], raw[k]) for k in raw)
    assert all(torch.equal(again["states"]["ema"][k], state["states"]["ema"][k]) for k in state["states"]["ema"])
    assert all(torch.equal(resumed_model.state_dict()[k], final[k]) for k in final)
    assert resumed.test_accuracy == whole.test_accuracy


def test_lr_scaled_to_the_batch_and_stepped_per_update(prepared_run, tmp_path):
    cfg = _recipe_cfg(ema_decay=None, epochs=2)
    _, result = _train_recipe(prepared_run, tmp_path / "lr.pt", cfg)
    spe = math.ceil(len(prepared_run.data.train) / 128)
    base = 0.06 * 128 / 256
    for row in result.history:
        updates = row["epoch"] * spe  # the lr after an epoch's last step is the schedule's at that step
        assert updates >= spe  # past the 1-epoch warmup: decays by 0.85 every half epoch of steps
        assert row["lr"] == pytest.approx(base * 0.85 ** (updates // (0.5 * spe)), rel=1e-9)


def test_bf16_autocast_trains_a_classifier_on_the_cpu(prepared_run, tmp_path):
    """The teacher and the retrained network train through train_classifier: under bf16 its convolutions run in
    bfloat16 while the weights stay float32."""
    model, dtypes = _model(prepared_run), set()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    result = _train(prepared_run, tmp_path / "bf16.pt", 2, model=model, precision="bf16")
    assert torch.bfloat16 in dtypes
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # two epochs on 16 px digits: well above chance (0.1) however bfloat16 rounds on this CPU
    assert result.history[-1]["loss"] < result.history[0]["loss"] and result.test_accuracy > 0.2
