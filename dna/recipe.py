"""A training recipe (dna.config.Recipe) made into what the Engine drives, from timm's parts: the optimizer (weight
decay not on norms and biases), the lr scaled to the global batch, the lr schedule (per epoch or per optimizer step),
and the weight EMA. Every training loop builds them here: classifiers (train.py), block supernets (distill.py) and
the one-shot baseline (spos.py)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn

if TYPE_CHECKING:
    from dna.config import Recipe, TrainConfig

OPTIMIZERS = {"sgd": "sgd", "momentum": "momentum", "adam": "adam", "adamw": "adamw", "rmsprop": "rmsproptf"}


def scaled_lr(lr: float, batch_size: int, lr_batch: int | None) -> float:
    """`lr` given per `lr_batch` images, scaled linearly to the global batch `batch_size` (the images of one
    optimizer step over all processes, dna.ddp); `lr` itself when lr_batch is None."""
    return lr if lr_batch is None else lr * batch_size / lr_batch


def updates_per_epoch(samples: int, batch_size: int) -> int:
    """Optimizer steps in an epoch of `samples` at the global batch `batch_size`, however many processes share it
    (the last batch may be short)."""
    return math.ceil(samples / batch_size)


def make_optimizer(model: nn.Module, cfg: Recipe, batch_size: int) -> torch.optim.Optimizer:
    """timm's optimizer of the recipe, its lr scaled to the global batch `batch_size`."""
    eps = {"eps": cfg.optimizer_eps} if cfg.optimizer_eps is not None else {}
    return create_optimizer_v2(model, opt=OPTIMIZERS[cfg.optimizer], weight_decay=cfg.weight_decay,
                               lr=scaled_lr(cfg.lr, batch_size, cfg.lr_batch), **eps)


def lr_lambda(cfg: Recipe, epochs: int | None = None) -> Callable[[int], float]:
    """The per-epoch factor of the cosine, exponential and constant schedules over `epochs` (default cfg.epochs)."""
    epochs = cfg.epochs if epochs is None else epochs

    def factor(epoch: int) -> float:
        if epoch < cfg.warmup_epochs:
            return (epoch + 1) / (cfg.warmup_epochs + 1)
        if cfg.schedule == "cosine":
            span = max(1, epochs - cfg.warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
        if cfg.schedule == "exponential":
            return cfg.lr_decay ** (epoch - cfg.warmup_epochs)
        return 1.0
    return factor


class TimmSchedule:
    """A timm scheduler driven as the Engine drives a torch one: `step()` at the end of each epoch (timm's
    `step(epoch + 1)`), `step_update(updates)` after each optimizer step; each is a no-op when the scheduler counts
    the other unit. Its state (epochs and steps so far, timm's own) is checkpointed; loading it sets the optimizer's
    lr to where the schedule stopped."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.epoch = self.updates = 0

    def step(self) -> None:
        self.epoch += 1
        self.scheduler.step(self.epoch)

    def step_update(self, updates: int) -> None:
        self.updates = updates
        self.scheduler.step_update(updates)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "updates": self.updates, "timm": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.updates = state["epoch"], state["updates"]
        self.scheduler.load_state_dict(state["timm"])
        self.scheduler.step(self.epoch)
        self.scheduler.step_update(self.updates)


class EpochFactorLR(torch.optim.lr_scheduler.LambdaLR):
    """torch's LambdaLR that also resumes from the state of the ExponentialLR and CosineAnnealingLR that block
    supernets and the one-shot baseline were trained with before they took a recipe: the same lr at every epoch, so
    only the epoch count and the base lrs carry over."""

    def load_state_dict(self, state_dict: dict) -> None:
        if "lr_lambdas" not in state_dict:
            state_dict = {k: state_dict[k] for k in ("base_lrs", "last_epoch", "_last_lr") if k in state_dict}
            state_dict["lr_lambdas"] = [None] * len(self.lr_lambdas)
        super().load_state_dict(state_dict)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Recipe, steps_per_epoch: int, epochs: int | None = None):
    """The configured schedule over `epochs` (default cfg.epochs): a LambdaLR per epoch for cosine, exponential and
    constant, timm's step scheduler (decay by lr_decay every decay_epochs, linear warmup from warmup_lr) per epoch or
    per step."""
    epochs = cfg.epochs if epochs is None else epochs
    if cfg.schedule != "step":
        return EpochFactorLR(optimizer, lr_lambda(cfg, epochs))
    per_step = cfg.lr_updates == "step"
    scheduler, _ = create_scheduler_v2(optimizer, sched="step", num_epochs=epochs, decay_epochs=cfg.decay_epochs,
                                       decay_rate=cfg.lr_decay, warmup_lr=cfg.warmup_lr,
                                       warmup_epochs=cfg.warmup_epochs, step_on_epochs=not per_step,
                                       updates_per_epoch=steps_per_epoch if per_step else 0)
    return TimmSchedule(scheduler)


def step_updates(scheduler, cfg: Recipe) -> list[Callable[[int], None]]:
    """What the Engine calls after every optimizer step for the schedule: its per-step update, if it has one."""
    return [scheduler.step_update] if cfg.lr_updates == "step" else []


def make_ema(model: nn.Module, cfg: TrainConfig) -> ModelEmaV3 | None:
    """timm's weight EMA of `model` (on its device), or None when cfg.ema_decay is unset. Update it with
    `ema.update(model, step=updates)`."""
    if cfg.ema_decay is None:
        return None
    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
