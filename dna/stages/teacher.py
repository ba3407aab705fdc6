"""The teacher stage: train, download or load the teacher; its test accuracy."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dna.checkpoint import save_checkpoint, write_csv, write_json
from dna.ddp import is_main
from dna.locks import locked

if TYPE_CHECKING:
    from dna.context import Context, EpochHook

log = logging.getLogger(__name__)


HISTORY_COLUMNS = ["epoch", "loss", "train_accuracy", "rate_accuracy", "lr"]  # of a classifier's training


@locked("teacher")
def stage_teacher(run: Context, on_epoch: EpochHook = None) -> dict:
    import pandas as pd

    from dna.teacher import make_teacher, teacher_name

    run.paths.teacher_dir.mkdir(parents=True, exist_ok=True)
    if run.params.teacher.source == "none":  # DNA++: no teacher is built, trained or downloaded
        metrics = {"test_accuracy": None, "epochs": 0, "model": None}
        if is_main():  # teacher.pt records that there is none (what the distill stage depends on in DVC)
            save_checkpoint(run.paths.teacher, {"teacher": None})
            write_csv(run.paths.teacher_history, pd.DataFrame(columns=HISTORY_COLUMNS))
            write_json(run.paths.teacher_metrics, metrics)
        return metrics
    _, result = make_teacher(run.params, run.data_for(run.params.teacher.train), run.paths, run.device,
                             run.teacher_fingerprint(), on_epoch=on_epoch)
    metrics = {"test_accuracy": result.test_accuracy, "epochs": len(result.history),
               "model": teacher_name(run.params.teacher)}
    if is_main():
        history = pd.DataFrame(result.history, columns=None if result.history else HISTORY_COLUMNS)
        write_csv(run.paths.teacher_history, history)  # a teacher taken as it is: the header alone
        write_json(run.paths.teacher_metrics, metrics)
    return metrics
