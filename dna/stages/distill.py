"""The distill stage: the block targets prepared once, then each block's supernet trained on them."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dna.checkpoint import write_csv
from dna.ddp import is_main, main_first
from dna.errors import ConfigError
from dna.locks import locked
from dna.spaces.base import require

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from dna.context import EpochHook
    from dna.run import Run



log = logging.getLogger(__name__)


@locked("features", wait=True)
def stage_features(run: Run) -> None:
    """Prepare the block targets once for all blocks (teacher: cache its boundary features); run before distilling.
    Of several processes, rank 0 prepares them while the others wait."""
    require(run.space, "supernets", "distillation")
    with main_first() as preparing:
        if preparing:
            run.supervision.prepare()


@locked("distill", per_block=True)
def stage_distill(run: Run, block: int, on_epoch: EpochHook = None) -> dict:
    """Distill one block; blocks are independent and may run in parallel once stage_features has run."""
    import pandas as pd

    from dna.distill import distill_block

    result = distill_block(run.space, run.supervision, block, run.params.distill, run.paths.supernet(block),
                           in_chans=run.data.in_chans, seed=run.distill_seed, fingerprint=run.block_fingerprint(block),
                           device=run.device, on_epoch=on_epoch, train_images=len(run.data.train))
    history = pd.DataFrame(result.history)
    if is_main():
        write_csv(run.paths.distill_history(block), history)
    return _distilled(block, history, result.resumed_from)


def distill_resumes_after(run: Run, block: int) -> int:
    """The epoch stage_distill resumes the block after (0: it starts afresh)."""
    from dna.engine import completed_epochs

    return completed_epochs(run.paths.supernet(block), run.block_fingerprint(block))


def distilled(run: Run, block: int, resumed_from: int) -> dict:
    """stage_distill's result read from the history it wrote, for a caller that ran it in other processes
    (resumed_from: distill_resumes_after, asked before they ran)."""
    import pandas as pd

    return _distilled(block, pd.read_csv(run.paths.distill_history(block)), resumed_from)


def _distilled(block: int, history: pd.DataFrame, resumed_from: int) -> dict:
    return {"block": block, "final_loss": float(history["loss"].iloc[-1]), "epochs": len(history),
            "resumed_from": resumed_from}


def trained_supernet(run: Run, block: int, shapes: list[tuple[int, int, int]]) -> torch.nn.Module:
    """The block's supernet as the distill stage of these settings left it, in eval mode.

    Raises ConfigError naming the block when its checkpoint was trained with other settings or stopped before
    distill.epochs (rating it would silently rate a stale or half-trained supernet), FileNotFoundError when there is
    none."""
    from dna.checkpoint import load_checkpoint
    from dna.distill import build_block

    path, epochs = run.paths.supernet(block), run.params.distill.epochs
    again = f"run `dna distill --block {block}`"
    if not path.is_file():
        raise FileNotFoundError(f"block {block}: the supernet {path} is missing: {again}")
    state = load_checkpoint(path)
    expected = run.block_fingerprint(block)
    if state.get("fingerprint") != expected:
        raise ConfigError(f"block {block}: the supernet {path} was trained with other settings (fingerprint "
                          f"{state.get('fingerprint')}; these settings give {expected}): {again}")
    if int(state["epoch"]) < epochs:
        raise ConfigError(f"block {block}: the supernet {path} finished {state['epoch']} of {epochs} epochs: {again}")
    supernet = build_block(run.space, block, shapes, run.data.in_chans)
    supernet.load_state_dict(state["model"])
    return supernet.eval()
