import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.utils import ModelEmaV3
from torch import nn

from dna.config import TrainConfig
from dna.recipe import TimmSchedule, lr_lambda, make_ema, make_scheduler, scaled_lr, updates_per_epoch


def _optimizer(lr: float = 0.016) -> torch.optim.Optimizer:
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=lr)


def test_legacy_schedules_warm_up_then_decay_per_epoch():
    f = lr_lambda(TrainConfig(epochs=10, warmup_epochs=2, schedule="cosine"))
    assert f(0) < f(1) < f(2) == pytest.approx(1.0)
    assert f(9) < f(5) < f(2)
    g = lr_lambda(TrainConfig(epochs=10, warmup_epochs=0, schedule="exponential", lr_decay=0.5))
    assert g(3) == pytest.approx(0.125)
    assert isinstance(make_scheduler(_optimizer(), TrainConfig(), 10), torch.optim.lr_scheduler.LambdaLR)


def test_lr_is_scaled_linearly_to_the_global_batch():
    assert scaled_lr(0.016, 64, 256) == pytest.approx(0.004)
    assert scaled_lr(0.016, 512, 256) == pytest.approx(0.032)
    assert scaled_lr(0.016, 64, None) == 0.016, "no reference batch: the lr as given"
    assert updates_per_epoch(1000, 64) == 16


def _world_figures(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save({"lr": scaled_lr(0.016, 128, 256), "updates": updates_per_epoch(1000, 128)}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_batch_size_is_the_global_batch_whatever_the_processes(tmp_path):
    """batch_size is the images of one optimizer step over all processes (dna.ddp splits it): two processes scale
    the lr and count the steps of an epoch as one process does."""
    mp.spawn(_world_figures, args=(2, tmp_path / "init", tmp_path), nprocs=2, join=True)
    for rank in range(2):
        figures = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert figures["lr"] == pytest.approx(0.016 * 128 / 256)
        assert figures["updates"] == 8


def efficientnet_lr(step: int, base: float, steps_per_epoch: int, *, warmup_epochs: int, warmup_lr: float,
                    decay_epochs: float, decay: float) -> float:
    """EfficientNet's schedule written out: linear warmup, then the lr decays by `decay` every `decay_epochs` epochs
    counted in steps, staircase (TensorFlow's exponential_decay with staircase=True)."""
    warmup = warmup_epochs * steps_per_epoch
    if step < warmup:
        return warmup_lr + step * (base - warmup_lr) / warmup
    return base * decay ** math.floor(step / (decay_epochs * steps_per_epoch))


def test_step_schedule_updated_per_step_follows_efficientnets_formula():
    cfg = TrainConfig(epochs=12, lr=0.016, schedule="step", decay_epochs=2.4, lr_decay=0.97, warmup_epochs=2,
                      warmup_lr=1e-6, lr_updates="step")
    spe = 10
    optimizer = _optimizer(cfg.lr)
    schedule = make_scheduler(optimizer, cfg, spe)
    assert isinstance(schedule, TimmSchedule)
    lrs = {0: optimizer.param_groups[0]["lr"]}
    for epoch in range(cfg.epochs):
        for index in range(spe):
            updates = epoch * spe + index + 1
            schedule.step_update(updates)  # what the Engine's after_step hook does
            lrs[updates] = optimizer.param_groups[0]["lr"]
        schedule.step()  # per epoch: a no-op for a per-step schedule
        assert optimizer.param_groups[0]["lr"] == lrs[(epoch + 1) * spe]
    formula = {n: efficientnet_lr(n, 0.016, spe, warmup_epochs=2, warmup_lr=1e-6, decay_epochs=2.4, decay=0.97)
               for n in lrs}
    assert lrs == pytest.approx(formula, rel=1e-12)
    assert lrs[23] == pytest.approx(0.016) and lrs[24] == pytest.approx(0.016 * 0.97), "decays at 2.4 epochs"
    assert lrs[47] == pytest.approx(0.016 * 0.97) and lrs[48] == pytest.approx(0.016 * 0.97 ** 2)


def test_step_schedule_per_epoch_decays_at_whole_epochs():
    cfg = TrainConfig(epochs=10, lr=0.1, schedule="step", decay_epochs=2.4, lr_decay=0.5, warmup_epochs=0)
    optimizer = _optimizer(cfg.lr)
    schedule = make_scheduler(optimizer, cfg, steps_per_epoch=10)
    seen = []
    for _ in range(cfg.epochs):
        schedule.step_update(123)  # per step: a no-op for a per-epoch schedule
        schedule.step()
        seen.append(optimizer.param_groups[0]["lr"])
    # after epoch e the lr is that of epoch e: 0.1 * 0.5 ** floor(e / 2.4)
    assert seen == pytest.approx([0.1 * 0.5 ** math.floor(e / 2.4) for e in range(1, 11)])


def test_timm_schedule_state_resumes_where_it_stopped():
    cfg = TrainConfig(epochs=6, lr=0.1, schedule="step", decay_epochs=1, lr_decay=0.5, warmup_epochs=0)
    first_optimizer = _optimizer(cfg.lr)
    first = make_scheduler(first_optimizer, cfg, 5)
    for _ in range(3):
        first.step()
    for load_optimizer_first in (True, False):  # the lr is the schedule's whichever is loaded last
        optimizer = _optimizer(cfg.lr)
        if load_optimizer_first:
            optimizer.load_state_dict(first_optimizer.state_dict())
        resumed = make_scheduler(optimizer, cfg, 5)
        resumed.load_state_dict(first.state_dict())
        if not load_optimizer_first:
            optimizer.load_state_dict(first_optimizer.state_dict())
        assert resumed.epoch == 3 and optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
        resumed.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 4)


def test_ema_is_made_only_when_asked_and_averages_the_weights():
    model = nn.Linear(3, 1, bias=False)
    assert make_ema(model, TrainConfig()) is None
    ema = make_ema(model, TrainConfig(ema_decay=0.5))
    assert isinstance(ema, ModelEmaV3) and ema.module is not model
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=2)  # step 1 would copy the weights (timm's first update)
    assert torch.allclose(ema.module.weight, start + 0.5)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no training here
def test_every_training_loop_takes_one_recipe_and_the_distill_and_spos_defaults_are_their_old_recipes():
    """DistillConfig and SposConfig are Recipes: at their defaults they build what distillation (Adam, x lr_decay per
    epoch) and the one-shot baseline (AdamW, cosine over its epochs) were hand-built with, and dump (so fingerprint)
    as before the recipe keys joined them; any other optimizer or schedule is theirs to choose."""
    from dna.config import DistillConfig, SposConfig
    from dna.recipe import make_optimizer

    model = nn.Linear(2, 2)
    distill = DistillConfig()
    optimizer = make_optimizer(model, distill, distill.batch_size)
    assert isinstance(optimizer, torch.optim.Adam)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 1e-4]  # none on the bias
    old = torch.optim.lr_scheduler.ExponentialLR(torch.optim.Adam(nn.Linear(2, 2).parameters(), lr=distill.lr),
                                                 gamma=distill.lr_decay)
    new = make_scheduler(optimizer, distill, 10)
    for _ in range(5):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(old.get_last_lr()[0])
        old.step(), new.step()
    fingerprinted = {"context": {"fingerprint": True}}
    assert set(distill.model_dump(**fingerprinted)) == {"epochs", "lr", "lr_decay", "weight_decay", "batch_size",
                                                        "cache_features"}
    spos = SposConfig()
    assert set(spos.model_dump(**fingerprinted)) == {"epochs", "optimizer", "lr", "weight_decay", "label_smoothing"}
    optimizer = make_optimizer(model, spos, 64)
    old = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=spos.lr),
                                                     T_max=6)
    new = make_scheduler(optimizer, spos, 10, epochs=6)
    assert isinstance(optimizer, torch.optim.AdamW)
    for _ in range(6):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(old.get_last_lr()[0])
        old.step(), new.step()
    sgd = DistillConfig(optimizer="sgd", schedule="cosine", warmup_epochs=1, epochs=4)
    assert isinstance(make_optimizer(model, sgd, 64), torch.optim.SGD)
    assert {"optimizer", "schedule", "warmup_epochs"} <= set(sgd.model_dump(**fingerprinted))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no training here
def test_a_supernet_checkpointed_under_torchs_exponential_schedule_resumes_at_the_same_lr():
    from dna.config import DistillConfig

    cfg = DistillConfig(lr_decay=0.5)
    params = nn.Linear(2, 2).parameters()
    old = torch.optim.lr_scheduler.ExponentialLR(torch.optim.Adam(params, lr=cfg.lr), gamma=cfg.lr_decay)
    for _ in range(3):
        old.step()
    optimizer = torch.optim.Adam(nn.Linear(2, 2).parameters(), lr=cfg.lr)
    new = make_scheduler(optimizer, cfg, 10)
    new.load_state_dict(old.state_dict())
    new.step()
    old.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(old.get_last_lr()[0]) == pytest.approx(cfg.lr / 16)
