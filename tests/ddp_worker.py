"""Run by tests/test_ddp.py, once under torchrun (2 processes) and once as one process, on a prepared tiny run:

- train_classifier on a BatchNorm-free classifier (so that one process and two compute the same steps), and
  distill_block on block 1 of the run's space with its BatchNorm layers taken out;
- the teacher stage (real, BatchNorm and all) with every file write recorded, to see which rank writes.

Expects the run's splits copied to `out/outputs/data/splits.json`. Writes `result_<rank>.pt` (weights and
histories) and `writes_<rank>.json` (the files this rank wrote) under `out`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

import dna.checkpoint
from dna.config import parse_params
from dna.ddp import process_group, rank_and_world
from dna.distill import distill_block
from dna.pipeline import Run, stage_teacher
from dna.train import train_classifier

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_raw  # noqa: E402


def without_batchnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.Identity())
        else:
            without_batchnorm(child)
    return module


def record_writes(writes: list[str]) -> None:
    """Every file the project writes goes through staged_file: note its path."""
    staged = dna.checkpoint.staged_file

    def recorded(path):
        writes.append(str(path))
        return staged(path)
    dna.checkpoint.staged_file = recorded


def main(prepared: Path, out: Path) -> None:
    torch.set_num_threads(1)
    raw = tiny_raw(prepared / "outputs")
    with process_group(torch.device("cpu")):
        rank, world = rank_and_world()
        writes: list[str] = []
        record_writes(writes)
        run = Run(parse_params(raw))
        cpu = torch.device("cpu")

        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 48), nn.ReLU(), nn.Linear(48, 10))
        cfg = run.params.teacher.train.model_copy(update={"batch_size": 100, "label_smoothing": 0.0})
        trained = train_classifier(mlp, run.data, cfg, out / "mlp.pt", seed=0, fingerprint="mlp", device=cpu)

        space = run.space
        space.build_cell = lambda *args, built=space.build_cell: without_batchnorm(built(*args))
        distill_cfg = run.params.distill.model_copy(update={"batch_size": 100})
        distilled = distill_block(space, run.supervision, 1, distill_cfg, out / "block.pt", in_chans=1, seed=0,
                                  fingerprint="block", device=cpu)

        teacher = tiny_raw(out / "outputs")  # its splits were copied there
        teacher["teacher"]["train"] = teacher["teacher"]["train"] | {"epochs": 1}
        stage_teacher(Run(parse_params(teacher)))

        torch.save({"mlp": mlp.state_dict(), "mlp_history": trained.history, "test_accuracy": trained.test_accuracy,
                    "block_history": distilled.history, "world": world}, out / f"result_{rank}.pt")
        (out / f"writes_{rank}.json").write_text(json.dumps(writes))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
