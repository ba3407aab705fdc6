"""One resumable training loop for the teacher, the block supernets and retraining.

The caller brings the model, its optimizer and per-epoch scheduler, a `batches(epoch, generator)` function (the loop
knows no datasets: it hands over a generator seeded by `seed + epoch`, so an epoch's order never depends on what came
before) and a `step(batch) -> (loss, totals)` function. The loop owns the rest: resuming from the last completed epoch
(weights, optimizer, scheduler, grad scaler, RNG states, history), a checkpoint after every epoch, the non-finite-loss
check, progress, one log line per epoch, mixed precision and channels_last for 4-D inputs.

Per optimizer step, `after_step` hooks get the number of optimizer steps so far in the whole run (1, 2, ...; it
continues across a resume): a scheduler updated per step, a weight EMA. Objects in `states` (anything with
state_dict / load_state_dict, such as that EMA) are checkpointed with the rest and restored on resume.

Several processes (launched by torchrun, joined by dna.ddp.process_group, the model wrapped by dna.ddp.wrap):
- `batches` gives this process's part of each global batch (dna.ddp.rank_batches); every rank gets the same epoch
  generator, so all ranks cut the same order;
- each rank's loss is weighted by its share of the global batch, so that the gradient DistributedDataParallel
  averages is the mean over the global batch, as one process computes it;
- the loss is reduced over ranks before the finiteness check, so every rank stops at the same step;
- the epoch's totals and sample counts are summed over ranks, so the row describes the whole epoch; after the epoch
  every rank holds rank 0's buffers (BatchNorm statistics), so `end_of_epoch` sees the model rank 0 saves;
- only rank 0 writes the checkpoint, logs, shows progress and calls `on_epoch`; the others wait at a barrier;
- the checkpoint holds every rank's RNG states (ranks other than 0 draw from their own seeded streams, so their
  dropout masks and augmentations are not rank 0's), and a run resumed with as many processes continues them.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dna.checkpoint import load_checkpoint, save_checkpoint
from dna.command_gc import settle
from dna.ddp import rank_and_world, unwrap
from dna.errors import DetectedFault
from dna.progress import progress

log = logging.getLogger(__name__)
Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
Step = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]


class NonFiniteLoss(RuntimeError, DetectedFault):
    """Training produced a NaN or infinite loss; the last good checkpoint is left in place."""
    fails_alike = True  # a retry resumes at the same epoch


def channels_last(batch):
    """The batch with its 4-D tensors (images, feature maps) in channels_last; other tensors and values unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(channels_last(b) for b in batch)
    if isinstance(batch, dict):
        return {k: channels_last(v) for k, v in batch.items()}
    return batch


def to_device(batch, device: torch.device):
    """The batch on `device`; copies from pinned memory overlap with the work already queued there."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def batch_len(batch) -> int:
    """The number of samples in a batch: the length of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    first = next(iter(batch.values() if isinstance(batch, dict) else batch))
    return batch_len(first)


def autocast(device: torch.device, precision: Precision):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def rng_states() -> dict:
    states = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda_rng"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(state: dict) -> None:
    """Restore the states rng_states() saved. A CUDA state saved with another number of GPUs (or none here) is not
    restored: the run continues, but its random draws on the GPU differ from an uninterrupted run's."""
    if "rng" in state:
        torch.set_rng_state(state["rng"])
    if "cuda_rng" not in state:
        return
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(state["cuda_rng"]) == here:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    else:
        log.warning("the checkpoint holds the random state of %d GPUs and this process sees %d: GPU random draws "
                    "(dropout, augmentation on the GPU) are not those of an uninterrupted run",
                    len(state["cuda_rng"]), here)


@dataclass
class Fitted:
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0


@dataclass
class Engine:
    """Trains `model` for `epochs`, resumable from `checkpoint` when it holds a run of the same `fingerprint` (a hash
    of everything that determines the run); a checkpoint of another fingerprint is ignored and overwritten.

    `step(batch)` returns the loss to minimise and totals over the batch's samples (say the loss times the batch size,
    a count of correct predictions); the epoch row holds `loss` and each total divided by the samples seen.
    `end_of_epoch(row)` returns metrics to add to (or replace in) the row, such as hold-out accuracy, before the row
    is saved; `on_epoch(row)` is called once the epoch's checkpoint is written.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: Callable[[int, torch.Generator], Iterable]
    step: Step
    epochs: int
    checkpoint: Path
    fingerprint: str
    seed: int
    device: torch.device
    name: str = "train"
    precision: Precision = "fp32"
    end_of_epoch: Callable[[dict], dict] | None = None
    on_epoch: Callable[[dict], None] | None = None
    after_step: Sequence[Callable[[int], None]] = ()
    states: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.rank, self.world = rank_and_world()
        self.updates = 0
        if self.rank > 0:
            torch.manual_seed(self.seed * 1_000_003 + self.rank)  # its own dropout masks and augmentations

    def fit(self) -> Fitted:
        settle()
        fitted = self.resume()
        for epoch in range(fitted.resumed_from, self.epochs):
            row, extra = self.train_epoch(epoch)
            fitted.history.append(row)
            self.save(epoch + 1, fitted.history)
            if self.rank == 0:
                log.info("%s epoch %d/%d: %s", self.name, epoch + 1, self.epochs, summary(row, ["loss", *extra]))
                if self.on_epoch:
                    self.on_epoch(row)
        return fitted

    def train_epoch(self, epoch: int) -> tuple[dict, dict]:
        """The epoch's row, and the metrics end_of_epoch gave (the log line shows them with the loss)."""
        self.model.train()
        generator = torch.Generator().manual_seed(self.seed + epoch)
        totals: dict[str, float] = {"loss": 0.0}
        seen = 0
        bar = progress(self.batches(epoch, generator), f"{self.name} epoch {epoch + 1}/{self.epochs}",
                       disable=self.rank != 0)
        for index, batch in enumerate(bar):
            batch = channels_last(to_device(batch, self.device))
            with autocast(self.device, self.precision):
                loss, batch_totals = self.step(batch)
            count = batch_len(batch)
            share = self.check_finite(loss, count, epoch + 1, index)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss if share == 1 else loss * share).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.updates += 1
            for hook in self.after_step:
                hook(self.updates)
            totals["loss"] += loss.item() * count
            for key, value in batch_totals.items():
                totals[key] = totals.get(key, 0) + value
            seen += count
            bar.set_postfix(loss=f"{totals['loss'] / seen:.4f}")
        self.scheduler.step()
        totals, seen = self.sum_over_ranks(totals, seen)
        self.share_buffers()
        row = {"epoch": epoch + 1, **{key: total / seen for key, total in totals.items()}}
        extra = self.end_of_epoch(row) if self.end_of_epoch else {}
        row.update(extra)
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        return row, extra

    def check_finite(self, loss: torch.Tensor, count: int, epoch: int, index: int) -> float:
        """Raise NonFiniteLoss unless the step's loss is finite on every rank; return the factor of this rank's loss
        (its share of the global batch times the number of ranks, which DistributedDataParallel divides by)."""
        value, share = loss.detach().float(), 1.0
        if self.world > 1:
            sums = torch.stack([value * count, value.new_tensor(float(count))])
            dist.all_reduce(sums)
            value, share = sums[0] / sums[1], count * self.world / sums[1].item()
        if not torch.isfinite(value):
            raise NonFiniteLoss(f"{self.name}: loss is {value.item()} at epoch {epoch} step {index}; "
                                "the last good checkpoint was kept (lower the learning rate?)")
        return share

    def sum_over_ranks(self, totals: dict[str, float], seen: int) -> tuple[dict[str, float], int]:
        if self.world == 1:
            return totals, seen
        values = torch.tensor([seen, *totals.values()], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return dict(zip(totals, values[1:].tolist())), int(values[0])

    def share_buffers(self) -> None:
        """Give every rank rank 0's buffers (each rank's BatchNorm statistics are of its own part of the batches)."""
        if self.world > 1:
            for buffer in unwrap(self.model).buffers():
                dist.broadcast(buffer, 0)

    def resume(self) -> Fitted:
        """Load the last completed epoch's state if the checkpoint is of this same run."""
        if not self.checkpoint.is_file():
            return Fitted()
        state = load_checkpoint(self.checkpoint)
        if state.get("fingerprint") != self.fingerprint:
            if self.rank == 0:
                log.info("%s: %s is of another run; starting afresh", self.name, self.checkpoint)
            return Fitted()
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        for name, obj in self.states.items():
            obj.load_state_dict(state["states"][name])
        self.updates = int(state.get("updates", 0))
        ranks = state.get("rank_rng")
        if ranks is not None and len(ranks) == self.world:
            set_rng_states(ranks[self.rank])
        elif self.rank == 0:
            set_rng_states(state)
        fitted = Fitted(list(state["history"]), int(state["epoch"]))
        if self.rank == 0:
            log.info("%s: resuming after epoch %d from %s", self.name, fitted.resumed_from, self.checkpoint)
        return fitted

    def save(self, epoch: int, history: list[dict]) -> None:
        ranks = None
        if self.world > 1:
            ranks = [None] * self.world if self.rank == 0 else None
            dist.gather_object(rng_states(), ranks, dst=0)
        if self.rank == 0:
            state = {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "epoch": epoch, "history": history,
                     "fingerprint": self.fingerprint, "updates": self.updates, **rng_states()}
            if self.states:
                state["states"] = {name: obj.state_dict() for name, obj in self.states.items()}
            if ranks is not None:
                state["rank_rng"] = ranks
            if self.scaler.is_enabled():
                state["scaler"] = self.scaler.state_dict()
            save_checkpoint(self.checkpoint, state)
        if self.world > 1:
            dist.barrier()


def completed_epochs(checkpoint: str | Path, fingerprint: str) -> int:
    """The epochs a run of `fingerprint` resumes after from `checkpoint`: 0 when there is none or it is of another
    run (what Engine.fit would find, for a caller whose training runs in other processes)."""
    if not Path(checkpoint).is_file():
        return 0
    state = load_checkpoint(checkpoint)
    return int(state["epoch"]) if state.get("fingerprint") == fingerprint else 0


def summary(row: dict, keys: list[str]) -> str:
    """The row's numbers under `keys`, for the epoch's log line: "loss 0.4213, rate_accuracy 0.8812"."""
    return ", ".join(f"{key} {row[key]:.5g}" for key in dict.fromkeys(keys) if isinstance(row[key], (int, float)))
