"""Supervised training of a classifier (the teacher, and the searched network), resumable from its last epoch."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn

from dna.checkpoint import load_checkpoint, save_checkpoint
from dna.config import TrainConfig
from dna.data import Data
from dna.progress import progress

log = logging.getLogger(__name__)
OPTIMIZERS = {"sgd": "sgd", "momentum": "momentum", "adam": "adam", "adamw": "adamw", "rmsprop": "rmsproptf"}


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is left in place."""


def check_finite(loss: torch.Tensor, where: str, epoch: int, step: int) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"{where}: loss is {loss.item()} at epoch {epoch} step {step}; "
                            "the last good checkpoint was kept (lower the learning rate?)")


def resume_training(path: Path, fingerprint: str, model: nn.Module, optimizer, scheduler) -> dict | None:
    """Load the last epoch's state into model, optimizer and scheduler if the checkpoint is of this same run."""
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    if state.get("fingerprint") != fingerprint:
        return None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def save_training(path: Path, fingerprint: str, model: nn.Module, optimizer, scheduler, epoch: int,
                  history: list[dict], **extra) -> None:
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                           "fingerprint": fingerprint, **extra})


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
        pred = model(x.to(device)).argmax(dim=1).cpu()
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
    ckpt_path = Path(ckpt_path)
    model.to(device, memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt=OPTIMIZERS[cfg.optimizer], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    result = TrainResult()
    if state := resume_training(ckpt_path, fingerprint, model, optimizer, scheduler):
        torch.set_rng_state(state["rng"])
        result.history, result.resumed_from = list(state["history"]), int(state["epoch"])
        log.info("%s: resuming after epoch %d from %s", name, result.resumed_from, ckpt_path)
    if teacher is not None:
        teacher.to(device).eval()
    rate_loader = data.loader("rate", batch_size=256)
    for epoch in range(result.resumed_from, cfg.epochs):
        model.train()
        loader = data.loader("train", cfg.batch_size, shuffle=True,
                             generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        total, seen, correct = 0.0, 0, 0
        bar = progress(loader, f"{name} epoch {epoch + 1}/{cfg.epochs}")
        for step, (x, y) in enumerate(bar):
            x, y = x.to(device, memory_format=torch.channels_last), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if teacher is not None and kd_alpha > 0:
                with torch.no_grad():
                    teacher_logits = teacher(x)
                loss = (1 - kd_alpha) * loss + kd_alpha * kd_loss(logits, teacher_logits, kd_temperature)
            check_finite(loss, name, epoch + 1, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{total / seen:.4f}")
        scheduler.step()
        row = {"epoch": epoch + 1, "loss": total / seen, "train_accuracy": correct / seen,
               "rate_accuracy": accuracy(model, rate_loader, device), "lr": optimizer.param_groups[0]["lr"]}
        result.history.append(row)
        save_training(ckpt_path, fingerprint, model, optimizer, scheduler, epoch + 1, result.history,
                      rng=torch.get_rng_state())
        log.info("%s epoch %d/%d: loss %.4f, hold-out accuracy %.4f", name, epoch + 1, cfg.epochs, row["loss"],
                 row["rate_accuracy"])
        if on_epoch:
            on_epoch(row)
    result.test_accuracy = accuracy(model, data.loader("test", batch_size=256), device)
    return result
