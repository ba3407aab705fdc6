"""Python's cyclic garbage collector in the process of a command (`dna ...`, `python -m flows.pipeline`), not in a
program that imports dna as a library.

A command imports torch, timm, MLflow, Prefect and DVC: about 800,000 objects that live until it ends. While they are
imported, the collector runs a full pass over all of them each time they grow by a quarter, and once more when the
interpreter ends; on two cores that took about 2.5 of a bare import-and-exit's 7 s (benchmarks/README.md, section
13). So a command imports with the collector off (`start`), and once its work begins (`settle`, at the first stage,
step or epoch) it freezes what it imported, which no pass visits again, and turns the collector back on for the work.
At exit it freezes what is left: the interpreter's last pass would only free memory the process gives back anyway.
An object frozen there is never finalized by the collector: nothing here leaves a write to a finalizer (files are
closed by `with`, logs flushed and SQLite committed by their own exit handlers, which run before it).
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
