"""The teacher: trained here, a pretrained timm model, or a local checkpoint; frozen and in eval mode once made."""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from dna.checkpoint import load_checkpoint, save_checkpoint
from dna.config import Params
from dna.data import Data
from dna.ddp import is_main
from dna.train import TrainResult, accuracy, train_classifier

log = logging.getLogger(__name__)


def create_teacher(params: Params, num_classes: int, in_chans: int, pretrained: bool = False) -> nn.Module:
    cfg = params.teacher
    options = {"drop_path_rate": cfg.train.drop_path_rate} if cfg.train.drop_path_rate > 0 else {}
    if cfg.output_stride != 32:
        options["output_stride"] = cfg.output_stride
    return timm.create_model(cfg.model, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                             drop_rate=cfg.train.drop_rate, **options)


def _state_dict_of(path: str | Path) -> dict:
    state = load_checkpoint(path) if Path(path).read_bytes()[:8] == b"DNACKPT1" else \
        torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state.get("state_dict", state))


def make_teacher(params: Params, data: Data, out_dir: Path, device: torch.device, fingerprint: str,
                 on_epoch=None) -> tuple[nn.Module, TrainResult]:
    """Build the teacher from its configured source, train it if asked, save its weights to out_dir/teacher.pt."""
    cfg = params.teacher
    torch.manual_seed(params.seed)
    model = create_teacher(params, data.num_classes, data.in_chans, pretrained=cfg.source == "timm")
    if cfg.source == "checkpoint":
        model.load_state_dict(_state_dict_of(cfg.checkpoint))
    result = TrainResult()
    if cfg.source == "train" or cfg.train.epochs > 0:
        result = train_classifier(model, data, cfg.train, out_dir / "train_state.pt", seed=params.seed,
                                  fingerprint=fingerprint, device=device, name="teacher", on_epoch=on_epoch)
    else:
        result.test_accuracy = accuracy(model.to(device), data.loader("test", 256), device)
    if is_main():
        save_checkpoint(out_dir / "teacher.pt", {"model": model.state_dict(), "name": cfg.model,
                                                 "num_classes": data.num_classes, "in_chans": data.in_chans})
    return freeze(model), result


def load_teacher(params: Params, path: str | Path, device: torch.device) -> nn.Module:
    state = load_checkpoint(path)
    with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten: leave the random state alone
        model = create_teacher(params, state["num_classes"], state["in_chans"])
    model.load_state_dict(state["model"])
    return freeze(model.to(device))


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
