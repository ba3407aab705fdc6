"""Python's cyclic garbage collector in the process of a command (`dna ...`, `python -m flows.pipeline`), not in a
program that imports dna as a library.

A command imports torch, timm, MLflow, Prefect and DVC: about 800,000 objects that live until it ends. While they are
imported, the collector passes over all of them each time they have grown by a quarter, and once more when the
interpreter ends: on two cores a process that only imports the pipeline's libraries and ends took 6.8 s, and 4.5 s
without those passes (`python -m benchmarks.pipeline_cost --skip imports run`). So a command imports with the collector
off (`start`); once its config is checked and its work begins (`settle`: the `dna` command's config, a step's, the
pipeline's, and any training's first epoch), it freezes what it imported, which no pass visits again (with the few
thousand objects the imports left as garbage, once), and turns the collector back on for the work. At exit it freezes
what is left: the last pass would only free memory that the process gives back anyway. An object frozen there is never
finalized by the collector; nothing here leaves a write to a finalizer (files are closed by `with`, logs flushed and
SQLite committed by their own exit handlers).
"""
from __future__ import annotations

import atexit
import gc

_started = False


def start() -> None:
    """For the process of a command, first thing: no collection while it imports and checks its config."""
    global _started
    if _started:
        return
    _started = True
    gc.disable()
    atexit.register(gc.freeze)  # the other exit handlers still run, whichever order; what they make is collected


def settle() -> None:
    """The work begins: what is alive now stays frozen and the collector runs again (only in a command's process,
    once; a no-op elsewhere, e.g. under a test runner)."""
    if _started and not gc.isenabled():
        gc.freeze()
        gc.enable()
