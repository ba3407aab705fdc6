"""Supervised training of a classifier (the teacher, and the searched network), resumable from its last epoch."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dna.data import Data
from dna.ddp import wrap
from dna.engine import Engine, unwrap
from dna.engine import NonFiniteLoss as NonFiniteLoss  # raised by training; detected_faults() imports it from here
from dna.recipe import make_ema, make_optimizer, make_scheduler, step_updates, updates_per_epoch

if TYPE_CHECKING:
    from dna.config import TrainConfig



@torch.no_grad()
def accuracy(model: nn.Module, loader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device, non_blocking=True)).argmax(dim=1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return correct / max(total, 1)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    test_accuracy: float = float("nan")
    resumed_from: int = 0


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), log_target=True,
                    reduction="batchmean") * t * t


def train_classifier(model: nn.Module, data: Data, cfg: TrainConfig, ckpt_path: str | Path, *, seed: int,
                     fingerprint: str, device: torch.device, name: str = "train",
                     teacher: nn.Module | None = None, kd_alpha: float = 0.0, kd_temperature: float = 4.0,
                     on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train with cross-entropy (plus optional distillation from teacher logits), checkpointing every epoch.

    `cfg.batch_size` is the global batch; with several processes each trains on its part of it (dna.ddp).

    A checkpoint with the same `fingerprint` (a hash of everything that determines the run) is resumed from;
    one with another fingerprint is ignored and overwritten. With a weight EMA (cfg.ema_decay) the EMA weights are
    evaluated every epoch and end up in `model`; the checkpoint holds both.
    """
    model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg, cfg.batch_size)
    scheduler = make_scheduler(optimizer, cfg, updates_per_epoch(len(data.train), cfg.batch_size))
    ema = make_ema(unwrap(model), cfg)
    after_step = step_updates(scheduler, cfg)
    if ema is not None:
        after_step.append(lambda updates: ema.update(unwrap(model), step=updates))
    evaluated = ema.module if ema is not None else model
    if teacher is not None:
        teacher.to(device).eval()
    use_teacher = teacher is not None and kd_alpha > 0
    net = wrap(model, device)

    def batches(epoch: int, generator: torch.Generator):
        return data.loader("train", cfg.batch_size, shuffle=True, generator=generator, sharded=True)

    def step(batch):
        x, y = batch
        logits = net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        if use_teacher:
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = (1 - kd_alpha) * loss + kd_alpha * kd_loss(logits, teacher_logits, kd_temperature)
        return loss, {"train_accuracy": int((logits.argmax(1) == y).sum())}

    rate_loader = data.loader("rate", batch_size=256)
    fitted = Engine(net, optimizer, scheduler, batches, step, epochs=cfg.epochs, checkpoint=Path(ckpt_path),
                    fingerprint=fingerprint, seed=seed * 100_003, device=device, name=name, precision=cfg.precision,
                    end_of_epoch=lambda row: {"rate_accuracy": accuracy(evaluated, rate_loader, device)},
                    on_epoch=on_epoch, after_step=after_step, states={"ema": ema} if ema is not None else {}).fit()
    if ema is not None:
        unwrap(model).load_state_dict(ema.module.state_dict())
    result = TrainResult(fitted.history, resumed_from=fitted.resumed_from)
    result.test_accuracy = accuracy(model, data.loader("test", batch_size=256), device)
    return result
