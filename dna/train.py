"""Supervised training of a classifier (the teacher, and the searched network), resumable from its last epoch."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn

from dna.config import TrainConfig
from dna.data import Data
from dna.engine import Engine
from dna.engine import NonFiniteLoss as NonFiniteLoss  # raised by training; detected_faults() imports it from here

OPTIMIZERS = {"sgd": "sgd", "momentum": "momentum", "adam": "adam", "adamw": "adamw", "rmsprop": "rmsproptf"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(epoch: int) -> float:
        if epoch < cfg.warmup_epochs:
            return (epoch + 1) / (cfg.warmup_epochs + 1)
        if cfg.schedule == "cosine":
            span = max(1, cfg.epochs - cfg.warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
        if cfg.schedule == "exponential":
            return cfg.lr_decay ** (epoch - cfg.warmup_epochs)
        return 1.0
    return factor


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

    A checkpoint with the same `fingerprint` (a hash of everything that determines the run) is resumed from;
    one with another fingerprint is ignored and overwritten.
    """
    model.to(device, memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt=OPTIMIZERS[cfg.optimizer], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if teacher is not None:
        teacher.to(device).eval()
    use_teacher = teacher is not None and kd_alpha > 0

    def batches(epoch: int, generator: torch.Generator):
        return data.loader("train", cfg.batch_size, shuffle=True, generator=generator)

    def step(batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        if use_teacher:
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = (1 - kd_alpha) * loss + kd_alpha * kd_loss(logits, teacher_logits, kd_temperature)
        return loss, {"train_accuracy": int((logits.argmax(1) == y).sum())}

    rate_loader = data.loader("rate", batch_size=256)
    fitted = Engine(model, optimizer, scheduler, batches, step, epochs=cfg.epochs, checkpoint=Path(ckpt_path),
                    fingerprint=fingerprint, seed=seed * 100_003, device=device, name=name, precision=cfg.precision,
                    end_of_epoch=lambda row: {"rate_accuracy": accuracy(model, rate_loader, device)},
                    on_epoch=on_epoch).fit()
    result = TrainResult(fitted.history, resumed_from=fitted.resumed_from)
    result.test_accuracy = accuracy(model, data.loader("test", batch_size=256), device)
    return result
