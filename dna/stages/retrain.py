"""The retrain stage: the chosen network trained (from scratch or from the supernets; optionally with KD)."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dna.checkpoint import checkpoint_digest, digest, save_checkpoint, write_csv, write_json
from dna.ddp import is_main
from dna.errors import needed
from dna.locks import locked
from dna.spaces.base import require

if TYPE_CHECKING:
    import torch

    from dna.arch import Arch
    from dna.context import EpochHook
    from dna.spaces.context import SpaceContext


log = logging.getLogger(__name__)


def build_student(run: SpaceContext, arch: Arch) -> torch.nn.Module:
    import torch

    torch.manual_seed(run.params.seed)
    train = run.params.retrain.train
    return run.space.build(arch, drop_rate=train.drop_rate, drop_path_rate=train.drop_path_rate)


def init_from_supernet(run: SpaceContext, model: torch.nn.Module, arch: Arch):
    """Extract the chosen subnet's weights from the block supernets (dna.spaces.base.Extraction says what was and was
    not copied), then re-estimate every BatchNorm of the network on a class-stratified calibration batch of training
    images: the supernets' statistics are those of a mixture of paths fed the teacher's features."""
    from dna.checkpoint import load_checkpoint
    from dna.data import eval_view
    from dna.rate import calibrate

    supernets = [load_checkpoint(run.paths.supernet(b))["model"] for b in range(run.space.num_blocks)]
    extraction = run.space.extract(arch, supernets, model)
    data = eval_view(run.data)
    images = data.images("train", positions=data.stratified("train", run.params.rating.calibration_size,
                                                             run.params.seed))
    calibrate(model, images)
    for layer, reason in extraction.not_copied.items():
        log.info("retrain: %s not initialised from the supernet: %s", layer, reason)
    return extraction


def share_retraining(run: SpaceContext, arch: Arch) -> None:
    """Start from the training state of another target that chose the same network, when this target has none: it is
    resumed only where its fingerprint (the network, the recipe, the data, the seed) matches, so two targets of one
    network are trained once."""
    import shutil

    from dna.arch import Arch

    state = run.paths.train_state
    if state.is_file():
        return
    for other in run.params.search.named_targets():
        theirs = run.paths.at(other)
        if other != run.paths.target and theirs.train_state.is_file() and \
                theirs.arch.is_file() and Arch.load(theirs.arch) == arch:
            shutil.copyfile(theirs.train_state, state.with_suffix(".tmp"))
            state.with_suffix(".tmp").replace(state)
            log.info("retrain: target %s chose the network of target %s: resumed from its training", run.paths.target,
                     other)
            return


@locked("retrain", per_target=True)
def stage_retrain(run: SpaceContext, on_epoch: EpochHook = None) -> dict:
    import pandas as pd

    from dna.arch import Arch, count_cost
    from dna.teacher import load_teacher
    from dna.train import train_classifier

    p, out = run.params.retrain, run.paths.retrain_dir
    require(run.space, "networks", "retraining")
    if p.init == "supernet":
        require(run.space, "supernets", "retrain.init: supernet")
    out.mkdir(parents=True, exist_ok=True)
    arch = Arch.load(needed(run.paths.arch, "search"))
    share_retraining(run, arch)
    model = build_student(run, arch)
    extraction = init_from_supernet(run, model, arch) if p.init == "supernet" else None
    teacher = load_teacher(run.params, run.paths.teacher, run.device) if p.kd_alpha > 0 else None
    start = [checkpoint_digest(run.paths.supernet(b)) for b in range(run.space.num_blocks)] if extraction else []
    result = train_classifier(model, run.data_for(p.train), p.train, run.paths.train_state, seed=run.params.seed,
                              fingerprint=digest(run.params.seed, run.params.data, p, arch.to_dict(), start),
                              device=run.device, name="retrain", teacher=teacher, kd_alpha=p.kd_alpha,
                              kd_temperature=p.kd_temperature, on_epoch=on_epoch)
    params, macs, _ = count_cost(model.cpu(), (1, run.data.in_chans, run.data.image_size, run.data.image_size))
    metrics = {"test_accuracy": result.test_accuracy, "params": params, "macs": macs, "epochs": len(result.history),
               "init": p.init, **(extraction.summary() if extraction else {})}
    if is_main():
        save_checkpoint(run.paths.model, {"model": model.state_dict(), "arch": arch.to_yaml()})
        write_csv(run.paths.retrain_history, pd.DataFrame(result.history))
        write_json(run.paths.retrain_metrics, metrics)
    return metrics
