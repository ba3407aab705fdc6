"""The one exit-code policy of every command line (`dna`, `python -m flows.<step>`, the pipeline flow).

2: a configuration that cannot be used (ConfigError: the message names the key and what is allowed).
1: a fault a run detects: a corrupt checkpoint, a diverging loss, a failed ONNX parity check, a missing input of a
   stage (MissingInput, not any FileNotFoundError: one a bug raises keeps its traceback), a block that kept failing.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

CONFIG_ERROR, DETECTED_FAULT = 2, 1


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the key, the value and what is allowed."""


class DetectedFault(Exception):
    """A fault a run detects and describes in one line (exit code 1). `fails_alike`: it fails the same way on every
    try, so that retrying only repeats it."""

    fails_alike: ClassVar[bool] = False


class MissingInput(FileNotFoundError, DetectedFault):
    """A file that an earlier stage writes is not there; the message names the stage to run."""

    fails_alike = True


def needed(path: str | Path, stage: str) -> Path:
    """`path`, which the stage `stage` writes; raises MissingInput when it is not there."""
    if not Path(path).exists():
        raise MissingInput(f"{path} is missing: run the {stage} stage first (dna {stage})")
    return Path(path)


def fails_alike(exc: BaseException) -> bool:
    """Whether an error fails the same way on every try, so that retrying it only repeats it: a config that cannot
    be used, a missing input, a diverging loss (a retry resumes at the same epoch), a failed parity check."""
    return isinstance(exc, ConfigError) or isinstance(exc, DetectedFault) and exc.fails_alike


class StageFailure(RuntimeError, DetectedFault):
    """A stage that failed in a way it detected and described (e.g. blocks that kept failing); the others' work
    is kept."""


def exit_code(exc: BaseException) -> int | None:
    """The exit code for an error reported in one line, or None for one that should keep its traceback."""
    if isinstance(exc, ConfigError):
        return CONFIG_ERROR
    if isinstance(exc, DetectedFault):
        return DETECTED_FAULT
    return None


def report(exc: BaseException) -> int:
    """Print an error of this policy in one line on stderr and return its exit code; re-raise any other."""
    import sys

    code = exit_code(exc)
    if code is None:
        raise exc
    print(f"error: {exc}", file=sys.stderr)
    return code
