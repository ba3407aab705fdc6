"""The teacher: trained here, a pretrained timm model, a local checkpoint, or an architecture file with its trained
weights (a network this project searched and retrained); frozen and in eval mode once made."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import timm
import torch
from torch import nn

from dna.arch import Arch
from dna.checkpoint import load_checkpoint, save_checkpoint
from dna.data import Data
from dna.ddp import is_main
from dna.errors import ConfigError
from dna.train import TrainResult, accuracy, train_classifier

if TYPE_CHECKING:
    from dna.config import Params, TeacherConfig
    from dna.paths import Paths

log = logging.getLogger(__name__)


def create_teacher(params: Params, num_classes: int, in_chans: int, pretrained: bool = False) -> nn.Module:
    cfg = params.teacher
    if cfg.source == "arch":  # as the retrain stage builds a searched network (SearchSpace.build: Arch.build)
        return teacher_arch(cfg).build(num_classes, in_chans, drop_rate=cfg.train.drop_rate,
                                       drop_path_rate=cfg.train.drop_path_rate)
    options = {"drop_path_rate": cfg.train.drop_path_rate} if cfg.train.drop_path_rate > 0 else {}
    if cfg.output_stride != 32:
        options["output_stride"] = cfg.output_stride
    return timm.create_model(cfg.model, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                             drop_rate=cfg.train.drop_rate, **options)


def _checkpoint_state(path: str | Path) -> dict:
    """What teacher.checkpoint holds: one of our checkpoints, or a weights-only torch.save file."""
    try:
        with open(path, "rb") as f:
            ours = f.read(8) == b"DNACKPT1"
        if ours:
            return load_checkpoint(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, corrupt, or not weights-only (torch and pickle raise many kinds)
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConfigError(f"teacher.checkpoint={str(path)!r} cannot be read as weights ({reason})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"teacher.checkpoint={str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


def weight_mismatch(expected: dict, given: dict) -> str | None:
    """Why `given` does not load strictly where `expected` (a model's state dict) does, in one line; None if it does."""
    def shape(value) -> tuple | None:
        return tuple(value.shape) if hasattr(value, "shape") else None

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} is {shape(given[k])}, not {shape(v)}" for k, v in expected.items()
              if k in given and shape(given[k]) != shape(v)]
    parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("shapes:", shapes)) if keys]
    return "; ".join(parts) or None


def teacher_weights(cfg: TeacherConfig, model: nn.Module) -> dict:
    """The state dict of teacher.checkpoint, checked to load strictly into `model` (the teacher as configured) and,
    for source arch, to be of the network of teacher.arch when the checkpoint names its architecture (model.pt of the
    retrain stage does); raises ConfigError naming the key otherwise."""
    state = _checkpoint_state(cfg.checkpoint)
    if cfg.source == "arch" and isinstance(state.get("arch"), str) and Arch.from_yaml(state["arch"]) != \
            Arch.load(cfg.arch):
        raise ConfigError(f"teacher.checkpoint={cfg.checkpoint!r} holds the weights of another architecture than "
                          f"teacher.arch={cfg.arch!r} (the architecture it was saved with differs)")
    weights = state.get("model", state.get("state_dict", state))
    if not isinstance(weights, dict):
        raise ConfigError(f"teacher.checkpoint={cfg.checkpoint!r} holds no state dict of weights")
    problem = weight_mismatch(model.state_dict(), weights)
    if problem:
        what = f"the network of teacher.arch={cfg.arch!r}" if cfg.source == "arch" else f"teacher.model={cfg.model!r}"
        raise ConfigError(f"teacher.checkpoint={cfg.checkpoint!r}: its weights do not fit {what} at this data's "
                          f"classes and channels: {problem}")
    return weights


def make_teacher(params: Params, data: Data, paths: Paths, device: torch.device, fingerprint: str,
                 on_epoch=None) -> tuple[nn.Module, TrainResult]:
    """Build the teacher from its configured source, train it if asked (resuming from paths.teacher_state), save its
    weights to paths.teacher."""
    cfg = params.teacher
    torch.manual_seed(params.seed)
    model = create_teacher(params, data.num_classes, data.in_chans, pretrained=cfg.source == "timm")
    if cfg.source in ("checkpoint", "arch") and cfg.checkpoint:
        model.load_state_dict(teacher_weights(cfg, model))
    result = TrainResult()
    if cfg.source == "train" or cfg.train.epochs > 0:
        result = train_classifier(model, data, cfg.train, paths.teacher_state, seed=params.seed,
                                  fingerprint=fingerprint, device=device, name="teacher", on_epoch=on_epoch)
    else:
        result.test_accuracy = accuracy(model.to(device), data.loader("test", 256), device)
    if is_main():
        arch = {"arch": teacher_arch(cfg).to_yaml()} if cfg.source == "arch" else {}
        save_checkpoint(paths.teacher, {"model": model.state_dict(), "name": teacher_name(cfg),
                                                 "num_classes": data.num_classes, "in_chans": data.in_chans, **arch})
    return freeze(model), result


def load_teacher(params: Params, path: str | Path, device: torch.device) -> nn.Module:
    """The teacher the teacher stage saved: the network of the architecture saved with it, else params' timm model."""
    state = load_checkpoint(path)
    if "model" not in state:
        raise ConfigError(f"{path} records no teacher (teacher.source: none); run the teacher stage again for a "
                          "supervision that reads one")
    with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten: leave the random state alone
        if "arch" in state:
            model = Arch.from_yaml(state["arch"]).build(state["num_classes"], state["in_chans"])
        else:
            model = create_teacher(params, state["num_classes"], state["in_chans"])
    model.load_state_dict(state["model"])
    return freeze(model.to(device))


def teacher_arch(cfg: TeacherConfig) -> Arch:
    """The network of a teacher of source arch: its file's, scaled by the multipliers."""
    return Arch.load(cfg.arch).scaled(cfg.width_multiplier, cfg.depth_multiplier)


def teacher_name(cfg: TeacherConfig) -> str:
    """What the teacher is, for metrics and its checkpoint: the timm model, or the architecture file (and its
    scaling)."""
    if cfg.source != "arch":
        return cfg.model
    scale = f" x{cfg.width_multiplier:g} wide x{cfg.depth_multiplier:g} deep" if cfg.scaled else ""
    return f"arch:{cfg.arch}{scale}"


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
